"""Run a study one training at a time, each in a fresh process, keeping only each run's small result files.

For every run of the plan, in order:

1. skip it when ``<output_dir>/runs/<run_id>/`` already holds its small files (a finished run; its
   recorded settings must match the recipe's, else the study stops and says which run to delete);
2. train it into ``<scratch_dir>/<run_id>/`` (``python -m logitsam.cli train``, its log beside it), after
   the CHES filter for a CHES cell (``python -m logitsam.cli ches``, once per cell);
3. evaluate it there (``python -m logitsam.cli eval``);
4. copy ``SMALL_FILES`` plus ``study_run.json`` into the output dir in one rename, so a run dir is
   complete or absent, and delete the scratch run (weights, checkpoints) unless ``keep_scratch``;
5. rebuild the study report, and with ``commit`` run ``git add`` and ``git commit`` on that run's files
   and the report only.

Two torch processes on two cores slow each other 5-20x: the runs never overlap.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from .._atomic import atomic_dir, remove_staged
from .._atomic import write_json as atomic_write_json
from .._atomic import write_text as atomic_write_text
from ..compare import run_logged, train_command
from ..train.config import ConfigError
from .plan import RunSpec, StudyPlan, estimate_seconds, rho_tag, settings_key

logger = logging.getLogger("logitsam.study")

SMALL_FILES = ("metrics.jsonl", "run_info.json", "logitsam_config.yaml", "eval_results.json")
RUN_RECORD = "study_run.json"  # written last: its presence marks a finished run
RECIPE_COPY = "study.yaml"  # the recipe the study ran from, beside its results (the report reads it)

Runner = Callable[..., None]  # (cmd, log_path, *, what) -> None; raises on failure


def finished(run_dir: Path) -> bool:
    return all((run_dir / name).is_file() for name in (*SMALL_FILES, RUN_RECORD))


def eval_command(run: RunSpec, model_dir: Path) -> list[str]:
    """``python -m logitsam.cli eval`` on the trained run, against its initial model, on the held-out slice.

    ``eval.llm_judge`` becomes the ``--judge_KEY`` flags (``cache: false`` is ``--no_judge_cache``); the API key
    stays in the environment (``OPENAI_API_KEY``), which the subprocess inherits.
    """
    args = dict(run.eval)
    cmd = [sys.executable, "-m", "logitsam.cli", "eval", "--model", str(model_dir), "--output_dir", str(model_dir)]
    for judge in args.pop("judge"):
        cmd += ["--judge", judge]
    flags = []  # switches without a value go last
    for key, value in args.pop("llm_judge", {}).items():
        if key == "cache" and isinstance(value, bool):
            flags += [] if value else ["--no_judge_cache"]
        else:
            cmd += [f"--judge_{key}", str(value)]
    if args.pop("hessian_head_only", False):
        flags.append("--hessian_head_only")
    for key, value in args.items():
        if value is not None:
            cmd += [f"--{key}", str(value)]
    return cmd + flags


def check_llm_judge_env(runs: list[RunSpec]) -> None:
    """Before the first run trains: a run with an ``llm:MODEL`` judge needs ``OPENAI_API_KEY`` (or a local server:
    ``llm_judge.base_url`` or ``OPENAI_BASE_URL``), and a samples file named by ``llm_judge.against`` must exist.

    Raises:
        ConfigError: naming the run and what is missing.
    """
    for run in runs:
        if not any(spec.startswith("llm:") for spec in run.eval.get("judge", ())):
            continue
        settings = run.eval.get("llm_judge", {})
        if not (os.environ.get("OPENAI_API_KEY") or settings.get("base_url") or os.environ.get("OPENAI_BASE_URL")):
            raise ConfigError(f"run {run.run_id}: its LLM judge needs an API key: set OPENAI_API_KEY in the "
                              "environment (never in the recipe), or set eval.llm_judge.base_url to a local "
                              "OpenAI-compatible server")
        against = settings.get("against", "reference")
        if against not in ("reference", "chosen") and not Path(against).expanduser().is_file():
            raise ConfigError(f"run {run.run_id}: eval.llm_judge.against = {against!r} is not reference, chosen or "
                              "an existing samples file (eval_samples.jsonl or judgments.jsonl)")


def ches_command(run: RunSpec, out_dir: Path) -> list[str]:
    """``python -m logitsam.cli ches`` on the run's training pool with the initial model, writing filtered.jsonl."""
    t = run.train
    cmd = [sys.executable, "-m", "logitsam.cli", "ches", "--model", str(t.get("model_name_or_path",
           "smollm2-135m-instruct")), "--dataset_name", str(t["dataset_name"]), "--split", t["dataset_split"],
           "--data_format", t["data_format"], "--filter_top_percent", str(run.ches_filter_top_percent),
           "--output_dir", str(out_dir)]
    for key in ("max_length", "max_prompt_length", "truncation_mode", "chat_rendering",
                "apply_chat_template"):  # the run's own values, defaults filled in
        if run.eval.get(key) is not None:
            cmd += [f"--{key}", str(run.eval[key])]
    if t.get("max_samples") is not None:
        cmd += ["--max_samples", str(t["max_samples"])]
    return cmd


