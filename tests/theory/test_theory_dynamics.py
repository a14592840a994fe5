"""Multi-step dynamics (Fig. 1a/1b): who squeezes, and which SAM sign slows it."""

import pytest

from logitsam.theory.dynamics import compare_methods, dpo_coupled_loss, negative_gradient_loss
from logitsam.theory.softmax import make_problem


@pytest.fixture
def problem():
    return make_problem(0, warmup_steps=1)


def test_negative_gradient_squeezes_and_matched_sam_slows_it(problem):
    runs = compare_methods(problem, negative_gradient_loss(problem), lr=-0.02, rho=1.0, steps=20)
    gd, matched, mismatched = runs["GD"], runs["SAM, sign-matched"], runs["SAM, mismatched"]
    assert len(gd.p_dominant) == 21
    assert gd.p_dominant[-1] > gd.p_dominant[0] and gd.p_chosen[-1] < gd.p_chosen[0]  # squeezing
    assert matched.p_dominant[-1] < gd.p_dominant[-1] < mismatched.p_dominant[-1]
    assert matched.p_chosen[-1] > gd.p_chosen[-1] > mismatched.p_chosen[-1]
    assert gd.mode1[-1] > gd.mode1[0]  # the top-curvature mode of g- expands


def test_dpo_coupled_raises_chosen_and_sam_acts_as_a_larger_step(problem):
    runs = compare_methods(problem, dpo_coupled_loss(problem, beta=1.0), lr=0.2, rho=1.0, steps=20)
    gd, matched, mismatched = runs["GD"], runs["SAM, sign-matched"], runs["SAM, mismatched"]
    assert gd.p_chosen[-1] > gd.p_chosen[0] and gd.p_rejected[-1] < gd.p_rejected[0]
    assert matched.p_chosen[-1] > gd.p_chosen[-1] > mismatched.p_chosen[-1]
