"""A study recipe (YAML) -> the list of runs it asks for: a rho grid x seeds, plus optional extra cells.

A study recipe holds (see ``recipes/study/*.yaml``):

- ``task``: ``sentiment`` (the packaged on-policy pairs, VADER win rate) or ``hh`` (a local HH-RLHF file
  with a fixed held-out split: its first ``heldout_pairs`` rows);
- ``data``: ``heldout_pairs``, ``train_pairs`` (the training pool), and for ``hh`` the file's ``path`` and
  ``format`` (default ``hh``; any `logitsam train` data format);
- ``train``: training keys as in ``recipes/*.yaml`` (``max_steps``, ``learning_rate``, ``eval_steps``, ...),
  optionally on top of a ``base_recipe`` file; the study owns the data, seed and SAM keys;
- ``grid``: ``sam_rho`` (0 means plain DPO, ``sam: none``) and ``seeds``;
- ``cells``: extra cells, each ``name``, ``sam_rho``, optional ``seeds``, ``train`` overrides (``bf16: true``),
  ``eval`` overrides and ``ches_filter_top_percent`` (train on the CHES-filtered pool);
- ``eval``: what `logitsam eval` runs on each finished run (``num_prompts``, ``judge``, ``hessian_probes`` for
  the rhos in ``hessian_rhos``, ...); ``judge`` lists ``vader``, ``reward:MODEL`` or ``llm:MODEL`` (default
  ``[vader]``), and ``llm_judge`` holds the LLM judge's settings (``LLM_JUDGE_KEYS``, each passed as
  ``--judge_KEY``); the API key comes from ``OPENAI_API_KEY``, never from the recipe;
- ``report``: ``figure_rhos`` for the Fig. 1c analogue (default: 0, the best rho and the largest);
- ``budget``: seconds per step for DPO and logits-SAM, per in-training eval and per run, for ``--dry_run``.

Every seed gives every rho the same data order (the Trainer's seeded sampler over the same pool), and the
held-out set is the same file slice for every run, so the comparison with rho = 0 is paired by seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..train.config import ConfigError, TrainConfig

TASKS = ("sentiment", "hh")
MAIN = "main"
HH_DEFAULT_PATH = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
STUDY_KEYS = ("name", "task", "data", "base_recipe", "train", "grid", "cells", "eval", "report", "budget",
              "scratch_dir")
DATA_KEYS = ("path", "format", "heldout_pairs", "train_pairs")
CELL_KEYS = ("name", "sam_rho", "seeds", "train", "eval", "ches_filter_top_percent")
EVAL_KEYS = ("num_prompts", "max_new_tokens", "temperature", "top_p", "judge", "llm_judge", "batch_size",
             "gen_batch_size", "hessian_probes", "hessian_batches", "hessian_head_only", "device")
# eval.llm_judge: each key is `logitsam eval`'s --judge_KEY flag (cache: a directory, or false for --no_judge_cache)
LLM_JUDGE_KEYS = ("template", "against", "base_url", "orders", "concurrency", "timeout", "max_retries",
                  "max_tokens", "cache")
BUDGET_KEYS = ("dpo_seconds_per_step", "sam_seconds_per_step", "seconds_per_eval", "seconds_per_run")
# keys the study sets itself: a recipe that sets them would silently break the pairing or the held-out split
OWNED_TRAIN_KEYS = ("output_dir", "seed", "data_seed", "sam", "sam_rho", "dataset_name", "dataset_split",
                    "eval_dataset_name", "eval_dataset_split", "eval_size", "data_format", "max_samples", "variant")
_CELL_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study and its evaluation.

    ``settings`` is what the run depends on, as the recipe wrote it (no resolved paths): a finished run
    whose recorded settings differ from the recipe's is refused instead of being mixed into the table.
    """

    run_id: str
    cell: str
    rho: float
    seed: int
    train: dict
    eval: dict
    ches_filter_top_percent: float | None = None
    settings: dict = field(default_factory=dict)


@dataclass
class StudyPlan:
    name: str
    task: str
    path: Path
    runs: list[RunSpec]
    report: dict
    budget: dict
    scratch_dir: str

    def run(self, run_id: str) -> RunSpec:
        return next(r for r in self.runs if r.run_id == run_id)


