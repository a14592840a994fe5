"""Study recipes -> runs: stable ids, the grid order, paired settings, and errors that name the key."""

from pathlib import Path

import pytest
from fake_study import recipe

from logitsam.study.plan import expand, rho_tag, run_id
from logitsam.study.runner import eval_command
from logitsam.train.config import ConfigError


def test_rho_tags_and_run_ids():
    assert [rho_tag(r) for r in (0, 1e-3, 1e-2, 3e-2, 0.1, 2.5e-4)] == ["0", "1e-3", "1e-2", "3e-2", "1e-1", "2.5e-4"]
    assert run_id("main", 1e-2, 1) == "rho1e-2_seed1"
    assert run_id("bf16", 3e-2, 2) == "bf16_rho3e-2_seed2"


def test_grid_expands_seed_major_with_stable_ids(tmp_path):
    raw = recipe(tmp_path / "hh.jsonl", cells=[{"name": "bf16", "sam_rho": [1.0e-2], "seeds": [1],
                                                  "train": {"bf16": True}}])
    raw["grid"]["sam_rho"] = [0, 1.0e-3, "1e-2"]  # YAML 1.1 reads 1e-2 (no dot) as a string
    plan = expand(raw, path=tmp_path / "s.yaml")
    ids = [r.run_id for r in plan.runs]
    assert ids == ["rho0_seed1", "rho1e-3_seed1", "rho1e-2_seed1", "rho0_seed2", "rho1e-3_seed2", "rho1e-2_seed2",
                   "rho0_seed3", "rho1e-3_seed3", "rho1e-2_seed3", "bf16_rho1e-2_seed1"]
    assert ids == [r.run_id for r in expand(raw, path=tmp_path / "s.yaml").runs]  # stable
    assert plan.name == "s"
    dpo, sam = plan.run("rho0_seed1"), plan.run("rho1e-2_seed1")
    assert (dpo.train["sam"], sam.train["sam"], sam.train["sam_rho"]) == ("none", "logits", 1e-2)
    assert plan.run("bf16_rho1e-2_seed1").train["bf16"] is True and "bf16" not in sam.train


def test_runs_of_one_seed_differ_only_in_sam_keys(tmp_path):
    """Same seed, same data, same held-out slice: the comparison with rho = 0 is paired."""
    plan = expand(recipe(tmp_path / "hh.jsonl"))
    dpo, sam = plan.run("rho0_seed2"), plan.run("rho1e-2_seed2")
    differ = {k for k in dpo.train.keys() | sam.train.keys() if dpo.train.get(k) != sam.train.get(k)}
    assert differ == {"sam", "sam_rho", "variant"}
    assert dpo.train["seed"] == 2 and dpo.eval["seed"] == 2
    assert dpo.train["dataset_split"] == "train[4:16]" and dpo.train["eval_dataset_split"] == "train[:4]"
    assert dpo.eval["split"] == "train[:4]" and dpo.eval["max_length"] == 32 and dpo.eval["num_prompts"] == 0
    assert dpo.train["eval_on_start"] is True and dpo.train["eval_strategy"] == "steps"


def test_hessian_probes_only_for_the_named_rhos(tmp_path):
    raw = recipe(tmp_path / "hh.jsonl", eval={"hessian_probes": 4, "hessian_rhos": [1.0e-2]})
    plan = expand(raw)
    assert plan.run("rho1e-2_seed1").eval["hessian_probes"] == 4
    assert plan.run("rho0_seed1").eval["hessian_probes"] == 0


def test_sentiment_task_uses_the_packaged_pairs(tmp_path):
    raw = recipe(tmp_path / "unused", task="sentiment", data={"heldout_pairs": 8})
    plan = expand(raw)
    run = plan.run("rho0_seed1")
    assert run.train["dataset_name"].endswith("sentiment/train.jsonl")
    assert run.train["eval_dataset_split"] == "train[:8]" and run.eval["prompts_file"].endswith("heldout_prompts.jsonl")
    assert run.eval["judge"] == ["vader"]


