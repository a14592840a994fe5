"""The report's figures: groups of runs in, one PNG out per function (matplotlib, Agg backend).

Each function returns the PNG's path, or None when no run logged any of its metrics. A variant keeps
its color in every figure; lines are the mean over seeds and the shaded band spans min to max.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in CI and in threads

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from logitsam._atomic import atomic_path  # noqa: E402
from logitsam.report.runs import ACCURACY, CHOSEN_DELTA, Run, group_stat, seed_curve  # noqa: E402
from logitsam.report.tables import Sweep  # noqa: E402

Groups = dict[str, list[Run]]


def save_logprob_panels(fig, axes, path: str | Path, *, title: str, caption: str) -> None:
    """Finish a row of per-token log-prob panels (the Fig. 1c analogues): axis labels, grid, legends, title,
    caption under the panels; written atomically, then closed."""
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean log-prob per token (nats)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.text(0.5, 0.005, caption, ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def variant_colors(groups: Groups) -> dict[str, str]:
    return {name: f"C{i % 10}" for i, name in enumerate(groups)}


def _curve_panel(ax, groups: Groups, colors: dict[str, str], key: str, *, split: str = "train",
                 linestyle: str = "-") -> bool:
    """Mean line and min-max band of key per variant; False when no variant logged it."""
    drew = False
    for name, runs in groups.items():
        curve = seed_curve(runs, key, split)
        if curve is None:
            continue
        ax.plot(curve.steps, curve.mean, color=colors[name], linestyle=linestyle, label=name)
        if len(runs) > 1:
            ax.fill_between(curve.steps, curve.low, curve.high, color=colors[name], alpha=0.2, linewidth=0)
        drew = True
    if not drew:
        ax.text(0.5, 0.5, f"{key}\nnot logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return drew


def _legend_below(fig, groups: Groups, colors: dict[str, str], extra: Sequence[Line2D] = ()) -> None:
    handles = [Line2D([], [], color=colors[name], label=name) for name in groups] + list(extra)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)


def _save(fig, path: Path, n_legend: int) -> Path:
    # fixed margins instead of tight_layout (slow, and it ignores the figure legend): 0.8 in for the
    # y label on the left, one legend row of 4 entries per 0.25 in at the bottom
    width, height = fig.get_size_inches()
    rows = (n_legend + 3) // 4
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, top=1 - 0.6 / height,
                        bottom=(0.6 + 0.25 * rows) / height, wspace=0.28)
    with atomic_path(path) as tmp:  # the temporary name keeps .png: savefig picks the format from it
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def _panels(keys_titles: Sequence[tuple[str, str, str]], groups: Groups, path: Path, suptitle: str,
            *, split: str = "train") -> Path | None:
    """One panel a (key, title, ylabel), step on x; None when no panel has data."""
    colors = variant_colors(groups)
    width = max(9.0, 5.0 * len(keys_titles))  # a single panel still leaves room for the legend
    fig, axes = plt.subplots(1, len(keys_titles), figsize=(width, 4.4), squeeze=False)
    drew = False
    for ax, (key, title, ylabel) in zip(axes[0], keys_titles, strict=True):
        drew |= _curve_panel(ax, groups, colors, key, split=split)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    if not drew:
        plt.close(fig)
        return None
    fig.suptitle(suptitle)
    _legend_below(fig, groups, colors)
    return _save(fig, path, len(groups))


def plot_training_curves(groups: Groups, path: Path) -> Path | None:
    """Train loss, reward accuracy and reward margin against step."""
    return _panels([("loss", "Training loss", "loss"),
                    ("rewards/accuracies", "Reward accuracy (train)", "rewards/accuracies"),
                    ("rewards/margins", "Reward margin (train)", "rewards/margins")],
                   groups, path, "Training curves (mean over seeds, band: min to max)")


def logp_keys(groups: Groups) -> tuple[str, str, str]:
    """(chosen key, rejected key, y label): the change vs the reference if logged, else raw log-probs."""
    logged = any("squeeze/chosen_delta_ref" in rec for runs in groups.values() for r in runs for rec in r.train)
    if logged:
        return "squeeze/chosen_delta_ref", "squeeze/rejected_delta_ref", "log π(y) − log π_ref(y)"
    return "logps/chosen", "logps/rejected", "log π(y)"


def plot_logps(groups: Groups, path: Path) -> Path | None:
    """Chosen and rejected log-probs (vs the reference when logged) and the argmax-token probability."""
    chosen, rejected, ylabel = logp_keys(groups)
    return _panels([(chosen, "Chosen y+", ylabel),
                    (rejected, "Rejected y−", ylabel),
                    ("squeeze/argmax_prob_chosen", "Argmax-token probability (chosen)", "mean max_v p(v)")],
                   groups, path, "Log-probability trajectories (mean over seeds, band: min to max)")


def plot_displacement(groups: Groups, path: Path) -> Path | None:
    """The fraction of chosen responses whose log-prob fell below the reference's, against step."""
    return _panels([("squeeze/displacement_rate", "Displacement rate (train)", "fraction of pairs")],
                   groups, path, "Likelihood displacement")


def plot_rho_sweep(groups: Groups, sweeps: Sequence[Sweep], path: Path) -> Path | None:
    """Final eval accuracy and final chosen Δ vs rho (log x, error bars: std over seeds); rho = 0 as lines."""
    if not sweeps:
        return None
    colors = variant_colors(groups)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = [(ACCURACY, "Final eval accuracy", "eval rewards/accuracies"),
              (CHOSEN_DELTA, "Final chosen Δ vs reference", "log π(y+) − log π_ref(y+)")]
    extra: dict[str, Line2D] = {}
    for ax, (sources, title, ylabel) in zip(axes, panels, strict=True):
        for i, sweep in enumerate(sweeps):
            stats = [(rho, name, group_stat(groups[name], sources)) for rho, name in sweep.points]
            stats = [(rho, name, s) for rho, name, s in stats if s is not None]
            style = ("-", "--", ":", "-.")[i % 4]
            ax.plot([rho for rho, _, _ in stats], [s.mean for _, _, s in stats], color="black", linestyle=style)
            extra.setdefault(sweep.label, Line2D([], [], color="black", linestyle=style, marker="o",
                                                 label=f"{sweep.label}, rho sweep"))
            for rho, name, s in stats:
                ax.errorbar([rho], [s.mean], yerr=[s.std], color=colors[name], marker="o", capsize=3)
            for ref in sweep.references:
                s = group_stat(groups[ref], sources)
                if s is None:
                    continue
                ax.axhline(s.mean, color=colors[ref], linestyle="--")
                extra.setdefault(ref, Line2D([], [], color=colors[ref], linestyle="--", label=f"{ref} (rho = 0)"))
        ax.set_xscale("log")
        ax.set(xlabel="rho (log scale)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("rho sweep (points: mean over seeds, bars: std)")
    shown = {name: runs for name, runs in groups.items()
             if any(name == n for sweep in sweeps for _, n in sweep.points)}
    _legend_below(fig, shown, colors, list(extra.values()))
    return _save(fig, path, len(shown) + len(extra))
