"""The paper's §3 statements, checked numerically with few seeds (run_theory uses more)."""

import pytest
import torch

import logitsam.theory.checks as checks
from logitsam.theory import (
    check_cor34,
    check_dpo_sam,
    check_prop31,
    check_sign_rule,
    check_thm32,
    modal_growth,
)
from logitsam.theory.softmax import make_problem, predicted_residual

FEW_LRS = tuple(-(10.0 ** (-4 + 0.5 * i)) for i in range(5))  # 1e-4 .. 1e-2, eta < 0


def test_prop31_hessian_is_kron_in_column_stacking_order():
    result = check_prop31()
    assert result.max_abs_error < 1e-10
    # the ordering matters: the row-major flatten does not give kron(phi phi^T, H_z)
    assert result.row_major_error > 1e-3 * result.hessian_norm


@pytest.mark.parametrize("schedule, scale", [("zero", 0.0), ("proportional", 10.0), ("sqrt", 1.0)])
def test_thm32_error_is_second_order(schedule, scale):
    result = check_thm32(schedule, lrs=FEW_LRS, rho_scale=scale)
    assert 1.8 < result.slope < 2.2


def test_thm32_fixed_rho_is_only_first_order():
    assert 0.8 < check_thm32("fixed", lrs=FEW_LRS, rho_scale=0.5).slope < 1.3


def test_thm32_positive_lr():
    lrs = tuple(-lr for lr in FEW_LRS)
    assert 1.8 < check_thm32("sqrt", lrs=lrs, rho_scale=1.0).slope < 2.2


def test_thm32_check_catches_a_wrong_sam_term(monkeypatch):
    """With rho ~ sqrt|eta| the SAM term is O(|eta|^1.5): flipping its sign drops the slope to ~1.5."""

    def flipped(g, p, mu, lr, rho):
        return predicted_residual(g, p, mu, lr, -rho)

    monkeypatch.setattr(checks, "predicted_residual", flipped)
    assert check_thm32("sqrt", lrs=FEW_LRS, rho_scale=1.0).slope < 1.7


def test_thm32_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="'linear'"):
        check_thm32("linear")


def test_cor34_modal_factors_first_order():
    result = check_cor34(range(5))
    assert result.rel_error < 1e-2
    assert result.sam_term_rel_error < 0.2  # the SAM term's own remainder is O(rho~)
    assert result.frac_expand == 1.0 and result.frac_high_lambda_fastest == 1.0


def test_cor34_sign_matched_sam_damps_top_mode():
    problem = make_problem(0)
    gd = modal_growth(problem, problem.rejected, -0.05, 0.0)
    matched = modal_growth(problem, problem.rejected, -0.05, -0.5)
    mismatched = modal_growth(problem, problem.rejected, -0.05, 0.5)
    assert gd.lambdas == matched.lambdas
    assert matched.measured[-1] < gd.measured[-1] < mismatched.measured[-1]  # top-curvature mode
    assert torch.tensor(gd.measured).diff().gt(0).all()


@pytest.mark.parametrize("lr", [-0.5, 0.5])
def test_sign_rule(lr):
    result = check_sign_rule(range(30), lr=lr, rho=0.5)
    assert result.rho == pytest.approx(lr)  # matched radius carries the sign of lr
    fractions = [
        result.matched_lowers_dominant,
        result.matched_raises_label,
        result.matched_raises_bystander,
        result.mismatched_raises_dominant,
        result.mismatched_lowers_label,
        result.mismatched_lowers_bystander,
    ]
    assert min(fractions) > 0.9
    # the negative gradient squeezes: GD alone raises p(y*) on every seed
    assert result.gd_raises_dominant == (1.0 if lr < 0 else 0.0)


def test_dpo_shared_phi_sam_is_a_rescaled_gd_step():
    result = check_dpo_sam(range(20))
    assert result.max_direction_gap < 1e-12
    assert result.sam_raises_chosen == 1.0
