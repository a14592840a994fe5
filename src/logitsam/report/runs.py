"""Finished run directories on disk -> ``Run`` records, variants, seed statistics and curves.

A run directory holds (each file optional, at least one present):

- ``metrics.jsonl``: one log record a line; train records carry ``loss``, eval records ``eval_*`` keys.
- ``logitsam_config.yaml``: the run's flat config (``sam``, ``sam_rho``, ``loss_type``, ``seed``, ...).
- ``run_info.json``: ``variant``, ``seed``, ``seconds_per_step``, ``peak_memory_bytes``, ``device``.
- ``eval_results.json``: a flat dict of floats from ``logitsam eval``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

logger = logging.getLogger(__name__)

RUN_FILES = ("metrics.jsonl", "logitsam_config.yaml", "run_info.json", "eval_results.json")
# config keys that may differ between runs of one experiment without changing what is compared
_RUN_LOCAL_KEYS = frozenset({"seed", "data_seed", "output_dir", "run_name", "logging_dir",
                             "resume_from_checkpoint", "hub_model_id"})


@dataclass
class Run:
    """One finished run directory; ``notes`` lists what was missing or dropped while reading it."""

    path: Path
    variant: str
    seed: int | None
    config: dict = field(default_factory=dict)
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    eval_results: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def sam(self) -> str:
        return str(self.config.get("sam", "none"))

    @property
    def rho(self) -> float | None:
        rho = self.config.get("sam_rho")
        return None if rho is None else float(rho)


class Stat(NamedTuple):
    """Mean and sample standard deviation (n - 1) over ``n`` seeds; std is 0.0 for one seed."""

    mean: float
    std: float
    n: int


def seed_stat(values: Iterable[float]) -> Stat | None:
    """Mean and sample std of the values, or None when there are none (a NaN propagates to both)."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    mean = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return Stat(mean, 0.0, 1)
    var = math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return Stat(mean, math.sqrt(var), len(xs))


