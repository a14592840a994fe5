"""Numerical checks of the paper's §3 statements (Luo et al., ICLR 2026): numbers in, numbers out.

Each ``check_*`` runs the actual autograd steps of ``theory/softmax.py`` against the paper's closed
form and returns a small dataclass of floats. Conventions: ``lr`` is the paper's eta and ``rho`` its
radius, both of either sign; "sign-matched" SAM means sign(rho) == sign(lr). A negative ``lr`` on
CE(y-) is the rejected term of DPO (the negative gradient that causes squeezing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from logitsam.theory.softmax import (
    Problem,
    ce_loss,
    dpo_loss,
    make_problem,
    modal_factors,
    modes,
    param_hessian_kron,
    predicted_residual,
    probs,
    residual,
    rho_tilde,
    sam_step,
    vec,
)

RHO_SCHEDULES = ("zero", "proportional", "sqrt", "fixed")


@dataclass(frozen=True)
class Prop31Result:
    """max_abs_error: autograd Hessian vs kron(phi phi^T, H_z) with column-stacking vec (the claim);
    row_major_error: the same against the row-major flatten W.reshape(-1), which is NOT the claim's
    ordering (it equals kron(H_z, phi phi^T) there); hessian_norm for scale."""

    max_abs_error: float
    row_major_error: float
    hessian_norm: float


def check_prop31(seed: int = 0, *, num_classes: int = 5, dim: int = 4) -> Prop31Result:
    """Prop 3.1: d^2 CE / d vec(W)^2 = (phi phi^T) (x) H_z, by torch.autograd.functional.hessian."""
    problem = make_problem(seed, num_classes=num_classes, dim=dim)
    phi, label = problem.phi, problem.chosen

    def loss_of_vec(flat: torch.Tensor) -> torch.Tensor:
        return ce_loss(flat.reshape(dim, num_classes).T, phi, label)  # undo column-stacking

    def loss_of_rows(flat: torch.Tensor) -> torch.Tensor:
        return ce_loss(flat.reshape(num_classes, dim), phi, label)

    expected = param_hessian_kron(phi, probs(problem.weight, phi))  # (V d, V d)
    hessian = torch.autograd.functional.hessian(loss_of_vec, vec(problem.weight))
    hessian_rows = torch.autograd.functional.hessian(loss_of_rows, problem.weight.reshape(-1))
    return Prop31Result(
        max_abs_error=float((hessian - expected).abs().max()),
        row_major_error=float((hessian_rows - expected).abs().max()),
        hessian_norm=float(expected.norm()),
    )


def schedule_rho(schedule: str, lr: float, scale: float) -> float:
    """rho as a function of lr, sign-matched: zero, scale*lr, scale*sign(lr)*sqrt|lr|, scale*sign(lr).

    Thm 3.2's remainder is O(lr^2 + |lr| rho^2): only "proportional" and "sqrt" keep it O(lr^2);
    "sqrt" also keeps the SAM term (order |lr|^1.5) above the remainder, so a wrong SAM term shows.
    """
    sign = math.copysign(1.0, lr)
    table = {
        "zero": 0.0,
        "proportional": scale * lr,
        "sqrt": scale * sign * math.sqrt(abs(lr)),
        "fixed": scale * sign,
    }
    if schedule not in table:
        raise ValueError(f"rho schedule {schedule!r} is not one of {RHO_SCHEDULES}")
    return table[schedule]


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = torch.log(torch.tensor(xs, dtype=torch.float64))
    ly = torch.log(torch.tensor(ys, dtype=torch.float64))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


@dataclass(frozen=True)
class Thm32Result:
    """errors[i] = ||g'_actual - g'_predicted|| after one step of rate lrs[i] and radius rhos[i];
    slope: fitted d log(error) / d log|lr|."""

    schedule: str
    lrs: list[float]
    rhos: list[float]
    errors: list[float]
    slope: float


def check_thm32(
    schedule: str = "proportional",
    *,
    lrs: Sequence[float] = tuple(-(10.0 ** (-4 + 0.25 * i)) for i in range(9)),
    rho_scale: float = 1.0,
    seed: int = 0,
) -> Thm32Result:
    """Thm 3.2: the residual after one SAM step on CE(y-) is (I - lr mu H_z - lr mu rho~ H_z^2) g + O(lr^2).

    The slope over ``lrs`` is ~2 for the "zero" (GD), "proportional" and "sqrt" schedules and ~1 for
    "fixed" rho, whose O(|lr| rho^2) remainder is first order in lr.
    """
    problem = make_problem(seed)
    label = problem.rejected
    g = residual(problem.weight, problem.phi, label)
    p = probs(problem.weight, problem.phi)
    rhos, errors = [], []
    for lr in lrs:
        rho = schedule_rho(schedule, lr, rho_scale)
        weight = sam_step(lambda w: ce_loss(w, problem.phi, label), problem.weight, lr, rho)
        actual = residual(weight, problem.phi, label)
        rhos.append(rho)
        errors.append(float((actual - predicted_residual(g, p, problem.mu, lr, rho)).norm()))
    abs_lrs = [abs(lr) for lr in lrs]
    return Thm32Result(schedule, list(lrs), rhos, errors, loglog_slope(abs_lrs, errors))


@dataclass(frozen=True)
class ModalGrowth:
    """One step's growth of the modal coefficients e_k = v_k^T g (basis of H_z before the step), with
    the step's lr, rho, mu and rho~ so that the predicted curve can be redrawn."""

    lambdas: list[float]
    measured: list[float]
    predicted: list[float]
    lr: float
    rho: float
    mu: float
    rho_tilde: float