@pytest.mark.parametrize("change, message", [
    ({"task": "tldr"}, "task = 'tldr' is not one of"),
    ({"grid": {"sam_rho": [0, -1.0], "seeds": [1]}}, "grid.sam_rho: -1.0 must be a number >= 0"),
    ({"grid": {"sam_rho": [0, 0.0], "seeds": [1]}}, "holds a value twice"),
    ({"grid": {"sam_rho": [0], "seeds": [1.5]}}, "grid.seeds: 1.5 must be an integer"),
    ({"train": {"max_steps": 4, "eval_steps": 2, "seed": 3}}, "['seed'] are set by the study itself"),
    ({"train": {"max_steps": 4}}, "train.eval_steps = None must be an integer >= 1"),
    ({"train": {"max_steps": 4, "eval_steps": 2, "eval_on_start": False}}, "train.eval_on_start = False"),
    ({"cells": [{"name": "Main", "sam_rho": [0]}]}, "cells[0]: name = 'Main'"),
    ({"cells": [{"name": "x", "sam_rho": [0], "colour": 1}]}, "cells[0]: unknown key(s) ['colour']"),
    ({"colour": 1}, "unknown key(s) ['colour']"),
])
def test_bad_recipes_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        expand(recipe(tmp_path / "hh.jsonl", **change), path="s.yaml")
    assert message in str(err.value) and "s.yaml" in str(err.value)


LLM_JUDGE = {"template": "mt_bench_pair", "against": "chosen", "base_url": "http://127.0.0.1:8000/v1",
             "orders": "random", "concurrency": 4, "timeout": 30.5, "max_retries": 2, "max_tokens": 64,
             "cache": False}


def _flags(cmd: list[str]) -> dict[str, list[str]]:
    """``--flag value`` pairs of an argv (repeated flags collected in order; a switch maps to [])."""
    out: dict[str, list[str]] = {}
    for i, token in enumerate(cmd):
        if token.startswith("--"):
            value = cmd[i + 1] if i + 1 < len(cmd) and not cmd[i + 1].startswith("--") else None
            out.setdefault(token, []).extend([] if value is None else [value])
    return out


def test_llm_judge_settings_become_eval_flags(tmp_path):
    raw = recipe(tmp_path / "hh.jsonl", eval={"num_prompts": 8, "judge": ["vader", "llm:fake"],
                                              "llm_judge": LLM_JUDGE})
    run = expand(raw).run("rho1e-2_seed2")
    assert run.eval["judge"] == ["vader", "llm:fake"] and run.eval["llm_judge"] == LLM_JUDGE
    assert run.settings["eval"]["llm_judge"] == LLM_JUDGE  # a changed judge setting is a changed run
    cmd = eval_command(run, Path("runs/m"))
    flags = _flags(cmd)
    assert flags["--judge"] == ["vader", "llm:fake"]
    assert {k: v for k, v in flags.items() if k.startswith("--judge_")} == {
        "--judge_template": ["mt_bench_pair"], "--judge_against": ["chosen"],
        "--judge_base_url": ["http://127.0.0.1:8000/v1"], "--judge_orders": ["random"],
        "--judge_concurrency": ["4"], "--judge_timeout": ["30.5"], "--judge_max_retries": ["2"],
        "--judge_max_tokens": ["64"]}
    assert cmd[-1] == "--no_judge_cache" and flags["--seed"] == ["2"] and flags["--num_prompts"] == ["8"]
    assert not any("api_key" in token for token in cmd)
    cached = expand(recipe(tmp_path / "hh.jsonl", eval={"num_prompts": 4, "judge": "llm:org/m",
                                                          "llm_judge": {"cache": "c/dir"}}))
    cmd = eval_command(cached.run("rho0_seed1"), Path("m"))
    assert _flags(cmd)["--judge_cache"] == ["c/dir"] and "--no_judge_cache" not in cmd
    assert _flags(cmd)["--judge"] == ["llm:org/m"]