def _check_recorded(run: RunSpec, run_dir: Path) -> None:
    recorded = json.loads((run_dir / RUN_RECORD).read_text()).get("settings")
    if settings_key(recorded) != settings_key(run.settings):
        raise ConfigError(f"finished run {run_dir} was made with other settings than the recipe now gives "
                          f"(recorded {settings_key(recorded)[:300]}...); restore the recipe, or delete {run_dir} "
                          "to rerun it")


def _train_config(run: RunSpec, scratch: Path) -> dict:
    config = dict(run.train)
    if run.ches_filter_top_percent is not None:
        filtered = scratch / f"ches-{run.cell}" / "filtered.jsonl"
        config.update({"dataset_name": str(filtered), "dataset_split": "train", "max_samples": None})
    return config


def _train(run: RunSpec, work: Path, scratch: Path, runner: Runner) -> None:
    """Train into ``work`` unless a complete training of the same settings is already there."""
    marker = work / RUN_RECORD
    if (work / "run_info.json").is_file() and marker.is_file() and \
            settings_key(json.loads(marker.read_text())) == settings_key(run.settings):
        logger.info("%s: reusing the finished training in %s", run.run_id, work)
        return
    if work.exists():  # a run killed mid-training, or trained with other settings: start it again
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write_json(marker, run.settings, indent=2, default=str)
    if run.ches_filter_top_percent is not None:
        ches_dir = scratch / f"ches-{run.cell}"
        if not (ches_dir / "filtered.jsonl").is_file():
            runner(ches_command(run, ches_dir), scratch / "logs" / f"ches-{run.cell}.log",
                   what=f"CHES filter for cell {run.cell}")
    config = scratch / "configs" / f"{run.run_id}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config, yaml.safe_dump(_train_config(run, scratch), sort_keys=False))
    runner(train_command(config, {}, work), scratch / "logs" / f"{run.run_id}-train.log",
           what=f"training {run.run_id}")


def _collect(run: RunSpec, work: Path, final: Path) -> None:
    missing = [name for name in SMALL_FILES if not (work / name).is_file()]
    if missing:
        raise RuntimeError(f"run {run.run_id}: {work} lacks {missing} after training and eval")
    with atomic_dir(final) as staged:  # a run dir is complete or absent, whenever the study is killed
        for name in SMALL_FILES:
            shutil.copy2(work / name, staged / name)
        record = {"run_id": run.run_id, "cell": run.cell, "rho": run.rho, "seed": run.seed, "settings": run.settings}
        atomic_write_json(staged / RUN_RECORD, record, indent=2, default=str)


class StudyCommitError(RuntimeError):
    """``--commit`` could not commit a finished run's files (they stay in place; the next call skips the run)."""


def git_commit(paths: list[Path], message: str) -> None:
    """``git add`` and ``git commit`` of exactly these paths (other staged changes stay staged, uncommitted)."""
    top = subprocess.run(["git", "-C", str(paths[0].parent), "rev-parse", "--show-toplevel"], capture_output=True,
                         text=True)
    if top.returncode != 0:
        raise StudyCommitError(f"--commit: {paths[0]} is not inside a git repository ({top.stderr.strip()})")
    root = Path(top.stdout.strip())
    names = [str(p.resolve().relative_to(root.resolve())) for p in paths if p.exists()]
    for cmd in (["git", "add", "--", *names], ["git", "commit", "-q", "-m", message, "--", *names]):
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            raise StudyCommitError(f"--commit: `{' '.join(cmd[:3])}` failed for {names[0]}: "
                                   f"{' '.join(detail[:2])} (the run's files are kept there; commit them by hand, "
                                   "and the next call skips the run)")