def modal_growth(problem: Problem, label: int, lr: float, rho: float, *, tol: float = 1e-6) -> ModalGrowth:
    """Measured e_k'/e_k against Cor 3.4's 1 - lr mu (lambda_k + rho~ lambda_k^2).

    Modes with |e_k| < tol ||g|| (the null mode along the all-ones vector, where e_k = 0) are skipped.
    """
    g = residual(problem.weight, problem.phi, label)
    lambdas, vecs = modes(probs(problem.weight, problem.phi))  # (V,), (V, V)
    weight = sam_step(lambda w: ce_loss(w, problem.phi, label), problem.weight, lr, rho)
    before, after = vecs.T @ g, vecs.T @ residual(weight, problem.phi, label)
    keep = before.abs() > tol * g.norm()
    rho_t = rho_tilde(rho, problem.mu, g)
    predicted = modal_factors(lambdas[keep], problem.mu, lr, rho_t)
    measured = after[keep] / before[keep]
    return ModalGrowth(
        lambdas[keep].tolist(), measured.tolist(), predicted.tolist(), lr, rho, problem.mu, rho_t
    )


@dataclass(frozen=True)
class Cor34Result:
    """Worst case over seeds of the mode-wise (max-norm) relative errors
    rel_error: ||measured - predicted|| / ||predicted - 1|| for the SAM factors (first-order match);
    sam_term_rel_error: the same for the SAM term alone, (SAM factor - GD factor);
    and, for GD with lr < 0, the fraction of seeds where every mode grows (factor > 1) and where the
    factors increase with lambda_k (high-curvature modes expand fastest)."""

    lr: float
    rho: float
    rel_error: float
    sam_term_rel_error: float
    frac_expand: float
    frac_high_lambda_fastest: float


def check_cor34(seeds: Sequence[int] = range(10), *, lr: float = -1e-5, rho: float = -0.1) -> Cor34Result:
    """Cor 3.4 on the rejected residual: modal factors match 1 - lr mu (lambda_k + rho~ lambda_k^2)."""
    rel, sam_rel, expand, fastest = [], [], [], []
    for seed in seeds:
        problem = make_problem(seed)
        gd = modal_growth(problem, problem.rejected, lr, 0.0)
        sam = modal_growth(problem, problem.rejected, lr, rho)
        m_gd, m_sam, p_gd, p_sam = (
            torch.tensor(x, dtype=torch.float64)
            for x in (gd.measured, sam.measured, gd.predicted, sam.predicted)
        )
        rel.append(float((m_sam - p_sam).abs().max() / (p_sam - 1).abs().max()))
        sam_term = p_sam - p_gd
        sam_rel.append(float(((m_sam - m_gd) - sam_term).abs().max() / sam_term.abs().max()))
        expand.append(bool((m_gd > 1).all()))
        fastest.append(bool((m_gd.diff() > 0).all()))  # lambdas come ascending from eigh
    n = len(seeds)
    return Cor34Result(lr, rho, max(rel), max(sam_rel), sum(expand) / n, sum(fastest) / n)


def growth_ratios(problem: Problem, weight: torch.Tensor) -> torch.Tensor:
    """p'(c) / p(c) for every class c, (V,)."""
    return probs(weight, problem.phi) / probs(problem.weight, problem.phi)


@dataclass(frozen=True)
class SignRuleResult:
    """Fractions of seeds, comparing one-step growth ratios p'(c)/p(c) with plain GD at the same lr.
    ``label`` is the class the CE step trains (y- for lr < 0, y+ for lr > 0); ``bystander`` is the other
    one of y+/y- (the chosen response, squeezed by a negative gradient)."""

    lr: float
    rho: float
    matched_lowers_dominant: float
    matched_raises_label: float
    matched_raises_bystander: float
    mismatched_raises_dominant: float
    mismatched_lowers_label: float
    mismatched_lowers_bystander: float
    gd_raises_dominant: float


