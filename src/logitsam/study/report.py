"""The study's report from its committed run folders: the Table-3 analogue and the Fig.-1c analogue.

Reads ``<study>/runs/<run_id>/`` (the small files `logitsam study` keeps) and ``<study>/study.yaml``; trains
nothing. Writes beside them (or into another folder, ``build_study_report(..., output_dir)``):

- ``summary.md``: per cell, each metric per rho as mean [95 % t-interval] over seeds, and the paired
  difference to the cell's rho = 0 (else the main grid's rho = 0), seed by seed, with its interval;
- ``summary.json``: the same numbers, machine-readable;
- ``fig1c.png``: per-token log-probs of chosen, rejected and y* on the fixed held-out set against the step,
  mean over seeds with a 95 % band, for rho = 0, the best rho and the largest (or ``report.figure_rhos``);
- ``fig1c_paired.png``: the same three quantities as paired differences to the baseline (same seed, same
  step), mean with a 95 % band, for every rho > 0 of every cell: the effect itself, without the spread
  between seeds that the unpaired bands of ``fig1c.png`` carry.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import yaml

from .._atomic import write_json as atomic_write_json
from .._atomic import write_text as atomic_write_text
from ..report.fig1c import CURVES
from ..report.runs import Run, load_run
from .plan import MAIN, rho_tag
from .stats import Interval, mean_interval, paired_difference

YSTAR = "eval_squeeze/argmax_logp_chosen"


def _result(key: str) -> Callable[[Run], float | None]:
    return lambda run: run.eval_results.get(key)


def _info(key: str) -> Callable[[Run], float | None]:
    return lambda run: run.info.get(key)


def ystar_change(run: Run) -> float | None:
    """Change of the per-token log-prob of the argmax token y* on the held-out chosen responses, from the
    step-0 eval (the initial model) to the last eval of the run; None without a step-0 record."""
    records = [r for r in run.eval if r.get(YSTAR) is not None]
    if not records or records[0].get("step") != 0:
        return None
    return float(records[-1][YSTAR]) - float(records[0][YSTAR])


# (name, label, how to read it from one run); a metric no run has is left out of the table
METRICS: tuple[tuple[str, str, Callable[[Run], float | None]], ...] = (
    ("accuracy", "held-out preference accuracy", _result("eval/preference_accuracy")),
    ("chosen_delta", "chosen Δ log-prob vs initial", _result("shift/chosen_delta_ref")),
    ("rejected_delta", "rejected Δ log-prob vs initial", _result("shift/rejected_delta_ref")),
    ("displacement_rate", "displacement rate (chosen down)", _result("shift/displacement_rate")),
    ("both_down_rate", "both-down rate", _result("shift/both_down_rate")),
    ("ystar_delta", "y* Δ log-prob per token", ystar_change),
    ("win_rate", "VADER win rate vs initial", _result("winrate/vader/win_rate")),
    ("seconds_per_step", "s/step", _info("seconds_per_step")),
    ("hessian_trace", "parameter-Hessian trace (Hutchinson)", _result("flatness/hessian_trace")),
    ("logit_hessian_trace", "logit-Hessian trace", _result("flatness/logit_hessian_trace")),
)


# per judge other than VADER (whose win rate is in METRICS): (key suffix, label, paired with rho 0?); a judge
# name may hold '/' (``llm:Qwen/Qwen2.5-7B-Instruct``, ``reward:org/model``)
JUDGE_METRICS = (
    ("win_rate", "win rate vs initial", True),
    ("ci_low", "win rate, Wilson 95 % CI low", False),
    ("ci_high", "win rate, Wilson 95 % CI high", False),
    ("invalid", "invalid verdicts (pairs)", False),
    ("length_adjusted_win_rate", "length-adjusted win rate", True),
)
_JUDGE = re.compile(r"^winrate/(.+)/win_rate$")


def judges_of(runs: list[Run]) -> list[str]:
    """The judges other than VADER with a win rate in any run's eval_results.json, sorted by name."""
    return sorted({m.group(1) for run in runs for key in run.eval_results if (m := _JUDGE.match(key))} - {"vader"})


