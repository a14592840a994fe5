"""``build_report``: run directories in, report.md + self-contained report.html + plots/*.png out.

The report is first laid out as sections of paragraphs, tables and figures; the Markdown and the HTML
writers render that one layout, so the two files always say the same thing.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from logitsam._atomic import write_text as atomic_write_text
from logitsam.report import plots
from logitsam.report.runs import group_runs, load_run, pick_baseline
from logitsam.report.tables import (
    column_label,
    cost_table,
    eval_table,
    format_cell,
    format_table,
    rho_sweeps,
    summary_table,
)


@dataclass
class Table:
    rows: list[dict]


@dataclass
class Figure:
    path: Path  # under output_dir/plots
    title: str
    caption: str


Block = str | Table | Figure  # a str is a paragraph


def _figures(groups, sweeps, plot_dir: Path) -> list[Figure]:
    n = {len(runs) for runs in groups.values()}
    seeds = f"{min(n)}" if len(n) == 1 else f"{min(n)}-{max(n)}"
    chosen, _, _ = plots.logp_keys(groups)
    logps_as = "change vs the reference" if chosen.endswith("delta_ref") else "raw, no squeeze/ metrics logged"
    wanted = [
        (plots.plot_training_curves(groups, plot_dir / "training_curves.png"), "Training curves",
         f"Train loss, reward accuracy and reward margin against step; lines are the mean over {seeds} seed(s) "
         "per variant, bands span min to max."),
        (plots.plot_logps(groups, plot_dir / "logps.png"), "Log-probability trajectories",
         f"Chosen and rejected log-probs ({logps_as}) and the argmax-token probability of chosen responses "
         "against step; a falling chosen curve is likelihood displacement."),
        (plots.plot_displacement(groups, plot_dir / "displacement_rate.png"), "Displacement rate",
         "Fraction of pairs whose chosen log-prob fell below the reference's (squeeze/displacement_rate) "
         "against step, mean over seeds with a min-max band."),
        (plots.plot_rho_sweep(groups, sweeps, plot_dir / "rho_sweep.png"), "rho sweep",
         "Final eval accuracy and final chosen Δ vs the reference against the SAM radius rho (log axis) for "
         "variants that differ only in sam_rho; dashed lines are the same config without SAM (rho = 0)."),
    ]
    return [Figure(path, title, caption) for path, title, caption in wanted if path is not None]


def _layout(runs, groups, baseline: str, figures: list[Figure], summary, evals, costs) -> list[tuple[str, list]]:
    n_missing = sum(1 for r in runs if r.notes)
    intro = (f"{len(runs)} run(s) in {len(groups)} variant(s); baseline for the cost ratios: {baseline}. "
             "Numbers are final values, mean ± sample std over seeds.")
    run_rows = [{"run": str(r.path), "variant": r.variant, "seed": r.seed, "train records": len(r.train),
                 "eval records": len(r.eval), "notes": "; ".join(r.notes)}
                for members in groups.values() for r in members]
    sections: list[tuple[str, list[Block]]] = [("Summary", [intro, Table(summary)])]
    sections += [(fig.title, [fig]) for fig in figures]
    sections.append(("Eval metrics", [
        "Final eval record of each run (metrics.jsonl) and eval_results.json, mean ± std over seeds.",
        Table(evals) if evals else "No eval records or eval_results.json found."]))
    sections.append(("Cost", [
        "Seconds per step and peak memory from run_info.json; ratios divide by the baseline's mean.",
        Table(costs)]))
    runs_note = f"{n_missing} run(s) lack some files (see notes)." if n_missing else "Every run has all files."
    sections.append(("Runs", [runs_note, Table(run_rows)]))
    return sections


def _markdown(title: str, sections, out_dir: Path) -> str:
    out = [f"# {title}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, Table):
                out.append(format_table(block.rows))
            elif isinstance(block, Figure):
                rel = block.path.relative_to(out_dir).as_posix()
                out += [f"![{block.title}]({rel})", "", f"*{block.caption}*", ""]
            else:
                out += [block, ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
td { white-space: nowrap; }
th { background: #f2f2f2; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-style: italic; color: #555; margin-top: 0.3em; }
"""


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>(no rows)</em></p>"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(column_label(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(title: str, sections) -> str:
    e = html.escape
    parts = [f"<h1>{e(title)}</h1>"]
    for heading, blocks in sections:
        parts.append(f"<h2>{e(heading)}</h2>")
        for block in blocks:
            if isinstance(block, Table):
                parts.append(_html_table(block.rows))
            elif isinstance(block, Figure):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.title)}">'
                             f"<figcaption>{e(block.caption)}</figcaption></figure>")
            else:
                parts.append(f"<p>{e(block)}</p>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def build_report(run_dirs: Sequence[str | Path], output_dir: str | Path, *, title: str = "logitsam report",
                 baseline: str | None = None) -> dict:
    """Compare finished runs: write report.md, report.html (self-contained) and plots/*.png to output_dir.

    Args:
        run_dirs: run directories (metrics.jsonl, logitsam_config.yaml, run_info.json, eval_results.json;
            each optional, at least one present). Runs of one variant with different seeds are averaged.
        output_dir: created if missing; existing report files are overwritten.
        title: the report's heading.
        baseline: the variant the cost ratios divide by (default: the first with ``sam: none``, else the
            first variant).

    Returns:
        ``{"markdown", "html", "plots", "summary", "eval", "cost", "baseline", "variants"}``: the two report
        paths, the PNG paths, the table rows, the baseline variant and each variant's run directories.
    """
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    groups = group_runs(runs)
    base = pick_baseline(groups, baseline)
    out_dir = Path(output_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)

    figures = _figures(groups, rho_sweeps(groups), plot_dir)
    summary, evals, costs = summary_table(groups, base), eval_table(groups), cost_table(groups, base)
    sections = _layout(runs, groups, base, figures, summary, evals, costs)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, _markdown(title, sections, out_dir))
    atomic_write_text(html_path, _html(title, sections))
    return {
        "markdown": md_path,
        "html": html_path,
        "plots": [fig.path for fig in figures],
        "summary": summary,
        "eval": evals,
        "cost": costs,
        "baseline": base,
        "variants": {name: [r.path for r in members] for name, members in groups.items()},
    }