def check_sign_rule(
    seeds: Sequence[int] = range(200), *, lr: float = -0.5, rho: float = 0.5
) -> SignRuleResult:
    """Sign rule and Cor 3.6: sign(rho) == sign(lr) lowers p(y*) growth and raises p(y) growth vs GD.

    lr < 0 trains CE(y-) (negative gradient, bystander y+); lr > 0 trains CE(y+) (bystander y-).
    ``rho`` gives the radius; its sign is set by the rule (matched: sign(lr), mismatched: -sign(lr)).
    """
    matched_rho = math.copysign(abs(rho), lr)
    hits: dict[str, int] = {}
    for seed in seeds:
        problem = make_problem(seed)
        label, bystander = (
            (problem.rejected, problem.chosen) if lr < 0 else (problem.chosen, problem.rejected)
        )
        loss = lambda w, label=label, phi=problem.phi: ce_loss(w, phi, label)  # noqa: E731
        gd = growth_ratios(problem, sam_step(loss, problem.weight, lr, 0.0))
        matched = growth_ratios(problem, sam_step(loss, problem.weight, lr, matched_rho))
        mismatched = growth_ratios(problem, sam_step(loss, problem.weight, lr, -matched_rho))
        star = problem.dominant
        outcome = {
            "matched_lowers_dominant": matched[star] < gd[star],
            "matched_raises_label": matched[label] > gd[label],
            "matched_raises_bystander": matched[bystander] > gd[bystander],
            "mismatched_raises_dominant": mismatched[star] > gd[star],
            "mismatched_lowers_label": mismatched[label] < gd[label],
            "mismatched_lowers_bystander": mismatched[bystander] < gd[bystander],
            "gd_raises_dominant": gd[star] > 1,
        }
        for name, holds in outcome.items():
            hits[name] = hits.get(name, 0) + int(holds)
    return SignRuleResult(lr, matched_rho, **{name: count / len(seeds) for name, count in hits.items()})


@dataclass(frozen=True)
class DpoSamResult:
    """DPO with shared phi, fractions of seeds: SAM (rho > 0) vs GD at the same lr, and how much of
    the SAM step is a pure rescaling of the GD step (1 - |cos| between the two updates, max over seeds)."""

    sam_lowers_dominant: float
    sam_raises_chosen: float
    gd_raises_dominant: float
    max_direction_gap: float


def check_dpo_sam(
    seeds: Sequence[int] = range(200), *, lr: float = 0.5, rho: float = 0.5, beta: float = 1.0
) -> DpoSamResult:
    """SAM on the DPO-coupled loss (shared phi). log p(y+) - log p(y-) = z_{y+} - z_{y-}: the softmax
    normaliser cancels, so the logit gradient always points along e_{y-} - e_{y+} and SAM only rescales
    the GD step. This returns how often that still lowers p(y*) growth."""
    lowers, raises, gd_up, gap = 0, 0, 0, 0.0
    for seed in seeds:
        problem = make_problem(seed)
        ref = problem.weight.clone()

        def loss(w: torch.Tensor, problem: Problem = problem, ref: torch.Tensor = ref) -> torch.Tensor:
            return dpo_loss(w, ref, problem.phi, problem.chosen, problem.rejected, beta)

        gd_weight = sam_step(loss, problem.weight, lr, 0.0)
        sam_weight = sam_step(loss, problem.weight, lr, rho)
        r_gd, r_sam = growth_ratios(problem, gd_weight), growth_ratios(problem, sam_weight)
        lowers += bool(r_sam[problem.dominant] < r_gd[problem.dominant])
        raises += bool(r_sam[problem.chosen] > r_gd[problem.chosen])
        gd_up += bool(r_gd[problem.dominant] > 1)
        d_gd, d_sam = (gd_weight - problem.weight).flatten(), (sam_weight - problem.weight).flatten()
        gap = max(gap, 1.0 - float((d_gd @ d_sam).abs() / (d_gd.norm() * d_sam.norm())))
    n = len(seeds)
    return DpoSamResult(lowers / n, raises / n, gd_up / n, gap)


__all__ = [
    "Cor34Result",
    "DpoSamResult",
    "ModalGrowth",
    "Prop31Result",
    "SignRuleResult",
    "Thm32Result",
    "check_cor34",
    "check_dpo_sam",
    "check_prop31",
    "check_sign_rule",
    "check_thm32",
    "loglog_slope",
    "modal_growth",
    "schedule_rho",
]
