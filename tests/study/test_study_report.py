"""The study report from a small committed results folder (made by the fake runner), against hand values."""

import json
import shutil

import pytest
from fake_study import FakeRunner, recipe, write_recipe, ystar

from logitsam.cli import main
from logitsam.study import build_study_report, load_study, run_study


@pytest.fixture
def results(tmp_path, pairs_file):
    """Six finished runs (rho 0 and 1e-2, seeds 1-3), only their small files, as a later session finds them."""
    study = write_recipe(tmp_path / "mini.yaml", recipe(pairs_file))
    out = tmp_path / "docs" / "mini"
    run_study(load_study(study), out, scratch_dir=tmp_path / "scratch", runner=FakeRunner(),
              report=lambda out: {"files": []})
    return out


def test_table_and_paired_difference_match_hand_values(results):
    """chosen Δ: rho 0 gives -1, -2, -4 (seeds 1, 2, 3), rho 1e-2 gives -0.9, -1.8, -3.7.
    rho 0: mean -7/3, s = sqrt(7/3), half width t_{0.975,2} s / sqrt(3) = 4.30265 x 0.881917 = 3.79458.
    Paired differences 0.1, 0.2, 0.3: mean 0.2, s = 0.1, half width 4.30265 x 0.1 / sqrt(3) = 0.248414.
    y* change (step 0 -> step 4): rho 0: 4 x 0.05 = 0.2 per seed (no spread); rho 1e-2: 4 x 0.03 = 0.12."""
    result = build_study_report(results)
    groups = {g["rho"]: g for g in json.loads((results / "summary.json").read_text())["groups"]}
    base, sam = groups[0.0]["metrics"]["chosen_delta"], groups[0.01]["metrics"]["chosen_delta"]
    assert base["mean"] == pytest.approx(-7 / 3) and base["n"] == 3
    assert (base["low"], base["high"]) == (pytest.approx(-7 / 3 - 3.79458, abs=1e-4),
                                           pytest.approx(-7 / 3 + 3.79458, abs=1e-4))
    assert sam["mean"] == pytest.approx(-6.4 / 3)
    diff = groups[0.01]["paired"]["chosen_delta"]
    assert diff["mean"] == pytest.approx(0.2) and diff["high"] - diff["mean"] == pytest.approx(0.248414, abs=1e-5)
    assert groups[0.0]["paired"] == {} and groups[0.01]["baseline"] == {"cell": "main", "rho": 0.0}
    assert groups[0.0]["metrics"]["ystar_delta"]["mean"] == pytest.approx(ystar(4, 0, 1) - ystar(0, 0, 1))
    assert groups[0.01]["metrics"]["ystar_delta"]["mean"] == pytest.approx(0.12)
    assert groups[0.01]["paired"]["ystar_delta"]["mean"] == pytest.approx(-0.08)
    md = (results / "summary.md").read_text()
    assert md == result["markdown"]
    assert "| chosen Δ log-prob vs initial | -2.333 [-6.128, 1.461] | -2.133 [" in md
    assert "+0.2 [-0.04841, +0.4484]" in md
    assert "VADER win rate" not in md  # a metric no run has is left out
    assert (results / "fig1c.png").read_bytes()[:4] == b"\x89PNG"


def test_figure_draws_dpo_best_and_largest_rho(results):
    build_study_report(results)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["figure_rhos"] == [0.0, 0.01]
    curve = summary["curves"]["1e-2"]["squeeze/argmax_logp_chosen"]
    assert curve["change"] == pytest.approx(0.12)  # mean over seeds, step 0 -> 4


def test_paired_figure_is_the_seedwise_difference(results):
    """Fake runs: y* of rho 1e-2 minus rho 0 is -0.02 x step for every seed (zero spread); chosen and
    rejected curves are the same for both rhos, so their paired difference is 0 at every step."""
    result = build_study_report(results)
    paired = json.loads((results / "summary.json").read_text())["paired_curves"]
    assert set(paired) == {"1e-2"}
    ystar_last = paired["1e-2"]["squeeze/argmax_logp_chosen"]
    assert ystar_last["step"] == 4 and ystar_last["n"] == 3
    assert ystar_last["mean"] == pytest.approx(-0.08)
    assert ystar_last["high"] - ystar_last["low"] == pytest.approx(0.0, abs=1e-12)
    assert paired["1e-2"]["squeeze/chosen_logps_per_token"]["mean"] == pytest.approx(0.0)
    assert (results / "fig1c_paired.png").read_bytes()[:4] == b"\x89PNG"
    assert str(results / "fig1c_paired.png") in result["files"]
    assert "(fig1c_paired.png)" in result["markdown"]


