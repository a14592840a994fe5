"""The paper's Fig. 1c analogue on a real model: chosen, rejected and argmax-token (y*) log-probs.

Reads the ``metrics.jsonl`` of finished runs (per-token means logged by the trainer from the clean head
pass) and draws one panel per quantity, one line per run.
"""

from __future__ import annotations

from pathlib import Path

from .runs import load_run

CURVES = (
    ("squeeze/chosen_logps_per_token", "log p(y+) per token (chosen)"),
    ("squeeze/rejected_logps_per_token", "log p(y-) per token (rejected)"),
    ("squeeze/argmax_logp_chosen", "log p(y*) per token (argmax, on chosen)"),
)


def curves(run_dir) -> dict[str, tuple[list[int], list[float]]]:
    """Step -> value per quantity, from the eval records (a fixed held-out set: true trajectories) when
    the run logged any, else from the training batches (a different batch every step)."""
    run = load_run(run_dir)
    out = {}
    for key, _ in CURVES:
        points = [(r["step"], r["eval_" + key]) for r in run.eval if "eval_" + key in r]
        if not points:
            points = [(r["step"], r[key]) for r in run.train if key in r]
        out[key] = ([s for s, _ in points], [v for _, v in points])
    return out


def plot_fig1c(run_dirs: dict[str, str | Path], path: str | Path, *, title: str) -> dict:
    """One line per named run in three panels; returns first/last values per run and quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_logprob_panels

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    summary = {}
    for name, run_dir in run_dirs.items():
        data = curves(run_dir)
        summary[name] = {}
        for ax, (key, label) in zip(axes, CURVES, strict=True):
            steps, values = data[key]
            ax.plot(steps, values, marker="o", ms=2, label=name)
            ax.set_title(label)
            if values:
                summary[name][key] = {"first": values[0], "last": values[-1], "change": values[-1] - values[0]}
    save_logprob_panels(fig, axes, path, title=title, caption="Per-token log-probs on a fixed held-out set "
                        "(unperturbed head) every few steps; squeezing shows as log p(y*) rising while log p(y+) "
                        "falls.")
    return summary
