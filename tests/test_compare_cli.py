"""`logitsam compare` and `logitsam report` through the real CLI on a tiny model (subprocess runs)."""

import json
from html.parser import HTMLParser

from logitsam.cli import main
from logitsam.compare import parse_variant


def test_parse_variant():
    v = parse_variant("dpo+sam:sam=logits,sam_rho=1e-3")
    assert v.name == "dpo+sam" and v.overrides == {"sam": "logits", "sam_rho": "1e-3"}
    assert parse_variant("plain").overrides == {}


def test_compare_two_variants_and_report(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no no {i}"} for i in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    main(["compare", "--variants", "dpo:sam=none", "dpo+logits-sam:sam=logits,sam_rho=0.05", "--seeds", "0",
          "--output_dir", str(out), "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
          "--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_size", "2", "--learning_rate", "0.01",
          "--logging_steps", "1", "--use_cpu", "true", "--max_length", "32", "--max_prompt_length", "16"])
    printed = capsys.readouterr().out
    assert "dpo+logits-sam" in printed and "report:" in printed
    for name in ("dpo", "dpo_logits-sam"):
        info = json.loads((out / "runs" / name / "seed-0" / "run_info.json").read_text())
        assert info["seconds_per_step"] > 0 and info["peak_memory_bytes"] > 0 and info["seed"] == 0
    html = (out / "report.html").read_text()
    HTMLParser().feed(html)
    assert "data:image/png;base64," in html and "dpo+logits-sam" in html
    md = (out / "report.md").read_text()
    for line in md.splitlines():
        if "](" in line and ".png" in line:
            assert (out / line.split("](")[1].split(")")[0]).exists()
    # rebuild from the finished runs
    main(["report", str(out / "runs"), "--output_dir", str(tmp_path / "again")])
    assert (tmp_path / "again" / "report.html").exists()