def rho_tag(rho: float) -> str:
    """``0`` -> ``"0"``, ``1e-3`` -> ``"1e-3"``, ``3e-2`` -> ``"3e-2"``, ``2.5e-4`` -> ``"2.5e-4"``."""
    if rho == 0:
        return "0"
    mantissa, exponent = f"{rho:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_id(cell: str, rho: float, seed: int) -> str:
    """``rho1e-2_seed1`` for the main grid, ``bf16_rho1e-2_seed1`` for an extra cell."""
    base = f"rho{rho_tag(rho)}_seed{seed}"
    return base if cell == MAIN else f"{cell}_{base}"


def _train_default(key: str):
    for f in dataclasses.fields(TrainConfig):
        if f.name == key:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    raise KeyError(key)


def _mapping(value, where: str, allowed: tuple[str, ...] | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    if allowed is not None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    return value


def _numbers(value, where: str, kind=float, low=0) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                raise ConfigError(f"{where}: {v!r} is not a number") from None
        if isinstance(v, bool) or not isinstance(v, int | float) or v < low or (kind is int and v != int(v)):
            raise ConfigError(f"{where}: {v!r} must be {'an integer' if kind is int else 'a number'} >= {low}")
        out.append(kind(v))
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: {value!r} holds a value twice")
    return out


def _judges(value, where: str) -> list[str]:
    """``eval.judge`` as a list of judge specs: ``vader``, ``reward:MODEL`` or ``llm:MODEL``."""
    judges = [value] if isinstance(value, str) else value
    if not isinstance(judges, list) or not judges:
        raise ConfigError(f"{where}.judge = {value!r} must be a judge or a non-empty list of judges "
                          "('vader', 'reward:MODEL', 'llm:MODEL')")
    for spec in judges:
        ok = isinstance(spec, str) and (spec == "vader" or any(
            spec.startswith(kind) and spec[len(kind):].strip() for kind in ("reward:", "llm:")))
        if not ok:
            raise ConfigError(f"{where}.judge: {spec!r} is not 'vader', 'reward:MODEL' (a reward model) or "
                              "'llm:MODEL' (a chat model as judge)")
    return list(judges)


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


# eval.llm_judge key -> (test of its value, what the value may be)
_LLM_JUDGE_VALUES = {
    "template": (lambda v: isinstance(v, str) and v.strip(), "a template name (dpo_dialogue, ...) or file path"),
    "against": (lambda v: isinstance(v, str) and v.strip(), "reference, chosen or the path of a samples file"),
    "base_url": (lambda v: isinstance(v, str) and v.strip(), "an OpenAI-compatible server URL (.../v1)"),
    "orders": (lambda v: v in ("both", "random"), "'both' or 'random'"),
    "concurrency": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "timeout": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0, "seconds > 0"),
    "max_retries": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "max_tokens": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "cache": (lambda v: v is True or v is False or (isinstance(v, str) and v.strip()),
              "a cache directory, true (the default cache) or false (no cache)"),
}
assert tuple(_LLM_JUDGE_VALUES) == LLM_JUDGE_KEYS


def _check_judges(options: dict, where: str, *, prompts_file) -> dict:
    """``options`` with ``judge`` as a list and ``llm_judge`` checked key by key (only when it is given, so the
    recorded settings of runs made before it existed stay the same)."""
    out = dict(options)
    if "judge" in out:
        out["judge"] = _judges(out["judge"], where)
    llm = [spec for spec in out.get("judge", ["vader"]) if spec.startswith("llm:")]
    if llm and out.get("num_prompts") == 0:
        raise ConfigError(f"{where}.num_prompts = 0: the judge {llm[0]} would judge nothing; set num_prompts "
                          "(the prompts judged per run)")
    if "llm_judge" not in out:
        return out
    settings = out["llm_judge"]
    if isinstance(settings, dict) and "api_key" in settings:
        raise ConfigError(f"{where}.llm_judge.api_key: a recipe never holds an API key (it is committed with the "
                          "study's results); set the OPENAI_API_KEY environment variable instead")
    settings = dict(_mapping(settings, f"{where}.llm_judge", LLM_JUDGE_KEYS))
    for key, value in settings.items():
        test, allowed = _LLM_JUDGE_VALUES[key]
        if not test(value):
            raise ConfigError(f"{where}.llm_judge.{key} = {value!r}: must be {allowed}")
    if not llm:
        raise ConfigError(f"{where}.llm_judge is set but no judge is 'llm:MODEL'; add one to {where}.judge "
                          "(e.g. judge: [vader, 'llm:gpt-4o-mini']) or remove llm_judge")
    if settings.get("against") == "chosen" and prompts_file:
        raise ConfigError(f"{where}.llm_judge.against = 'chosen' compares with the dataset's chosen responses, "
                          f"but this task judges the prompts file {prompts_file} (prompts only); use 'reference'")
    out["llm_judge"] = settings
    return out


