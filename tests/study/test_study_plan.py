"""Study recipes -> runs: stable ids, the grid order, paired settings, and errors that name the key."""

import pytest
from fake_study import recipe

from logitsam.study.plan import expand, rho_tag, run_id
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
