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
    "win_rate": "win rate",
    "device": "device",
    "seconds_per_step": "s/step",
    "peak_memory_gib": "peak memory (GiB)",
    "step_ratio": "s/step vs baseline",
    "memory_ratio": "memory vs baseline",
    "metric": "metric",
}
# throughput keys of an eval record: cost, not a metric
_EVAL_SPEED_KEYS = frozenset({"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"})
_WIN_RATE = re.compile(r"^winrate/([^/]+)/win_rate$")


def format_cell(value) -> str:
    """``Stat`` -> "mean ± std" (4 and 2 significant digits; the mean alone for one seed), None -> "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, Stat):
        return format_cell(value.mean) if value.n == 1 else f"{value.mean:.4g} ± {value.std:.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of rows (columns: the union of the rows' keys in first-seen order)."""
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    out = [line(LABELS.get(c, c) for c in columns), "|" + "|".join("---" for _ in columns) + "|"]
    out += [line(format_cell(row.get(c)) for c in columns) for row in rows]
    return "\n".join(out) + "\n"


def _ratio(stat: Stat | None, base: Stat | None) -> float | None:
    if stat is None or base is None or base.mean == 0 or not math.isfinite(base.mean):
        return None
    return stat.mean / base.mean


def _info_stat(runs: Sequence[Run], key: str, scale: float = 1.0) -> Stat | None:
    values = [float(r.info[key]) / scale for r in runs if r.info.get(key) is not None]
    return seed_stat(values)


def _win_rate_key(groups: dict[str, list[Run]]) -> str | None:
    """The first judge's win-rate key (sorted by judge name) found in any eval_results.json."""
    keys = sorted({k for runs in groups.values() for r in runs for k in r.eval_results if _WIN_RATE.match(k)})
    return keys[0] if keys else None


def summary_table(groups: dict[str, list[Run]], baseline: str | None = None) -> list[dict]:
    """One row a variant: seeds, final eval accuracy, chosen Δ vs ref, displacement, win rate, cost ratios.

    Each number is the final value of a run (the last eval record if it was logged, else the last train
    record or eval_results.json), then mean ± sample std over seeds. Ratios divide the variant's mean
    seconds per step and peak memory (run_info.json) by the baseline's.
    """
    base = pick_baseline(groups, baseline)
    base_step = _info_stat(groups[base], "seconds_per_step")
    base_mem = _info_stat(groups[base], "peak_memory_bytes")
    win_key = _win_rate_key(groups)
    rows = []
    for name, runs in groups.items():
        row = {
            "variant": name + (" (baseline)" if name == base else ""),
            "seeds": len(runs),
            "eval_accuracy": group_stat(runs, ACCURACY),
            "chosen_delta": group_stat(runs, CHOSEN_DELTA),
            "displacement_rate": group_stat(runs, DISPLACEMENT),
        }
        if win_key is not None:
            row["win_rate"] = group_stat(runs, [("eval_results", win_key)])
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