def metrics_of(runs: list[Run]) -> list[tuple[str, str, Callable[[Run], float | None], bool]]:
    """(name, label, getter, paired) of every row: ``METRICS`` (all paired), then ``JUDGE_METRICS`` for each
    judge in ``judges_of`` (named by their eval_results key, e.g. ``winrate/llm:org/model/win_rate``)."""
    rows = [(name, label, getter, True) for name, label, getter in METRICS]
    for judge in judges_of(runs):
        rows += [(f"winrate/{judge}/{suffix}", f"{judge} {label}", _result(f"winrate/{judge}/{suffix}"), paired)
                 for suffix, label, paired in JUDGE_METRICS]
    return rows


def load_study_runs(study_dir: str | Path) -> list[tuple[dict, Run]]:
    """(study_run.json record, Run) of every finished run under ``study_dir/runs``, sorted by run id."""
    out = []
    for record_path in sorted(Path(study_dir).glob("runs/*/study_run.json")):
        record = json.loads(record_path.read_text())
        out.append((record, load_run(record_path.parent)))
    return out


def _value(getter, run: Run) -> float | None:
    value = getter(run)
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def summarize(runs: list[tuple[dict, Run]]) -> list[dict]:
    """One entry per (cell, rho): seeds, each metric's ``Interval`` and its paired difference to the baseline,
    and each metric's ``labels`` (the rows of ``metrics_of``, in order)."""
    groups = _groups(runs)
    metrics = metrics_of([run for _, run in runs])
    cells = [MAIN] + sorted({c for c, _ in groups} - {MAIN})
    out = []
    for cell in cells:
        for rho in sorted(r for c, r in groups if c == cell):
            by_seed = groups[(cell, rho)]
            base_key = (cell, 0.0) if (cell, 0.0) in groups else (MAIN, 0.0)
            base = groups.get(base_key) if (cell, rho) != base_key else None
            entry = {"cell": cell, "rho": rho, "seeds": sorted(by_seed), "metrics": {}, "paired": {},
                     "baseline": None if base is None else {"cell": base_key[0], "rho": base_key[1]},
                     "labels": {name: label for name, label, _, _ in metrics}}
            for name, _, getter, paired in metrics:
                values = {s: v for s, r in by_seed.items() if (v := _value(getter, r)) is not None}
                entry["metrics"][name] = mean_interval(values.values())
                if base is not None and paired:
                    base_values = {s: v for s, r in base.items() if (v := _value(getter, r)) is not None}
                    entry["paired"][name] = paired_difference(values, base_values)
            out.append(entry)
    return out


def _num(x: float, sign: bool = False) -> str:
    return f"{x:+.4g}" if sign else f"{x:.4g}"


def format_interval(iv: Interval | None, sign: bool = False) -> str:
    """``0.594 [0.55, 0.64]``; one value alone for n = 1; ``n/a`` for none."""
    if iv is None:
        return "n/a"
    if iv.n == 1:
        return f"{_num(iv.mean, sign)} (1 seed)"
    return f"{_num(iv.mean, sign)} [{_num(iv.low, sign)}, {_num(iv.high, sign)}]"


def _group_label(entry: dict) -> str:
    return ("rho 0 (DPO)" if entry["rho"] == 0 else f"rho {rho_tag(entry['rho'])}") + f", n={len(entry['seeds'])}"


def format_tables(summary: list[dict]) -> str:
    """Markdown: per cell, a table of means and one of paired differences (metrics as rows, rhos as columns)."""
    parts = []
    for cell in dict.fromkeys(e["cell"] for e in summary):
        entries = [e for e in summary if e["cell"] == cell]
        labels = entries[0]["labels"]
        names = [(n, labels[n]) for n in labels if any(e["metrics"][n] is not None for e in entries)]
        parts.append(f"### {'main grid' if cell == MAIN else f'cell {cell}'}: mean [95 % t-interval] over seeds\n")
        parts.append("| metric | " + " | ".join(_group_label(e) for e in entries) + " |")
        parts.append("|---|" + "---:|" * len(entries))
        for name, label in names:
            parts.append(f"| {label} | " + " | ".join(format_interval(e["metrics"][name]) for e in entries) + " |")
        paired = [e for e in entries if e["paired"]]
        if paired:
            base = paired[0]["baseline"]
            base_name = f"rho 0 of {'the main grid' if base['cell'] == MAIN else 'cell ' + base['cell']}"
            parts.append(f"\n{'Main grid' if cell == MAIN else f'Cell {cell}'}: paired difference to {base_name} "
                         "(same seed), mean [95 % t-interval]\n")
            parts.append("| metric | " + " | ".join(f"{_group_label(e)} − rho 0" for e in paired) + " |")
            parts.append("|---|" + "---:|" * len(paired))
            for name, label in ((n, label) for n, label in names if n in paired[0]["paired"]):
                parts.append(f"| {label} | " + " | ".join(format_interval(e["paired"][name], sign=True)
                                                          for e in paired) + " |")
        parts.append("")
    return "\n".join(parts)


