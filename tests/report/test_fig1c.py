"""Fig. 1c curves come from the fixed held-out eval records when a run has them."""

import json

import pytest

from logitsam.report.fig1c import CURVES, curves, plot_fig1c


def _run(path, eval_values, train_values):
    path.mkdir(parents=True)
    records = []
    for step, (ev, tv) in enumerate(zip(eval_values, train_values, strict=True)):
        records.append({"step": step, "loss": 0.7, **{key: tv for key, _ in CURVES}})
        records.append({"step": step, "eval_loss": 0.7, **{"eval_" + key: ev for key, _ in CURVES}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "logitsam_config.yaml").write_text("sam: none\nloss_type: sigmoid\n")
    return path


def test_fig1c_prefers_eval_records(tmp_path):
    a = _run(tmp_path / "a", [-3.0, -3.1, -3.3], [9.0, 9.0, 9.0])
    b = _run(tmp_path / "b", [-3.0, -2.9, -2.8], [9.0, 9.0, 9.0])
    steps, values = curves(a)["squeeze/chosen_logps_per_token"]
    assert steps == [0, 1, 2] and values == [-3.0, -3.1, -3.3]
    summary = plot_fig1c({"dpo": a, "sam": b}, tmp_path / "fig.png", title="t")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert summary["dpo"]["squeeze/chosen_logps_per_token"]["change"] == pytest.approx(-0.3)
    assert summary["sam"]["squeeze/argmax_logp_chosen"]["last"] == pytest.approx(-2.8)
