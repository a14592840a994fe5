"""Tables: the numbers equal a direct computation from the files; ratios against the baseline; sweeps."""

import statistics
from pathlib import Path

import pytest
from synthetic_runs import COST, final_accuracy, make_rho_sweep, make_two_by_two, write_run

from logitsam.report import (
    build_report,
    cost_table,
    eval_table,
    format_table,
    group_runs,
    load_run,
    rho_sweeps,
    summary_table,
)
from logitsam.report.runs import Stat


@pytest.fixture
def two_by_two(tmp_path):
    return make_two_by_two(tmp_path)


@pytest.fixture
def rho_sweep(tmp_path):
    return make_rho_sweep(tmp_path)


def _groups(dirs):
    return group_runs([load_run(d) for d in dirs])


def test_summary_mean_std_equal_a_direct_computation(two_by_two):
    rows = summary_table(_groups(two_by_two))
    assert [r["variant"] for r in rows] == ["dpo (baseline)", "dpo+logits-sam"]
    for row, sam in zip(rows, ("none", "logits"), strict=True):
        accs = [final_accuracy(sam, 1e-4, seed) for seed in (0, 1)]
        assert row["seeds"] == 2
        assert row["eval_accuracy"].mean == pytest.approx(statistics.mean(accs))
        assert row["eval_accuracy"].std == pytest.approx(statistics.stdev(accs))
        assert row["win_rate/vader"].mean == pytest.approx(statistics.mean([0.55, 0.57]))
        assert row["win_rate_ci/vader"] == "[0.5, 0.6] (mean of 2)"
    runs = _groups(two_by_two)["dpo+logits-sam"]
    deltas = [r.eval[-1]["eval_squeeze/chosen_delta_ref"] for r in runs]
    assert rows[1]["chosen_delta"] == pytest.approx(Stat(statistics.mean(deltas), statistics.stdev(deltas), 2))


def test_ratios_against_the_default_and_a_named_baseline(two_by_two):
    groups = _groups(two_by_two)
    sps = {v: statistics.mean(s for s, _ in c) for v, c in COST.items()}
    mem = {v: statistics.mean(m for _, m in c) for v, c in COST.items()}
    rows = summary_table(groups)
    assert rows[0]["step_ratio"] == 1.0 and rows[0]["memory_ratio"] == 1.0
    assert rows[1]["step_ratio"] == pytest.approx(sps["dpo+logits-sam"] / sps["dpo"])
    assert rows[1]["memory_ratio"] == pytest.approx(mem["dpo+logits-sam"] / mem["dpo"], rel=1e-6)
    rows = summary_table(groups, "dpo+logits-sam")
    assert rows[0]["step_ratio"] == pytest.approx(sps["dpo"] / sps["dpo+logits-sam"])
    cost = cost_table(groups, "dpo+logits-sam")
    assert cost[1]["variant"] == "dpo+logits-sam (baseline)" and cost[1]["step_ratio"] == 1.0
    assert cost[0]["peak_memory_gib"].mean == pytest.approx(mem["dpo"] / 2**30, rel=1e-6)
    assert cost[0]["seconds_per_step"].std == pytest.approx(statistics.stdev([1.0, 1.2]))


def test_ratios_are_none_without_run_info(tmp_path):
    dirs = [write_run(tmp_path, "a", files=("metrics", "config")),
            write_run(tmp_path, "b", sam="logits", seconds_per_step=None, peak_memory=None)]
    rows = summary_table(_groups(dirs))
    assert [r["step_ratio"] for r in rows] == [None, None]
    assert "win_rate/vader" in rows[0] and rows[0]["win_rate/vader"] is None  # only b has eval_results.json


def test_eval_table_has_record_and_eval_results_keys(two_by_two):
    groups = _groups(two_by_two)
    rows = {r["metric"]: r for r in eval_table(groups)}
    assert "eval_runtime" not in rows and "eval_samples_per_second" not in rows
    assert {"eval_loss", "eval_rewards/accuracies", "eval/margin", "flatness/hessian_trace"} <= set(rows)
    margins = rows["eval/margin"]["dpo+logits-sam"]
    assert margins.mean == pytest.approx(statistics.mean([0.3, 1.3]))
    assert margins.std == pytest.approx(statistics.stdev([0.3, 1.3]))