def select(plan: StudyPlan, only: list[str] | None) -> list[RunSpec]:
    if not only:
        return list(plan.runs)
    known = {r.run_id for r in plan.runs}
    unknown = [i for i in only if i not in known]
    if unknown:
        raise ConfigError(f"--only {unknown}: not run ids of {plan.path}; they are: {sorted(known)}")
    return [r for r in plan.runs if r.run_id in set(only)]


def check_train_configs(runs: list[RunSpec]) -> None:
    """Each run's training config through `logitsam train`'s own validation, before the first run starts.

    Raises:
        ConfigError: naming the run and the key.
    """
    import tempfile

    from ..train.config import build_config

    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            path = Path(tmp) / f"{run.run_id}.yaml"  # the run reads its config from a YAML file: check that one
            path.write_text(yaml.safe_dump(run.train, sort_keys=False))
            try:
                build_config(path)
            except ConfigError as err:
                raise ConfigError(f"run {run.run_id}: {err}") from err


def dry_run_table(plan: StudyPlan, runs: list[RunSpec], output_dir: Path) -> str:
    """One line per run: id, cell, rho, seed, steps, whether it is finished, and the budget's estimate."""
    lines = ["| run | cell | rho | seed | steps | status | estimate (min) |", "|---|---|---|---|---|---|---|"]
    total = todo = 0.0
    for run in runs:
        done = finished(output_dir / "runs" / run.run_id)
        seconds = estimate_seconds(plan, run)
        if seconds is not None:
            total += seconds
            todo += 0 if done else seconds
        lines.append(f"| {run.run_id} | {run.cell} | {rho_tag(run.rho)} | {run.seed} | {run.train['max_steps']} | "
                     f"{'finished' if done else 'to run'} | {'?' if seconds is None else f'{seconds / 60:.1f}'} |")
    lines.append(f"\n{len(runs)} runs, {sum(finished(output_dir / 'runs' / r.run_id) for r in runs)} finished; "
                 f"estimate {total / 3600:.2f} h in all, {todo / 3600:.2f} h left (recipe budget: {plan.budget})")
    return "\n".join(lines)


def run_study(plan: StudyPlan, output_dir: str | Path, *, only: list[str] | None = None, commit: bool = False,
              keep_scratch: bool = False, scratch_dir: str | Path | None = None, runner: Runner = run_logged,
              report: Callable[[Path], dict] | None = None) -> list[str]:
    """Run the plan's unfinished runs one at a time; returns the ids of the runs this call finished.

    ``report(output_dir)`` is called after each finished run (default: ``build_study_report``).
    """
    from .report import build_study_report

    report = report or build_study_report
    out = Path(output_dir)
    scratch = Path(scratch_dir or plan.scratch_dir)
    runs = select(plan, only)
    check_llm_judge_env([r for r in runs if not finished(out / "runs" / r.run_id)])
    (out / "runs").mkdir(parents=True, exist_ok=True)
    remove_staged(out / "runs")  # a copy a killed study left half-done
    recipe_copy = out / RECIPE_COPY
    atomic_write_text(recipe_copy, plan.path.read_text())
    done_now = []
    for i, run in enumerate(runs, 1):
        final = out / "runs" / run.run_id
        if finished(final):
            _check_recorded(run, final)
            logger.info("[%d/%d] %s: finished earlier, skipped", i, len(runs), run.run_id)
            continue
        logger.info("[%d/%d] %s: training (cell %s, rho %s, seed %d)", i, len(runs), run.run_id, run.cell,
                    rho_tag(run.rho), run.seed)
        work = scratch / run.run_id
        _train(run, work, scratch, runner)
        if not (work / "eval_results.json").is_file():
            runner(eval_command(run, work), scratch / "logs" / f"{run.run_id}-eval.log",
                   what=f"evaluating {run.run_id}")
        _collect(run, work, final)
        if not keep_scratch:
            shutil.rmtree(work)  # the weights and any checkpoints: never under the output dir
        written = report(out)
        done_now.append(run.run_id)
        if commit:
            paths = [recipe_copy, final, *(Path(p) for p in written.get("files", ()))]
            git_commit(paths, f"study {plan.name}: {run.run_id} (cell {run.cell}, rho {rho_tag(run.rho)}, "
                              f"seed {run.seed})")
    return done_now
