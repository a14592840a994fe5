"""`logitsam compare`: several variants x seeds from one recipe, evaluated alike, in one report.

Each training run is a fresh process (``python -m logitsam.cli train``), so peak memory and step time
are measured per run; every seed gives every variant the same data order (Trainer's seeded sampler).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ._atomic import write_text as atomic_write_text

logger = logging.getLogger("logitsam.compare")

DEFAULT_VARIANTS = ("dpo:sam=none", "dpo+logits-sam:sam=logits", "dpo+full-sam:sam=full")


@dataclass
class Variant:
    name: str
    overrides: dict = field(default_factory=dict)


def parse_variant(spec: str) -> Variant:
    """``"name:key=value,key=value"`` -> Variant (``"name"`` alone: no overrides)."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"variant {spec!r}: expected key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    if not name:
        raise ValueError(f"variant {spec!r} has no name")
    return Variant(name, overrides)


def rho_sweep_variants(rhos, base_name: str = "logits-sam") -> list[Variant]:
    return [Variant(f"{base_name} rho={rho:g}", {"sam": "logits", "sam_rho": f"{rho:g}"}) for rho in rhos]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def train_command(config: str | Path | None, overrides: dict, run_dir: Path) -> list[str]:
    """``python -m logitsam.cli train [--config FILE] --key value ... --output_dir RUN_DIR``."""
    cmd = [sys.executable, "-m", "logitsam.cli", "train"]
    if config:
        cmd += ["--config", str(config)]
    for key, value in {**overrides, "output_dir": str(run_dir)}.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_logged(cmd: list[str], log_path: Path, *, what: str) -> None:
    """Run ``cmd`` in a fresh process with stdout and stderr in ``log_path``; a failure raises with the log's tail."""
    logger.info("%s (log %s)", what, log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def train_run(config: str | None, overrides: dict, run_dir: Path, *, log_path: Path) -> None:
    run_logged(train_command(config, overrides, run_dir), log_path, what=f"training {run_dir}")


def run_compare(config: str | None, output_dir: str | Path, *, variants: list[Variant], seeds: list[int],
                overrides: dict | None = None, eval_kwargs: dict | None = None, title: str = "logitsam compare",
                baseline: str | None = None, skip_existing: bool = True) -> dict:
    """Train every variant for every seed, evaluate each run, and build the report."""
    from .report import build_report, format_table

    out = Path(output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for seed in seeds:
        for variant in variants:
            run_dir = out / "runs" / _slug(variant.name) / f"seed-{seed}"
            done = (run_dir / "run_info.json").exists()
            if not (done and skip_existing):
                if run_dir.exists():  # a new run replaces the old one whole: no stale eval, samples or checkpoints
                    logger.info("replacing the earlier run in %s", run_dir)
                    shutil.rmtree(run_dir)
                params = {**(overrides or {}), **variant.overrides, "seed": seed, "variant": variant.name}
                train_run(config, params, run_dir, log_path=out / "logs" / f"{_slug(variant.name)}-seed{seed}.log")
            else:
                logger.info("reusing finished run %s", run_dir)
            if eval_kwargs and not (run_dir / "eval_results.json").exists():
                from .eval.run import evaluate

                evaluate(str(run_dir), output_dir=run_dir, seed=seed, **eval_kwargs)
            run_dirs.append(run_dir)
    result = build_report(run_dirs, out, title=title, baseline=baseline)
    table = format_table(result["summary"])
    atomic_write_text(out / "summary.md", table + "\n")
    return {**result, "table": table, "run_dirs": [str(d) for d in run_dirs]}