def test_rho_sweep_found_with_its_reference(rho_sweep, two_by_two):
    sweeps = rho_sweeps(_groups(rho_sweep))
    assert len(sweeps) == 1
    assert [rho for rho, _ in sweeps[0].points] == [1e-5, 1e-4, 1e-3]
    assert sweeps[0].references == ["ipo"] and sweeps[0].label == "ipo+logits-sam"
    assert rho_sweeps(_groups(two_by_two)) == []  # one rho only


def test_rho_sweep_needs_configs_that_differ_only_in_rho(tmp_path):
    dirs = [write_run(tmp_path, "a", sam="logits", rho=1e-4), write_run(tmp_path, "b", sam="logits", rho=1e-3)]
    config = dirs[1] / "logitsam_config.yaml"
    config.write_text(config.read_text().replace("beta: 0.1", "beta: 0.5"))
    assert rho_sweeps(_groups(dirs)) == []


def test_format_table():
    rows = [{"variant": "a|b", "eval_accuracy": Stat(0.61234, 0.0123, 2), "seeds": 2},
            {"variant": "c", "eval_accuracy": Stat(0.5, 0.0, 1), "step_ratio": None}]
    assert format_table(rows).splitlines() == [
        "| variant | eval accuracy | seeds | s/step vs baseline |",
        "|---|---|---|---|",
        "| a\\|b | 0.6123 ± 0.012 | 2 | n/a |",
        "| c | 0.5 | n/a | n/a |",
    ]


def _llm_results(seed: int, sam: str) -> dict:
    """An LLM judge named with '/' (as served models are) and a reward model: what `logitsam eval` writes."""
    rate = 0.6 + 0.1 * seed + (0.05 if sam != "none" else 0.0)
    return {"winrate/llm:org/model/win_rate": rate, "winrate/llm:org/model/ci_low": rate - 0.2,
            "winrate/llm:org/model/ci_high": rate + 0.1, "winrate/llm:org/model/invalid": 3 + seed,
            "winrate/llm:org/model/length_adjusted_win_rate": rate - 0.01, "winrate/llm:org/model/wins": 20,
            "winrate/reward:org/rm/win_rate": 0.45, "winrate/reward:org/rm/ci_low": 0.4,
            "winrate/reward:org/rm/ci_high": 0.5}


def test_summary_shows_each_judge_with_interval_and_invalid_count(tmp_path):
    """llm:org/model, dpo: win rates 0.6, 0.7 (seeds 0, 1): mean 0.65, Wilson bounds 0.4, 0.5 -> 0.45 and
    0.7, 0.8 -> 0.75, invalid 3, 4 -> 3.5, length-adjusted 0.64; one seed of dpo+logits-sam: 0.65 [0.45, 0.75]."""
    dirs = [write_run(tmp_path, f"dpo-s{seed}", seed=seed, variant="dpo", extra_results=_llm_results(seed, "none"))
            for seed in (0, 1)]
    dirs.append(write_run(tmp_path, "sam-s0", sam="logits", seed=0, variant="dpo+logits-sam",
                          extra_results=_llm_results(0, "logits")))
    rows = summary_table(_groups(dirs))
    dpo, sam = rows
    assert dpo["win_rate/llm:org/model"].mean == pytest.approx(0.65)
    assert dpo["win_rate_ci/llm:org/model"] == "[0.45, 0.75] (mean of 2)"
    assert dpo["invalid/llm:org/model"].mean == pytest.approx(3.5)
    assert dpo["length_adjusted/llm:org/model"].mean == pytest.approx(0.64)
    assert sam["win_rate_ci/llm:org/model"] == "[0.45, 0.75]"
    assert sam["win_rate/reward:org/rm"].mean == pytest.approx(0.45) and "invalid/reward:org/rm" not in sam
    table = format_table(rows)
    header = table.splitlines()[0]
    for label in ("win rate (llm:org/model)", "Wilson 95 % CI (llm:org/model)", "invalid verdicts (llm:org/model)",
                  "length-adjusted win rate (llm:org/model)", "win rate (reward:org/rm)", "win rate (vader)"):
        assert f"| {label} |" in header
    assert "| 0.65 | [0.45, 0.75] |" in table.splitlines()[3]  # dpo+logits-sam, one seed
    md = Path(build_report(dirs, tmp_path / "report")["markdown"]).read_text()
    assert "invalid verdicts (llm:org/model)" in md and "[0.45, 0.75] (mean of 2)" in md