def figure_rhos(summary: list[dict], wanted: list | None = None) -> list[float]:
    """The main grid's rhos to draw: ``wanted``, else 0, the best rho (highest mean held-out accuracy) and the
    largest one."""
    main = {e["rho"]: e for e in summary if e["cell"] == MAIN}
    if wanted:
        return [float(r) for r in wanted if float(r) in main]
    picks = [0.0] if 0.0 in main else []
    scored = [(e["metrics"]["accuracy"].mean, -rho, rho) for rho, e in main.items()
              if rho > 0 and e["metrics"]["accuracy"] is not None]
    if scored:
        picks.append(max(scored)[2])
    if main and max(main) > 0:
        picks.append(max(main))
    return list(dict.fromkeys(picks))


def curve_bands(runs: list[Run], key: str) -> tuple[list[int], list[Interval]]:
    """Per eval step, the interval over the runs of ``key`` (the last record of a step wins: the end-of-run
    evaluate() repeats the last eval step)."""
    at: dict[int, list[float]] = {}
    for run in runs:
        for step, value in _step_values(run, key).items():
            at.setdefault(step, []).append(value)
    steps = sorted(at)
    return steps, [mean_interval(at[s]) for s in steps]


def plot_bands(runs: list[tuple[dict, Run]], rhos: list[float], path: Path, *, title: str) -> dict:
    """Three panels (chosen, rejected, y*), one line per rho with its band; returns first/last means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report.plots import save_logprob_panels

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    out = {}
    for rho in rhos:
        members = [run for record, run in runs if record["cell"] == MAIN and float(record["rho"]) == rho]
        seeds = f"{len(members)} seed" + ("s" if len(members) != 1 else "")
        label = f"{'DPO (rho 0)' if rho == 0 else f'logits-SAM rho {rho_tag(rho)}'}, {seeds}"
        out[rho_tag(rho)] = {}
        for ax, (key, panel) in zip(axes, CURVES, strict=True):
            steps, bands = curve_bands(members, "eval_" + key)
            if not steps:
                continue
            means = [b.mean for b in bands]
            (line,) = ax.plot(steps, means, marker="o", ms=2, label=label)
            if all(b.n > 1 for b in bands):
                ax.fill_between(steps, [b.low for b in bands], [b.high for b in bands], color=line.get_color(),
                                alpha=0.2, linewidth=0)
            ax.set_title(panel)
            out[rho_tag(rho)][key] = {"first": means[0], "last": means[-1], "change": means[-1] - means[0]}
    save_logprob_panels(fig, axes, path, title=title, caption="Fixed held-out pairs, unperturbed head, every "
                        "eval_steps; line: mean over seeds, band: 95 % t-interval. Squeezing shows as log p(y*) "
                        "rising while log p(y+) falls.")
    return out


def _groups(runs: list[tuple[dict, Run]]) -> dict[tuple[str, float], dict[int, Run]]:
    groups: dict[tuple[str, float], dict[int, Run]] = {}
    for record, run in runs:
        groups.setdefault((record["cell"], float(record["rho"])), {})[int(record["seed"])] = run
    return groups


def _step_values(run: Run, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in run.eval if r.get(key) is not None and "step" in r}


def paired_curve_bands(treatment: dict[int, Run], baseline: dict[int, Run],
                       key: str) -> tuple[list[int], list[Interval]]:
    """Per eval step, the interval over seeds of ``treatment[seed] - baseline[seed]`` at that step (seeds and
    steps both sides hold)."""
    at: dict[int, dict[int, float]] = {}
    for seed in sorted(set(treatment) & set(baseline)):
        base = _step_values(baseline[seed], key)
        for step, value in _step_values(treatment[seed], key).items():
            if step in base:
                at.setdefault(step, {})[seed] = value - base[step]
    steps = sorted(at)
    return steps, [mean_interval(at[s].values()) for s in steps]


def plot_paired_bands(runs: list[tuple[dict, Run]], path: Path, *, title: str) -> dict:
    """Three panels of paired differences to the baseline (the cell's rho 0, else the main grid's), one line
    per (cell, rho > 0); returns the last step's interval per line and quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report.plots import save_logprob_panels

    groups = _groups(runs)
    cells = [MAIN] + sorted({c for c, _ in groups} - {MAIN})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    out = {}
    for cell in cells:
        base_key = (cell, 0.0) if (cell, 0.0) in groups else (MAIN, 0.0)
        if base_key not in groups:
            continue
        for rho in sorted(r for c, r in groups if c == cell and r > 0):
            name = rho_tag(rho) if cell == MAIN else f"{cell}/{rho_tag(rho)}"
            label = f"{'' if cell == MAIN else cell + ': '}rho {rho_tag(rho)} − rho 0"
            out[name] = {}
            for ax, (key, panel) in zip(axes, CURVES, strict=True):
                steps, bands = paired_curve_bands(groups[(cell, rho)], groups[base_key], "eval_" + key)
                if not steps:
                    continue
                (line,) = ax.plot(steps, [b.mean for b in bands], marker="o", ms=2, label=label,
                                  linestyle="-" if cell == MAIN else "--")
                if all(b.n > 1 for b in bands):
                    ax.fill_between(steps, [b.low for b in bands], [b.high for b in bands],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
                ax.set_title("Δ " + panel)
                last = bands[-1]
                out[name][key] = {"step": steps[-1], "mean": last.mean, "n": last.n,
                                  "low": None if math.isnan(last.low) else last.low,
                                  "high": None if math.isnan(last.high) else last.high}
    for ax in axes:
        ax.axhline(0.0, color="black", linewidth=0.8)
    save_logprob_panels(fig, axes, path, title=title, caption="Paired by seed: logits-SAM minus its DPO baseline "
                        "at the same step on the fixed held-out pairs; line: mean over seeds, band: 95 % "
                        "t-interval. Above 0: higher log-prob than DPO.")
    return out


def _jsonable(summary: list[dict]) -> list[dict]:
    def iv(x):
        return None if x is None else {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                       for k, v in x._asdict().items()}

    return [{**{k: v for k, v in e.items() if k != "labels"}, "metrics": {k: iv(v) for k, v in e["metrics"].items()},
             "paired": {k: iv(v) for k, v in e["paired"].items()}} for e in summary]


def build_study_report(study_dir: str | Path, output_dir: str | Path | None = None) -> dict:
    """Write summary.md, summary.json, fig1c.png and fig1c_paired.png from ``study_dir``'s finished runs into
    ``output_dir`` (created if missing; default: ``study_dir`` itself). Nothing in ``study_dir`` is written
    when ``output_dir`` is elsewhere.

    Raises:
        ValueError: ``study_dir`` holds no finished run.
    """
    study_dir = Path(study_dir)
    out = study_dir if output_dir is None else Path(output_dir)
    runs = load_study_runs(study_dir)
    if not runs:
        raise ValueError(f"{study_dir}: no finished study runs (runs/*/study_run.json)")
    recipe = study_dir / "study.yaml"
    options = {}
    if recipe.is_file():
        options = (yaml.safe_load(recipe.read_text()) or {}).get("report") or {}
    name = study_dir.name
    summary = summarize(runs)
    rhos = figure_rhos(summary, options.get("figure_rhos"))
    title = options.get("title") or f"logitsam study {name}: DPO vs DPO + logits-SAM, Fig. 1c analogue"
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_bands(runs, rhos, out / "fig1c.png", title=title)
    paired = plot_paired_bands(runs, out / "fig1c_paired.png",
                               title=f"logitsam study {name}: logits-SAM minus DPO, paired by seed")
    tables = format_tables(summary)
    seeds = sorted({int(r["seed"]) for r, _ in runs})
    rebuild = f"logitsam report {study_dir}" + ("" if out == study_dir else f" --output_dir {out}")
    md = (f"# Study {name}\n\n{len(runs)} finished runs, seeds {seeds}. Rebuild with "
          f"`{rebuild}`.\n\n{tables}\n![Fig. 1c analogue](fig1c.png)\n\n"
          "![Fig. 1c analogue, paired differences to DPO](fig1c_paired.png)\n")
    atomic_write_text(out / "summary.md", md)
    atomic_write_json(out / "summary.json", {"groups": _jsonable(summary), "figure_rhos": rhos,
                                             "curves": curves, "paired_curves": paired}, indent=2)
    files = [out / n for n in ("summary.md", "summary.json", "fig1c.png", "fig1c_paired.png")]
    return {"files": [str(f) for f in files], "markdown": md, "summary": summary}
