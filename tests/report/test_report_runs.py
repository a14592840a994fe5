"""Reading run directories: variants, seeds, grouping, seed statistics and curves."""

import json
import statistics

import pytest
from synthetic_runs import STEPS, make_rho_sweep, make_two_by_two, write_run

from logitsam.report import group_runs, load_run, pick_baseline
from logitsam.report.runs import derive_variant, find_run_dirs, seed_curve, seed_stat


@pytest.fixture
def two_by_two(tmp_path):
    return make_two_by_two(tmp_path)


@pytest.fixture
def rho_sweep(tmp_path):
    return make_rho_sweep(tmp_path)


def test_load_run_reads_every_file(two_by_two):
    run = load_run(two_by_two[1])
    assert (run.variant, run.seed) == ("dpo", 1)
    assert len(run.train) == STEPS and [r["step"] for r in run.eval] == [5, 10]
    assert run.config["sam"] == "none" and run.info["device"] == "cpu"
    assert run.eval_results["winrate/vader/win_rate"] == pytest.approx(0.57)
    assert run.notes == []


def test_variant_and_seed_from_config_without_run_info(tmp_path):
    run = load_run(write_run(tmp_path, "r", sam="logits", seed=3, files=("metrics", "config")))
    assert (run.variant, run.seed) == ("dpo+logits-sam", 3)
    assert run.info == {} and run.eval_results == {}
    assert run.notes == ["no run_info.json", "no eval_results.json"]


def test_variant_without_config_or_run_info_is_the_directory_name(tmp_path):
    run = load_run(write_run(tmp_path, "mystery", files=("metrics",)))
    assert run.variant == "mystery" and run.seed is None
    assert any("variant unknown" in note for note in run.notes)


def test_derive_variant():
    assert derive_variant({}) == "dpo"
    assert derive_variant({"loss_type": ["ipo", "sft"], "sam": "full", "sam_asam": True}) == "ipo+sft+full-sam-asam"


def test_group_runs_puts_seeds_of_one_variant_together(two_by_two):
    groups = group_runs([load_run(d) for d in two_by_two])
    assert list(groups) == ["dpo", "dpo+logits-sam"]
    assert [[r.seed for r in runs] for runs in groups.values()] == [[0, 1], [0, 1]]


def test_group_runs_splits_one_variant_name_over_several_rhos(rho_sweep):
    groups = group_runs([load_run(d) for d in rho_sweep])
    assert list(groups) == ["ipo", "ipo+logits-sam (rho=1e-05)", "ipo+logits-sam (rho=0.0001)",
                            "ipo+logits-sam (rho=0.001)"]
    assert groups["ipo+logits-sam (rho=0.001)"][0].variant == "ipo+logits-sam (rho=0.001)"


def test_pick_baseline(two_by_two):
    groups = group_runs([load_run(d) for d in reversed(two_by_two)])
    assert pick_baseline(groups) == "dpo"  # sam: none wins over order
    assert pick_baseline(groups, "dpo+logits-sam") == "dpo+logits-sam"
    with pytest.raises(ValueError, match="'nope' is not one of the variants"):
        pick_baseline(groups, "nope")


def test_seed_stat_is_mean_and_sample_std():
    xs = [0.61, 0.64, 0.70]
    stat = seed_stat(xs)
    assert stat.mean == pytest.approx(statistics.mean(xs)) and stat.std == pytest.approx(statistics.stdev(xs))
    assert stat.n == 3
    assert seed_stat([2.0]) == (2.0, 0.0, 1)
    assert seed_stat([]) is None


def test_seed_curve_mean_and_min_max(two_by_two):
    runs = [load_run(d) for d in two_by_two[:2]]
    curve = seed_curve(runs, "loss")
    assert curve.steps == list(range(1, STEPS + 1))
    losses = [[r["loss"] for r in run.train] for run in runs]
    assert curve.mean == pytest.approx([statistics.mean(p) for p in zip(*losses, strict=True)])
    assert curve.low == [min(p) for p in zip(*losses, strict=True)]
    assert curve.high == [max(p) for p in zip(*losses, strict=True)]
    assert seed_curve(runs, "not/logged") is None


def test_unreadable_metrics_lines_are_counted_and_noted(tmp_path):
    run_dir = write_run(tmp_path, "r", files=("metrics",))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "loss": 0.3\n[1, 2]\n')  # a line cut mid-write, and a non-object
    run = load_run(run_dir)
    assert len(run.train) == STEPS
    assert "metrics.jsonl: dropped 2 unreadable line(s)" in run.notes


def test_load_run_names_the_bad_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a run directory"):
        load_run(tmp_path / "empty")
    bad = write_run(tmp_path, "bad", files=("metrics",))
    (bad / "run_info.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="run_info.json: expected a JSON object"):
        load_run(bad)


def test_find_run_dirs(two_by_two):
    assert find_run_dirs(two_by_two[0].parent) == sorted(two_by_two)