def derive_variant(config: dict) -> str:
    """A variant name from the config: ``dpo``, ``ipo+sft``, ``dpo+logits-sam``, ``dpo+full-sam-asam``."""
    loss = config.get("loss_type", "sigmoid")
    names = [loss] if isinstance(loss, str) else list(loss)
    name = "+".join("dpo" if n == "sigmoid" else str(n) for n in names)
    sam = str(config.get("sam", "none"))
    if sam == "none":
        return name
    name += f"+{sam}-sam"
    variant = config.get("sam_variant") or ("asam" if config.get("sam_asam") else
                                            "adaptive" if config.get("sam_adaptive") else "plain")
    if variant != "plain":
        name += f"-{variant}"
    return name


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_metrics(path: Path, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """Train records (with ``loss``) and eval records (with ``eval_*`` keys); bad lines are counted and noted."""
    train, evals, bad = [], [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # most often the last line of a run killed mid-write
            continue
        if not isinstance(record, dict):
            bad += 1
            continue
        if "loss" in record:
            train.append(record)
        elif any(k.startswith("eval_") for k in record):
            evals.append(record)
    if bad:
        notes.append(f"metrics.jsonl: dropped {bad} unreadable line(s)")
        logger.warning("%s: dropped %d unreadable line(s)", path, bad)
    return train, evals


def load_run(path: str | Path) -> Run:
    """Read one run directory; missing optional files become empty fields and a note."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"run directory {path} does not exist or is not a directory")
    present = [name for name in RUN_FILES if (path / name).is_file()]
    if not present:
        raise ValueError(f"{path} is not a run directory: none of {list(RUN_FILES)} found")
    notes = [f"no {name}" for name in RUN_FILES if name not in present]

    config = {}
    if "logitsam_config.yaml" in present:
        config = yaml.safe_load((path / "logitsam_config.yaml").read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'logitsam_config.yaml'}: expected a mapping, got {type(config).__name__}")
    train, evals = _read_metrics(path / "metrics.jsonl", notes) if "metrics.jsonl" in present else ([], [])
    info = _read_json(path / "run_info.json") if "run_info.json" in present else {}
    results = _read_json(path / "eval_results.json") if "eval_results.json" in present else {}
    # numbers only: `logitsam eval` also records which model, reference and data it used
    results = {k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}

    variant = info.get("variant") or (derive_variant(config) if config else None)
    if variant is None:
        variant = path.name
        notes.append("variant unknown (no run_info.json variant, no config): named after the directory")
    seed = info.get("seed", config.get("seed"))
    return Run(path=path, variant=str(variant), seed=None if seed is None else int(seed), config=config,
               train=train, eval=evals, info=info, eval_results=results, notes=notes)


def find_run_dirs(root: str | Path) -> list[Path]:
    """Directories under root (root included) that hold at least one run file, sorted."""
    root = Path(root)
    dirs = {p.parent for name in RUN_FILES for p in root.rglob(name)}
    return sorted(dirs)


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by variant, in order of first appearance.

    A variant whose SAM runs use several ``sam_rho`` values (a rho sweep named by one variant) is split
    into ``"<variant> (rho=<rho>)"`` groups, so that seeds are only ever averaged at one rho.
    """
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.variant, []).append(run)
    groups: dict[str, list[Run]] = {}
    for name, members in by_name.items():
        rhos = {r.rho for r in members if r.sam != "none"}
        if len(rhos) <= 1:
            groups[name] = members
            continue
        logger.info("variant %r holds %d sam_rho values: split by rho", name, len(rhos))
        for run in members:
            split = name if run.sam == "none" else f"{name} (rho={run.rho:g})"
            groups.setdefault(split, []).append(dataclasses.replace(run, variant=split))
    return groups


def pick_baseline(groups: dict[str, list[Run]], baseline: str | None = None) -> str:
    """The named baseline, else the first variant trained with ``sam: none``, else the first variant."""
    if not groups:
        raise ValueError("no runs to compare")
    if baseline is not None:
        if baseline not in groups:
            raise ValueError(f"baseline {baseline!r} is not one of the variants {list(groups)}")
        return baseline
    for name, members in groups.items():
        if all(r.config and r.sam == "none" for r in members):
            return name
    return next(iter(groups))


def comparable_config(config: dict, drop_sam: bool = False) -> str:
    """The config minus run-local keys (seed, output_dir, ...) and sam_rho, as a hashable string."""
    kept = {k: v for k, v in config.items()
            if k not in _RUN_LOCAL_KEYS and k != "sam_rho" and not (drop_sam and k.startswith("sam"))}
    return json.dumps(kept, sort_keys=True, default=str)


# ---- values -------------------------------------------------------------------------------------

def last_value(records: Sequence[dict], key: str) -> float | None:
    """The value of key in the last record that has it."""
    for record in reversed(records):
        if key in record and record[key] is not None:
            return float(record[key])
    return None


# Where each summary number comes from, in order of preference: (field of Run, key).
ACCURACY = (("eval", "eval_rewards/accuracies"), ("eval_results", "eval/preference_accuracy"))
CHOSEN_DELTA = (("eval", "eval_squeeze/chosen_delta_ref"), ("eval_results", "shift/chosen_delta_ref"),
                ("train", "squeeze/chosen_delta_ref"))
DISPLACEMENT = (("eval", "eval_squeeze/displacement_rate"), ("eval_results", "shift/displacement_rate"),
                ("train", "squeeze/displacement_rate"))


def run_value(run: Run, source: str, key: str) -> float | None:
    """The final value of key: last record of run.train / run.eval, or run.eval_results / run.info."""
    if source in ("train", "eval"):
        return last_value(getattr(run, source), key)
    value = getattr(run, source).get(key)
    return None if value is None else float(value)


def group_stat(runs: Sequence[Run], sources: Sequence[tuple[str, str]]) -> Stat | None:
    """Seed statistic of the first source any run has; runs without it are left out (``n`` says how many)."""
    for source, key in sources:
        values = [v for v in (run_value(r, source, key) for r in runs) if v is not None]
        if values:
            return seed_stat(values)
    return None


class Curve(NamedTuple):
    """A metric against step, aggregated over seeds: mean and min-max band."""

    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


def seed_curve(runs: Sequence[Run], key: str, split: str = "train") -> Curve | None:
    """Mean and min-max over the runs of key at each step any run logged it (None if none did)."""
    at: dict[int, list[float]] = {}
    for run in runs:
        for record in getattr(run, split):
            if record.get(key) is not None and "step" in record:
                at.setdefault(int(record["step"]), []).append(float(record[key]))
    if not at:
        return None
    steps = sorted(at)
    return Curve(steps, [math.fsum(at[s]) / len(at[s]) for s in steps],
                 [min(at[s]) for s in steps], [max(at[s]) for s in steps])
