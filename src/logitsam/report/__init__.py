"""Compare finished runs: tables, plots, and a Markdown + self-contained HTML report.

Reads run directories on disk (``metrics.jsonl``, ``logitsam_config.yaml``, ``run_info.json``,
``eval_results.json``) and imports no training code. Only ``build_report`` imports matplotlib.

    from logitsam.report import build_report
    out = build_report(["runs/dpo-s0", "runs/dpo-s1", "runs/sam-s0", "runs/sam-s1"], "report/")
    print(format_table(out["summary"]))
"""

from pathlib import Path

from logitsam.report.runs import Run, Stat, find_run_dirs, group_runs, load_run, pick_baseline
from logitsam.report.tables import cost_table, eval_table, format_table, rho_sweeps, summary_table


def build_report(run_dirs, output_dir: str | Path, *, title: str = "logitsam report",
                 baseline: str | None = None) -> dict:
    """Write report.md, report.html and plots/*.png to output_dir; see ``report/build.py``."""
    from logitsam.report.build import build_report as _build_report  # matplotlib only when drawing

    return _build_report(run_dirs, output_dir, title=title, baseline=baseline)


__all__ = [
    "Run",
    "Stat",
    "build_report",
    "cost_table",
    "eval_table",
    "find_run_dirs",
    "format_table",
    "group_runs",
    "load_run",
    "pick_baseline",
    "rho_sweeps",
    "summary_table",
]