def _check_owned(train: dict, where: str) -> None:
    owned = sorted(set(train) & set(OWNED_TRAIN_KEYS))
    if owned:
        raise ConfigError(f"{where}: key(s) {owned} are set by the study itself (task, data, grid); remove them")


def _relative(path: Path) -> str:
    """A path under the working directory as a relative one (committed configs then hold no machine paths)."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except ValueError:
        return str(path)


def task_data(task: str, data: dict, where: str) -> tuple[dict, dict]:
    """The training keys and the `logitsam eval` data arguments of a task (a fixed held-out slice)."""
    heldout = data.get("heldout_pairs", 64 if task == "hh" else None)
    pool = data.get("train_pairs")
    for key, value in (("heldout_pairs", heldout), ("train_pairs", pool)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}: data.{key} = {value!r} must be an integer >= 1")
    if task == "sentiment":
        if "path" in data or "format" in data:
            raise ConfigError(f"{where}: data.path and data.format are for task hh; the sentiment task reads the "
                              "packaged pairs")
        from ..demo.sentiment_data import load_sentiment_paths

        paths = {k: _relative(v) for k, v in load_sentiment_paths().items()}
        split = f"train[:{heldout}]" if heldout else "train"
        train = {"dataset_name": paths["train"], "dataset_split": "train", "data_format": "conversational",
                 "max_samples": pool, "eval_dataset_name": paths["heldout"], "eval_dataset_split": split}
        evaluation = {"dataset_name": paths["heldout"], "split": split, "data_format": "conversational",
                      "prompts_file": paths["heldout_prompts"]}
        return train, evaluation
    path, fmt = str(data.get("path", HH_DEFAULT_PATH)), str(data.get("format", "hh"))
    end = "" if pool is None else str(heldout + pool)
    train = {"dataset_name": path, "dataset_split": f"train[{heldout}:{end}]", "data_format": fmt,
             "eval_dataset_name": path, "eval_dataset_split": f"train[:{heldout}]"}
    return train, {"dataset_name": path, "split": f"train[:{heldout}]", "data_format": fmt, "prompts_file": None}


def _base_train(raw: dict, where: str) -> dict:
    base = {}
    if raw.get("base_recipe"):
        recipe = Path(raw["base_recipe"])
        if not recipe.is_file():
            raise ConfigError(f"{where}: base_recipe {str(recipe)!r} not found")
        base = _mapping(yaml.safe_load(recipe.read_text()), str(recipe))
        base = {k: v for k, v in base.items() if k not in OWNED_TRAIN_KEYS}  # the study's data and grid win
    train = _mapping(raw.get("train"), f"{where}: train")
    _check_owned(train, f"{where}: train")
    merged = {**base, **train}
    for key in ("max_steps", "eval_steps"):
        if not isinstance(merged.get(key), int) or isinstance(merged.get(key), bool) or merged[key] < 1:
            raise ConfigError(f"{where}: train.{key} = {merged.get(key)!r} must be an integer >= 1 "
                              "(eval_steps: how often the Fig. 1c curves are sampled)")
    for key, want in (("eval_strategy", "steps"), ("eval_on_start", True)):
        if merged.setdefault(key, want) != want:
            raise ConfigError(f"{where}: train.{key} = {merged[key]!r}; the study needs {want!r} "
                              "(held-out curves from step 0 on)")
    return merged


def eval_args(train: dict, task_eval: dict, options: dict, seed: int) -> dict:
    """The keyword arguments of `logitsam eval` for one run: the run's data slice, lengths and loss."""
    loss = train.get("loss_type", _train_default("loss_type"))
    if isinstance(loss, list) and len(loss) == 1:  # TRL's normal form of one loss name
        loss = loss[0]
    if not isinstance(loss, str):
        raise ConfigError(f"train.loss_type = {loss!r}: the study's eval takes one loss name")
    judges = options.get("judge", ["vader"])  # a list once _check_judges has run; a string in older callers
    return {**task_eval, "max_length": train.get("max_length", _train_default("max_length")),
            "max_prompt_length": train.get("max_prompt_length", _train_default("max_prompt_length")),
            "truncation_mode": train.get("truncation_mode", _train_default("truncation_mode")),
            "chat_rendering": train.get("chat_rendering", _train_default("chat_rendering")),
            "apply_chat_template": train.get("apply_chat_template", _train_default("apply_chat_template")),
            "loss_type": loss, "beta": train.get("beta", _train_default("beta")), "seed": seed,
            **{k: v for k, v in options.items() if k != "judge"},
            "judge": [judges] if isinstance(judges, str) else list(judges)}


