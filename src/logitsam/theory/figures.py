"""Figures of the theory lab: numbers in, one PNG out per function (matplotlib, Agg backend)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in CI and in threads

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from logitsam._atomic import atomic_path  # noqa: E402
from logitsam.theory.checks import ModalGrowth, Thm32Result  # noqa: E402
from logitsam.theory.dynamics import Trajectory  # noqa: E402
from logitsam.theory.softmax import modal_factors  # noqa: E402

METHOD_COLORS = {"GD": "black", "SAM, sign-matched": "tab:blue", "SAM, mismatched": "tab:red"}


def _save(fig: plt.Figure, path: Path, caption: str, **margins: float) -> Path:
    """Caption under the axes (wrapped to the figure width), then write the PNG.

    Fixed margins instead of tight_layout: tight_layout measures every tick label of the log axes and
    costs about a second per figure.
    """
    text = textwrap.fill(caption, int(fig.get_figwidth() * 14))
    fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=9, style="italic")
    fig.subplots_adjust(**margins)
    with atomic_path(path) as tmp:  # the temporary name keeps .png: savefig picks the format from it
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def plot_dynamics(runs: Mapping[str, Trajectory], path: Path, *, title: str, caption: str) -> Path:
    """Three panels over steps: p(y*); p(y+) and p(y-) (log scale); |e_k| of the two top-curvature modes."""
    fig, (ax_star, ax_pm, ax_m) = plt.subplots(1, 3, figsize=(15, 4.8))
    for method, run in runs.items():
        color = METHOD_COLORS[method]
        ax_star.plot(run.p_dominant, color=color, label=method)
        ax_pm.plot(run.p_chosen, color=color, linestyle="--", label=f"p(y+), {method}")
        ax_pm.plot(run.p_rejected, color=color, linestyle=":", label=f"p(y-), {method}")
        ax_m.plot(run.mode1, color=color, linestyle="-", label=f"|e_1| (largest λ), {method}")
        ax_m.plot(run.mode2, color=color, linestyle="--", label=f"|e_2| (2nd largest λ), {method}")
    ax_star.set(xlabel="step", ylabel="p(y*)", title="Dominant wrong class y*")
    ax_pm.set(yscale="log", xlabel="step", ylabel="probability", title="Chosen y+ and rejected y-")
    ax_m.set(xlabel="step", ylabel="|v_k^T g-|", title="Modal coefficients of the rejected residual g-")
    for ax in (ax_star, ax_pm, ax_m):
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path, caption, left=0.05, right=0.99, top=0.86, bottom=0.17, wspace=0.25)


def plot_thm32_error(results: Sequence[Thm32Result], path: Path, *, caption: str) -> Path:
    """log-log ||g'_actual - g'_predicted|| against |lr| per rho schedule, fitted slope in the legend."""
    fig, ax = plt.subplots(figsize=(7, 5.2))
    labels = {
        "zero": "rho = 0 (GD)",
        "proportional": "rho ∝ lr",
        "sqrt": "rho ∝ sign(lr) sqrt|lr|",
        "fixed": "rho fixed",
    }
    markers = "osD^v"  # distinct markers: the three O(eta^2) lines lie almost on top of each other
    for i, result in enumerate(results):
        abs_lrs = [abs(lr) for lr in result.lrs]
        label = f"{labels.get(result.schedule, result.schedule)}: slope {result.slope:.2f}"
        ax.loglog(
            abs_lrs,
            result.errors,
            marker=markers[i % len(markers)],
            markersize=7 - i,
            fillstyle="none",
            label=label,
        )
    ax.set(
        xlabel="|eta| (learning rate)",
        ylabel="||g' actual - g' predicted||",
        title="Thm 3.2: one-step residual prediction error",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, caption, left=0.13, right=0.97, top=0.93, bottom=0.2)


def plot_growth_factors(growths: Mapping[str, ModalGrowth], path: Path, *, caption: str) -> Path:
    """Modal growth factor e_k'/e_k against lambda_k: Cor 3.4's curve (line) and one actual step (points)."""
    fig, ax = plt.subplots(figsize=(7, 5.2))
    top = max(max(g.lambdas) for g in growths.values())
    grid = torch.linspace(0.0, 1.05 * top, 200, dtype=torch.float64)
    for method, growth in growths.items():
        color = METHOD_COLORS[method]
        curve = modal_factors(grid, growth.mu, growth.lr, growth.rho_tilde)
        ax.plot(grid.tolist(), curve.tolist(), color=color, label=f"{method}: predicted (Cor 3.4)")
        ax.scatter(
            growth.lambdas, growth.measured, color=color, marker="o", s=18, label=f"{method}: measured"
        )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(
        xlabel="curvature λ_k (eigenvalue of H_z)",
        ylabel="growth factor e_k' / e_k",
        title="Cor 3.4: modal growth of the residual in one step",
    )
    ax.legend(fontsize=8)
    return _save(fig, path, caption, left=0.13, right=0.97, top=0.93, bottom=0.2)