def test_without_llm_judge_the_eval_and_its_settings_are_unchanged(tmp_path):
    """Runs recorded before llm_judge existed still match their recipe: no new key unless the recipe sets it."""
    run = expand(recipe(tmp_path / "hh.jsonl", eval={"judge": ["vader"]})).run("rho0_seed1")
    assert "llm_judge" not in run.eval and "llm_judge" not in run.settings["eval"]
    assert not any(token.startswith("--judge_") or token == "--no_judge_cache"
                   for token in eval_command(run, Path("m")))


def test_a_cell_with_its_own_judges_drops_the_inherited_llm_judge(tmp_path):
    raw = recipe(tmp_path / "hh.jsonl", eval={"num_prompts": 4, "judge": ["llm:fake"],
                                              "llm_judge": {"orders": "both"}},
                 cells=[{"name": "vader-only", "sam_rho": [0], "eval": {"judge": ["vader"]}},
                        {"name": "same", "sam_rho": [0]}])
    plan = expand(raw)
    assert "llm_judge" not in plan.run("vader-only_rho0_seed1").eval
    assert plan.run("same_rho0_seed1").eval["llm_judge"] == {"orders": "both"}


@pytest.mark.parametrize("evaluation, message", [
    ({"judge": ["llm:fake"], "llm_judge": {"api_key": "sk-secret"}},
     "eval.llm_judge.api_key: a recipe never holds an API key"),
    ({"judge": ["llm:fake"], "llm_judge": {"temperature": 0}},
     "eval.llm_judge: unknown key(s) ['temperature']; allowed: ['template', 'against'"),
    ({"judge": ["llm:fake"], "llm_judge": {"orders": "once"}}, "eval.llm_judge.orders = 'once': must be 'both' or"),
    ({"judge": ["llm:fake"], "llm_judge": {"concurrency": 0}}, "eval.llm_judge.concurrency = 0: must be an integer"),
    ({"judge": ["llm:fake"], "llm_judge": {"timeout": -1}}, "eval.llm_judge.timeout = -1: must be seconds > 0"),
    ({"judge": ["llm:fake"], "llm_judge": {"cache": 3}}, "eval.llm_judge.cache = 3: must be a cache directory"),
    ({"judge": ["llm:fake"], "llm_judge": "gpt"}, "eval.llm_judge: expected a mapping"),
    ({"judge": ["vader"], "llm_judge": {"orders": "both"}}, "eval.llm_judge is set but no judge is 'llm:MODEL'"),
    ({"judge": ["vader", "gpt-4"]}, "eval.judge: 'gpt-4' is not 'vader', 'reward:MODEL'"),
    ({"judge": ["llm:"]}, "eval.judge: 'llm:' is not"),
    ({"judge": ["llm:fake"], "num_prompts": 0}, "eval.num_prompts = 0: the judge llm:fake would judge nothing"),
    ({"judge": []}, "eval.judge = [] must be a judge or a non-empty list"),
])
def test_bad_judge_settings_name_the_key(tmp_path, evaluation, message):
    with pytest.raises(ConfigError) as err:
        expand(recipe(tmp_path / "hh.jsonl", eval={"num_prompts": 4, **evaluation}), path="s.yaml")
    assert message in str(err.value) and "s.yaml" in str(err.value)
    assert "sk-secret" not in str(err.value)


def test_against_chosen_is_refused_where_the_task_judges_a_prompts_file(tmp_path):
    raw = recipe(tmp_path / "unused", task="sentiment", data={"heldout_pairs": 8},
                 eval={"judge": ["vader", "llm:fake"], "llm_judge": {"against": "chosen"}})
    with pytest.raises(ConfigError, match=r"llm_judge.against = 'chosen' .* prompts file"):
        expand(raw)