def _expand_cell(name: str, rhos, seeds, train: dict, evaluation: dict, *, ches,
                 recipe_settings: dict) -> list[RunSpec]:
    runs = []
    for seed in seeds:  # seed-major: a study stopped early still holds complete paired sets
        for rho in rhos:
            sam = {"sam": "none", "sam_rho": 0.0} if rho == 0 else {"sam": "logits", "sam_rho": rho}
            label = "dpo" if rho == 0 else f"dpo+logits-sam rho={rho_tag(rho)}"
            run_train = {**train, **sam, "seed": seed, "variant": label if name == MAIN else f"{name} {label}"}
            opts = dict(evaluation.get(rho, evaluation["*"]))
            runs.append(RunSpec(run_id(name, rho, seed), name, rho, seed, run_train, opts, ches,
                                settings={**recipe_settings, "cell": name, "rho": rho, "seed": seed, "eval": opts}))
    return runs


def expand(raw: dict, *, path: str | Path = "<study>") -> StudyPlan:
    """A parsed study recipe -> StudyPlan with one RunSpec per (cell, seed, rho), main grid first.

    Raises:
        ConfigError: naming the file, the key and the bad value.
    """
    where = str(path)
    raw = _mapping(raw, where, STUDY_KEYS)
    task = raw.get("task")
    if task not in TASKS:
        raise ConfigError(f"{where}: task = {task!r} is not one of {list(TASKS)}")
    data = _mapping(raw.get("data"), f"{where}: data", DATA_KEYS)
    data_train, data_eval = task_data(task, data, where)
    base = _base_train(raw, where)
    grid = _mapping(raw.get("grid"), f"{where}: grid", ("sam_rho", "seeds"))
    rhos = _numbers(grid.get("sam_rho"), f"{where}: grid.sam_rho")
    seeds = _numbers(grid.get("seeds"), f"{where}: grid.seeds", kind=int)
    evaluation = dict(_mapping(raw.get("eval"), f"{where}: eval", (*EVAL_KEYS, "hessian_rhos")))
    if task == "hh":
        evaluation.setdefault("num_prompts", 0)  # no sentiment judge for HH; `reward:MODEL` judges are opt-in
    evaluation = _check_judges(evaluation, f"{where}: eval", prompts_file=data_eval["prompts_file"])
    hessian_rhos = _numbers(evaluation.pop("hessian_rhos"), f"{where}: eval.hessian_rhos") \
        if "hessian_rhos" in evaluation else None
    probes = evaluation.get("hessian_probes", 0)
    if hessian_rhos is not None:
        evaluation["hessian_probes"] = 0

    def eval_table(train: dict, options: dict) -> dict:
        table = {"*": eval_args(train, data_eval, options, seed=0)}
        for rho in hessian_rhos or ():
            table[rho] = eval_args(train, data_eval, {**options, "hessian_probes": probes}, seed=0)
        return table

    settings = {"task": task, "data": data, "train": base}
    main_train = {**base, **data_train, "eval_size": 0}
    runs = _seeded(_expand_cell(MAIN, rhos, seeds, main_train, eval_table(main_train, evaluation), ches=None,
                                recipe_settings=settings))
    runs += _cell_runs(raw.get("cells") or [], where, main_train, evaluation, seeds, data_eval, settings)
    ids = [r.run_id for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{where}: run ids {dup} appear twice (a cell name or rho given twice?)")
    budget = _mapping(raw.get("budget"), f"{where}: budget", BUDGET_KEYS)
    name = str(raw.get("name") or Path(path).stem)
    return StudyPlan(name=name, task=task, path=Path(path), runs=runs,
                     report=_mapping(raw.get("report"), f"{where}: report", ("figure_rhos", "title")),
                     budget=budget, scratch_dir=str(raw.get("scratch_dir", f"runs/study/{name}")))


def _cell_runs(cells, where: str, main_train: dict, evaluation: dict, seeds, data_eval, settings) -> list:
    """The runs of the recipe's extra cells: each a name, its rhos, optional seeds, training overrides on top of
    the main grid's, eval overrides and an optional CHES filter."""
    runs: list = []
    if not isinstance(cells, list):
        raise ConfigError(f"{where}: cells must be a list of mappings, got {cells!r}")
    for i, cell in enumerate(cells):
        at = f"{where}: cells[{i}]"
        cell = _mapping(cell, at, CELL_KEYS)
        name = cell.get("name")
        if not isinstance(name, str) or not _CELL_NAME.fullmatch(name) or name == MAIN:
            raise ConfigError(f"{at}: name = {name!r} must be lower-case letters, digits and '-' (not 'main')")
        extra = _mapping(cell.get("train"), f"{at}: train")
        _check_owned(extra, f"{at}: train")
        ches = cell.get("ches_filter_top_percent")
        if ches is not None and (isinstance(ches, bool) or not isinstance(ches, int | float) or not 0 < ches < 100):
            raise ConfigError(f"{at}: ches_filter_top_percent = {ches!r} must be a number in (0, 100)")
        cell_train = {**main_train, **extra}
        cell_eval = _mapping(cell.get("eval"), f"{at}: eval", EVAL_KEYS)
        inherited = dict(evaluation)
        if "judge" in cell_eval and "llm_judge" not in cell_eval:  # the cell's own judges: no LLM judge inherited
            inherited.pop("llm_judge", None)
        options = _check_judges({**inherited, **cell_eval}, f"{at}: eval", prompts_file=data_eval["prompts_file"])
        runs += _seeded(_expand_cell(
            name, _numbers(cell.get("sam_rho"), f"{at}: sam_rho"),
            _numbers(cell["seeds"], f"{at}: seeds", kind=int) if "seeds" in cell else seeds,
            cell_train, {"*": eval_args(cell_train, data_eval, options, seed=0)},
            ches=None if ches is None else float(ches),
            recipe_settings={**settings, "cell_train": extra, "ches_filter_top_percent": ches}))
    return runs


def _seeded(runs: list[RunSpec]) -> list[RunSpec]:
    """Each run's eval seed is its training seed (fresh samples differ by seed, not by rho)."""
    return [dataclasses.replace(r, eval={**r.eval, "seed": r.seed}, settings={**r.settings,
            "eval": {**r.eval, "seed": r.seed}}) for r in runs]


def load_study(path: str | Path) -> StudyPlan:
    """Read and expand a study recipe file.

    Raises:
        ConfigError: the file is missing or not YAML, or a key or value is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study recipe {str(path)!r}: " + ("is a directory" if path.is_dir() else "not found"))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"study recipe {str(path)!r} is not valid YAML: {e}") from e
    return expand(raw, path=path)


def settings_key(settings: dict) -> str:
    """A stable text form of a run's settings, for comparing a finished run with the recipe."""
    return json.dumps(settings, sort_keys=True, default=str)


def estimate_seconds(plan: StudyPlan, run: RunSpec) -> float | None:
    """The run's wall time from the recipe's ``budget`` (steps x s/step + evals + fixed cost), or None."""
    b = plan.budget
    per_step = b.get("dpo_seconds_per_step" if run.rho == 0 else "sam_seconds_per_step")
    if per_step is None:
        return None
    steps, every = int(run.train["max_steps"]), int(run.train["eval_steps"])
    evals = steps // every + 2  # the step-0 eval, every eval_steps, and the end-of-run evaluate()
    return steps * per_step + evals * b.get("seconds_per_eval", 0.0) + b.get("seconds_per_run", 0.0)
