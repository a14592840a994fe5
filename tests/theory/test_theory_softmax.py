"""The softmax-regression model of the theory lab: losses, gradients, SAM steps, vec ordering."""

import math

import pytest
import torch

from logitsam.theory.softmax import (
    ce_loss,
    dpo_loss,
    loss_grad,
    make_problem,
    modal_factors,
    predicted_residual,
    probs,
    residual,
    rho_tilde,
    sam_step,
    unvec,
    vec,
)


@pytest.fixture
def problem():
    return make_problem(3)


def test_make_problem_is_peaked_deterministic_and_labels_distinct():
    a, b = make_problem(7), make_problem(7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.phi, b.phi)
    assert len({a.dominant, a.chosen, a.rejected}) == 3
    p = probs(a.weight, a.phi)
    assert int(p.argmax()) == a.dominant and p[a.dominant] > 0.5
    assert a.mu == pytest.approx(1.5**2)
    scaled = make_problem(7, warmup_steps=0, weight_scale=1.5)
    assert int(probs(scaled.weight, scaled.phi).argmax()) == scaled.dominant


def test_vec_is_column_stacking():
    weight = torch.arange(6, dtype=torch.float64).reshape(2, 3)  # V = 2, d = 3
    assert vec(weight).tolist() == [0, 3, 1, 4, 2, 5]
    assert torch.equal(unvec(vec(weight), 2), weight)


def test_ce_gradient_is_residual_times_phi(problem):
    grad = loss_grad(lambda w: ce_loss(w, problem.phi, problem.rejected), problem.weight)
    expected = torch.outer(residual(problem.weight, problem.phi, problem.rejected), problem.phi)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-14)


def test_dpo_loss_hand_worked():
    """V = 3, d = 1, phi = [1], W = [[1], [0], [2]], W_ref = 0, chosen 0, rejected 1, beta = 0.5.

    The normaliser cancels: margin = (z_0 - z_1) - (0 - 0) = 1, so L = -log sigmoid(0.5) = log(1 + e^-0.5)
    = 0.474077. At W = W_ref the margin is 0 and L = log 2.
    """
    weight = torch.tensor([[1.0], [0.0], [2.0]], dtype=torch.float64)
    phi = torch.ones(1, dtype=torch.float64)
    loss = dpo_loss(weight, torch.zeros_like(weight), phi, 0, 1, beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)
    assert float(dpo_loss(weight, weight, phi, 0, 1, beta=0.5)) == pytest.approx(math.log(2), abs=1e-12)
    assert float(dpo_loss(weight, torch.zeros_like(weight), phi, 1, 0, beta=0.5)) > math.log(2)


def test_sam_step_rho_zero_is_gd(problem):
    loss = lambda w: ce_loss(w, problem.phi, problem.chosen)  # noqa: E731
    expected = problem.weight - 0.3 * loss_grad(loss, problem.weight)
    assert torch.equal(sam_step(loss, problem.weight, 0.3, 0.0), expected)


@pytest.mark.parametrize("lr, rho", [(0.3, 0.2), (-0.3, -0.2), (-0.3, 0.2)])
def test_sam_step_perturbs_logits_by_rho_tilde_g(problem, lr, rho):
    """eps = rho g phi^T / (||g|| ||phi||) moves the logits by eps phi = rho~ g (the proof of Thm 3.2)."""
    label = problem.rejected
    g = residual(problem.weight, problem.phi, label)
    z_pert = problem.weight @ problem.phi + rho_tilde(rho, problem.mu, g) * g
    g_pert = torch.softmax(z_pert, -1) - torch.nn.functional.one_hot(torch.tensor(label), g.numel())
    expected = problem.weight - lr * torch.outer(g_pert, problem.phi)
    actual = sam_step(lambda w: ce_loss(w, problem.phi, label), problem.weight, lr, rho)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-13)


def test_predicted_residual_rho_zero_is_linearised_gd(problem):
    p = probs(problem.weight, problem.phi)
    g = residual(problem.weight, problem.phi, problem.rejected)
    hessian_g = p * g - p * (p @ g)  # H_z g without forming H_z
    expected = g - 0.1 * problem.mu * hessian_g
    torch.testing.assert_close(predicted_residual(g, p, problem.mu, 0.1, 0.0), expected, rtol=0, atol=1e-15)


def test_modal_factors_negative_lr_grow_with_curvature():
    lambdas = torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64)
    gd = modal_factors(lambdas, mu=2.0, lr=-0.5, rho_t=0.0)
    assert gd.tolist() == pytest.approx([1.0, 1.1, 1.2, 1.3])
    matched = modal_factors(lambdas, mu=2.0, lr=-0.5, rho_t=-1.0)  # damps by lambda^2
    assert (matched[1:] < gd[1:]).all() and (matched.diff() > 0).all()