def test_paired_curve_bands_pairs_by_seed_and_step():
    """Seeds and steps only one side holds are left out; the interval is over the seedwise differences."""
    from logitsam.report.runs import Run
    from logitsam.study.report import paired_curve_bands

    def run(values):
        return Run(path=None, variant="x", seed=None, eval=[{"step": s, "k": v} for s, v in values.items()])

    treatment = {1: run({0: 1.0, 10: 2.0, 20: 9.0}), 2: run({0: 1.0, 10: 3.0}), 3: run({0: 5.0})}
    baseline = {1: run({0: 1.0, 10: 1.0}), 2: run({0: 1.0, 10: 1.0})}
    steps, bands = paired_curve_bands(treatment, baseline, "k")
    assert steps == [0, 10]
    assert [b.n for b in bands] == [2, 2]
    assert bands[0].mean == 0.0 and bands[1].mean == pytest.approx(1.5)  # (1 + 2) / 2


def test_cli_report_rebuilds_from_the_folder_alone(results, tmp_path, capsys):
    shutil.rmtree(tmp_path / "scratch", ignore_errors=True)  # weights, logs, configs: not needed
    main(["report", str(results)])
    assert "paired difference to rho 0 of the main grid" in capsys.readouterr().out
    assert (results / "summary.md").exists()
    (results / "summary.md").unlink()
    main(["study", "--report_only", "--output_dir", str(results)])
    assert (results / "summary.md").exists()


def test_judged_win_rates_with_their_interval_and_invalid_count(results):
    """Adds an LLM judge named with '/' and a reward model to each run's eval_results.json.
    llm:org/model win rate: 0.5 + 0.05 seed, + 0.1 at rho 1e-2: rho 0 gives 0.55, 0.6, 0.65: mean 0.6,
    s = 0.05, half width 4.30265 x 0.05 / sqrt(3) = 0.124207 -> [0.4758, 0.7242]; paired difference 0.1 each seed.
    Wilson bounds: rate -/+ 0.1; invalid verdicts 1, 2, 3: mean 2, half width 4.30265 / sqrt(3) = 2.48414."""
    for path in (results / "runs").glob("*/eval_results.json"):
        record = json.loads((path.parent / "study_run.json").read_text())
        seed, rho = record["seed"], record["rho"]
        rate = 0.5 + 0.05 * seed + (0.1 if rho > 0 else 0.0)
        extra = {"winrate/llm:org/model/win_rate": rate, "winrate/llm:org/model/ci_low": rate - 0.1,
                 "winrate/llm:org/model/ci_high": rate + 0.1, "winrate/llm:org/model/invalid": seed,
                 "winrate/llm:org/model/length_adjusted_win_rate": rate, "winrate/llm:org/model/opponent": "reference",
                 "winrate/reward:org/rm/win_rate": 0.4}
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    md = build_study_report(results)["markdown"]
    means, paired = md.split("paired difference to", 1)
    assert "| llm:org/model win rate vs initial | 0.6 [0.4758, 0.7242] | 0.7 [0.5758, 0.8242] |" in means
    assert "| llm:org/model win rate, Wilson 95 % CI low | 0.5 [0.3758, 0.6242] |" in means
    assert "| llm:org/model win rate, Wilson 95 % CI high | 0.7 [0.5758, 0.8242] |" in means
    assert "| llm:org/model invalid verdicts (pairs) | 2 [-0.4841, 4.484] | 2 [-0.4841, 4.484] |" in means
    assert "| llm:org/model length-adjusted win rate | 0.6 [" in means
    assert "| reward:org/rm win rate vs initial | 0.4 [0.4, 0.4] |" in means
    assert "| llm:org/model win rate vs initial | +0.1 [+0.1, +0.1] |" in paired
    assert "CI low" not in paired and "invalid verdicts" not in paired  # per-run bounds and counts: not paired
    groups = {g["rho"]: g for g in json.loads((results / "summary.json").read_text())["groups"]}
    assert groups[0.01]["paired"]["winrate/llm:org/model/win_rate"]["mean"] == pytest.approx(0.1)
    assert "labels" not in groups[0.0]
