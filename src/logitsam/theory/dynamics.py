"""Multi-step learning dynamics of GD and SAM on one softmax-regression example (the paper's Fig. 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from logitsam.theory.softmax import LossFn, Problem, ce_loss, dpo_loss, modes, probs, residual, sam_step


@dataclass
class Trajectory:
    """Per step (steps + 1 entries, step 0 first): p(y*), p(y+), p(y-), and |e_k| = |v_k^T g-| for the
    top two curvature modes of H_z (``mode1`` has the largest lambda), with g- = p - e_{y-}."""

    p_dominant: list[float] = field(default_factory=list)
    p_chosen: list[float] = field(default_factory=list)
    p_rejected: list[float] = field(default_factory=list)
    mode1: list[float] = field(default_factory=list)
    mode2: list[float] = field(default_factory=list)

    def record(self, problem: Problem, weight: torch.Tensor) -> None:
        p = probs(weight, problem.phi)
        _, vecs = modes(p)  # ascending lambdas: the last columns are the high-curvature modes
        coeffs = vecs.T @ residual(weight, problem.phi, problem.rejected)
        self.p_dominant.append(float(p[problem.dominant]))
        self.p_chosen.append(float(p[problem.chosen]))
        self.p_rejected.append(float(p[problem.rejected]))
        self.mode1.append(float(coeffs[-1].abs()))
        self.mode2.append(float(coeffs[-2].abs()))


def run_trajectory(problem: Problem, loss_fn: LossFn, *, lr: float, rho: float, steps: int) -> Trajectory:
    """``steps`` SAM steps (GD when rho = 0) on loss_fn from problem.weight."""
    trajectory = Trajectory()
    weight = problem.weight
    trajectory.record(problem, weight)
    for _ in range(steps):
        weight = sam_step(loss_fn, weight, lr, rho)
        trajectory.record(problem, weight)
    return trajectory


def negative_gradient_loss(problem: Problem) -> LossFn:
    """CE(y-): train it with lr < 0 for the pure negative gradient (Fig. 1a)."""
    return lambda weight: ce_loss(weight, problem.phi, problem.rejected)


def dpo_coupled_loss(problem: Problem, beta: float) -> LossFn:
    """DPO on (y+, y-) sharing phi, with the starting weight as the frozen reference (Fig. 1b)."""
    ref = problem.weight.clone()
    return lambda weight: dpo_loss(weight, ref, problem.phi, problem.chosen, problem.rejected, beta)


def compare_methods(
    problem: Problem, loss_fn: LossFn, *, lr: float, rho: float, steps: int
) -> dict[str, Trajectory]:
    """GD, sign-matched SAM (sign(rho) = sign(lr)) and mismatched SAM from the same start."""
    matched = abs(rho) if lr > 0 else -abs(rho)
    return {
        "GD": run_trajectory(problem, loss_fn, lr=lr, rho=0.0, steps=steps),
        "SAM, sign-matched": run_trajectory(problem, loss_fn, lr=lr, rho=matched, steps=steps),
        "SAM, mismatched": run_trajectory(problem, loss_fn, lr=lr, rho=-matched, steps=steps),
    }
