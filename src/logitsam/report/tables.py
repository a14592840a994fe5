"""Tables over variants: summary, eval metrics, cost; rho sweeps; Markdown rendering.

Rows are plain dicts. A cell is a ``Stat`` (mean ± sample std over seeds), a number, a string or None
(not logged); ``format_cell`` renders each the same way in Markdown, HTML and the CLI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

from logitsam.report.runs import (
    ACCURACY,
    CHOSEN_DELTA,
    DISPLACEMENT,
    Run,
    Stat,
    comparable_config,
    derive_variant,
    group_stat,
    pick_baseline,
    seed_stat,
)

LABELS = {
    "variant": "variant",
    "seeds": "seeds",
    "eval_accuracy": "eval accuracy",
    "chosen_delta": "chosen Δ vs ref",
    "displacement_rate": "displacement rate",
    "device": "device",
    "seconds_per_step": "s/step",
    "peak_memory_gib": "peak memory (GiB)",
    "step_ratio": "s/step vs baseline",
    "memory_ratio": "memory vs baseline",
    "metric": "metric",
}
# throughput keys of an eval record: cost, not a metric
_EVAL_SPEED_KEYS = frozenset({"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"})
# a judge name may hold '/': ``llm:Qwen/Qwen2.5-7B-Instruct``, ``reward:org/model``
_WIN_RATE = re.compile(r"^winrate/(.+)/win_rate$")
# per judge, the summary's columns after its win rate: (column prefix, label, eval_results key suffix)
_JUDGE_COLUMNS = (("win_rate_ci", "Wilson 95 % CI", None), ("invalid", "invalid verdicts", "invalid"),
                  ("length_adjusted", "length-adjusted win rate", "length_adjusted_win_rate"))


def format_cell(value) -> str:
    """``Stat`` -> "mean ± std" (4 and 2 significant digits; the mean alone for one seed), None -> "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, Stat):
        return format_cell(value.mean) if value.n == 1 else f"{value.mean:.4g} ± {value.std:.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def column_label(column: str) -> str:
    """The header of a column: ``LABELS``, or for a judge's column (``win_rate/<judge>``, ...) its label and judge."""
    if column in LABELS:
        return LABELS[column]
    prefix, _, judge = column.partition("/")
    labels = {"win_rate": "win rate", **{name: label for name, label, _ in _JUDGE_COLUMNS}}
    return f"{labels[prefix]} ({judge})" if judge and prefix in labels else column


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of rows (columns: the union of the rows' keys in first-seen order)."""
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    out = [line(column_label(c) for c in columns), "|" + "|".join("---" for _ in columns) + "|"]
    out += [line(format_cell(row.get(c)) for c in columns) for row in rows]
    return "\n".join(out) + "\n"


def _ratio(stat: Stat | None, base: Stat | None) -> float | None:
    if stat is None or base is None or base.mean == 0 or not math.isfinite(base.mean):
        return None
    return stat.mean / base.mean


def _info_stat(runs: Sequence[Run], key: str, scale: float = 1.0) -> Stat | None:
    values = [float(r.info[key]) / scale for r in runs if r.info.get(key) is not None]
    return seed_stat(values)


def judges_of(groups: dict[str, list[Run]]) -> list[str]:
    """Every judge with a win rate in any eval_results.json (``winrate/<judge>/win_rate``), sorted by name."""
    return sorted({m.group(1) for runs in groups.values() for r in runs for k in r.eval_results
                   if (m := _WIN_RATE.match(k))})


def _interval_cell(runs: Sequence[Run], judge: str) -> str | None:
    """The per-run Wilson interval ``[low, high]``; over several seeds, the mean of each bound."""
    lows = [r.eval_results[f"winrate/{judge}/ci_low"] for r in runs if f"winrate/{judge}/ci_low" in r.eval_results]
    highs = [r.eval_results[f"winrate/{judge}/ci_high"] for r in runs
             if f"winrate/{judge}/ci_high" in r.eval_results]
    if not lows or len(lows) != len(highs):
        return None
    cell = f"[{format_cell(sum(lows) / len(lows))}, {format_cell(sum(highs) / len(highs))}]"
    return cell if len(lows) == 1 else f"{cell} (mean of {len(lows)})"


def judge_cells(runs: Sequence[Run], judge: str, present: set[str]) -> dict:
    """A variant's columns for one judge: win rate (mean ± std over seeds), its Wilson interval, and the
    invalid-verdict count and length-adjusted win rate of LLM judges; only the columns ``present`` in any run."""
    cells = {f"win_rate/{judge}": group_stat(runs, [("eval_results", f"winrate/{judge}/win_rate")])}
    for name, _, suffix in _JUDGE_COLUMNS:
        if f"{name}/{judge}" not in present:
            continue
        cells[f"{name}/{judge}"] = _interval_cell(runs, judge) if suffix is None else \
            group_stat(runs, [("eval_results", f"winrate/{judge}/{suffix}")])
    return cells


def _judge_columns(groups: dict[str, list[Run]], judge: str) -> set[str]:
    keys = {k for runs in groups.values() for r in runs for k in r.eval_results}
    present = {f"win_rate_ci/{judge}"} if f"winrate/{judge}/ci_low" in keys else set()
    return present | {f"{name}/{judge}" for name, _, suffix in _JUDGE_COLUMNS
                      if suffix is not None and f"winrate/{judge}/{suffix}" in keys}


def summary_table(groups: dict[str, list[Run]], baseline: str | None = None) -> list[dict]:
    """One row a variant: seeds, final eval accuracy, chosen Δ vs ref, displacement, per judge its win rate
    (``win_rate/<judge>``) with its Wilson interval (and an LLM judge's invalid verdicts and length-adjusted win
    rate), cost ratios.

    Each number is the final value of a run (the last eval record if it was logged, else the last train
    record or eval_results.json), then mean ± sample std over seeds. Ratios divide the variant's mean
    seconds per step and peak memory (run_info.json) by the baseline's.
    """
    base = pick_baseline(groups, baseline)
    base_step = _info_stat(groups[base], "seconds_per_step")
    base_mem = _info_stat(groups[base], "peak_memory_bytes")
    judges = {judge: _judge_columns(groups, judge) for judge in judges_of(groups)}
    rows = []
    for name, runs in groups.items():
        row = {
            "variant": name + (" (baseline)" if name == base else ""),
            "seeds": len(runs),
            "eval_accuracy": group_stat(runs, ACCURACY),
            "chosen_delta": group_stat(runs, CHOSEN_DELTA),
            "displacement_rate": group_stat(runs, DISPLACEMENT),
        }
        for judge, present in judges.items():
            row.update(judge_cells(runs, judge, present))
        row["step_ratio"] = _ratio(_info_stat(runs, "seconds_per_step"), base_step)
        row["memory_ratio"] = _ratio(_info_stat(runs, "peak_memory_bytes"), base_mem)
        rows.append(row)
    return rows


def cost_table(groups: dict[str, list[Run]], baseline: str | None = None) -> list[dict]:
    """One row a variant: device, seconds per step, peak memory (GiB), and both as ratios to the baseline."""
    base = pick_baseline(groups, baseline)
    base_step = _info_stat(groups[base], "seconds_per_step")
    base_mem = _info_stat(groups[base], "peak_memory_bytes")
    rows = []
    for name, runs in groups.items():
        step = _info_stat(runs, "seconds_per_step")
        mem = _info_stat(runs, "peak_memory_bytes")
        devices = sorted({str(r.info["device"]) for r in runs if r.info.get("device")})
        rows.append({
            "variant": name + (" (baseline)" if name == base else ""),
            "device": ", ".join(devices) or None,
            "seconds_per_step": step,
            "peak_memory_gib": None if mem is None else Stat(mem.mean / 2**30, mem.std / 2**30, mem.n),
            "step_ratio": _ratio(step, base_step),
            "memory_ratio": _ratio(mem, base_mem),
        })
    return rows


def eval_metric_keys(groups: dict[str, list[Run]]) -> list[tuple[str, str]]:
    """(source, key) of every metric of the final eval records, then of every eval_results.json key."""
    keys: dict[tuple[str, str], None] = {}
    for runs in groups.values():
        for run in runs:
            if run.eval:
                keys.update((("eval", k), None) for k in run.eval[-1]
                            if k.startswith("eval_") and k not in _EVAL_SPEED_KEYS)
    for runs in groups.values():
        for run in runs:
            keys.update((("eval_results", k), None) for k in run.eval_results)
    return list(keys)


def eval_table(groups: dict[str, list[Run]]) -> list[dict]:
    """One row a metric, one column a variant: mean ± std over seeds of the final eval values."""
    rows = []
    for source, key in eval_metric_keys(groups):
        row = {"metric": key}
        for name, runs in groups.items():
            row[name] = group_stat(runs, [(source, key)])
        rows.append(row)
    return rows


# ---- rho sweeps ---------------------------------------------------------------------------------

class Sweep(NamedTuple):
    """Variants whose configs differ only in ``sam_rho`` (rho > 0), and their rho = 0 references."""

    label: str
    points: list[tuple[float, str]]  # (rho, variant), sorted by rho
    references: list[str]  # variants with sam: none, or sam_rho: 0, and otherwise the same config


def rho_sweeps(groups: dict[str, list[Run]]) -> list[Sweep]:
    """Families of at least two SAM variants with the same config up to ``sam_rho`` (and seeds)."""
    families: dict[str, list[tuple[float, str]]] = {}
    zero: dict[str, list[str]] = {}
    for name, runs in groups.items():
        run = runs[0]
        if not run.config or run.sam == "none" or run.rho is None:
            continue
        if run.rho == 0:
            zero.setdefault(comparable_config(run.config), []).append(name)
        else:
            families.setdefault(comparable_config(run.config), []).append((run.rho, name))
    sweeps = []
    for signature, points in families.items():
        if len({rho for rho, _ in points}) < 2:
            continue
        family_cfg = groups[points[0][1]][0].config
        no_sam = comparable_config(family_cfg, drop_sam=True)
        refs = [name for name, runs in groups.items()
                if runs[0].config and runs[0].sam == "none" and comparable_config(runs[0].config, True) == no_sam]
        sweeps.append(Sweep(derive_variant(family_cfg), sorted(points), refs + zero.get(signature, [])))
    return sweeps
