"""`logitsam compare` and `logitsam report` through the real CLI on a tiny model (subprocess runs)."""

import json
from pathlib import Path

import pytest
from html_report import read_report

from logitsam.cli import main
from logitsam.compare import parse_variant
from logitsam.report.tables import format_cell


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
    accuracy, step_time = {}, {}
    for variant, name in (("dpo", "dpo"), ("dpo+logits-sam", "dpo_logits-sam")):
        run = out / "runs" / name / "seed-0"
        info = json.loads((run / "run_info.json").read_text())
        assert info["seconds_per_step"] > 0 and info["peak_memory_bytes"] > 0 and info["seed"] == 0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        accuracy[variant] = format_cell(float([r for r in records if "eval_rewards/accuracies" in r][-1]
                                              ["eval_rewards/accuracies"]))
        step_time[variant] = format_cell(float(info["seconds_per_step"]))
    page = read_report(out / "report.html")  # every image loads and has a caption
    summary = {r["variant"]: r for r in page.table("Summary")}
    assert list(summary) == ["dpo (baseline)", "dpo+logits-sam"]
    assert [r["seeds"] for r in summary.values()] == ["1", "1"]
    assert summary["dpo (baseline)"]["eval accuracy"] == accuracy["dpo"]
    assert summary["dpo+logits-sam"]["eval accuracy"] == accuracy["dpo+logits-sam"]
    cost = {r["variant"]: r for r in page.table("Cost")}
    assert cost["dpo (baseline)"]["s/step"] == step_time["dpo"]
    assert cost["dpo+logits-sam"]["s/step"] == step_time["dpo+logits-sam"]
    assert "Training curves" in [f.alt for f in page.figures]
    assert sorted(f.png for f in page.figures) == sorted(p.read_bytes() for p in (out / "plots").glob("*.png"))
    md = (out / "report.md").read_text()
    for line in md.splitlines():
        if "](" in line and ".png" in line:
            assert (out / line.split("](")[1].split(")")[0]).exists()
    # rebuild from the finished runs
    main(["report", str(out / "runs"), "--output_dir", str(tmp_path / "again")])
    assert read_report(tmp_path / "again" / "report.html").table("Summary") == page.table("Summary")


def test_a_rerun_replaces_the_earlier_run_whole(tmp_path, monkeypatch):
    """`make demo` twice into one folder (skip_existing=False): the second run's eval is computed again, and
    nothing of the first run (its eval, samples, checkpoints) survives to be reported as the second's."""
    import logitsam.compare as compare
    import logitsam.eval.run as eval_run

    calls = {"train": 0, "eval": 0}

    def fake_train(config, params, run_dir, *, log_path):
        calls["train"] += 1
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"checkpoint-{calls['train']}").mkdir()
        (run_dir / "run_info.json").write_text(json.dumps({"seed": params["seed"], "seconds_per_step": 1.0}))

    def fake_eval(model, *, output_dir, seed, **kwargs):
        calls["eval"] += 1
        (Path(output_dir) / "eval_results.json").write_text(json.dumps({"eval/preference_accuracy": calls["eval"]}))

    monkeypatch.setattr(compare, "train_run", fake_train)
    monkeypatch.setattr(eval_run, "evaluate", fake_eval)
    monkeypatch.setattr("logitsam.report.build_report", lambda run_dirs, out, **kw: {"summary": []})
    monkeypatch.setattr("logitsam.report.format_table", lambda summary: "")
    variants = [compare.Variant("dpo", {"sam": "none"})]
    run = tmp_path / "runs" / "dpo" / "seed-0"
    for expected in (1, 2):
        compare.run_compare(None, tmp_path, variants=variants, seeds=[0], eval_kwargs={"split": "x"},
                            skip_existing=False)
        assert json.loads((run / "eval_results.json").read_text())["eval/preference_accuracy"] == expected
        assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{expected}"]
    compare.run_compare(None, tmp_path, variants=variants, seeds=[0], eval_kwargs={"split": "x"})  # reuse
    assert calls == {"train": 2, "eval": 2}


def _compare_kwargs(monkeypatch, argv):
    """Runs `logitsam compare ARGV` up to run_compare and returns what it was called with."""
    import logitsam.compare as compare

    seen = {}

    def fake_run_compare(config, output_dir, **kwargs):
        seen.update(kwargs)
        return {"table": "", "html": "r.html", "markdown": "r.md"}

    monkeypatch.setattr(compare, "run_compare", fake_run_compare)
    main(["compare", "--variants", "dpo:sam=none", *argv])
    return seen


def test_compare_passes_an_llm_judge_and_its_flags_to_eval(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    seen = _compare_kwargs(monkeypatch, [
        "--eval_dataset_name", "pairs.jsonl", "--judge", "vader", "--judge", "llm:Qwen/Qwen2.5-7B-Instruct",
        "--judge_against", "chosen", "--judge_orders", "random", "--judge_max_tokens", "32",
        "--judge_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "cmp")])
    kw = seen["eval_kwargs"]
    assert kw["judges"] == ("vader", "llm:Qwen/Qwen2.5-7B-Instruct") and kw["judge_against"] == "chosen"
    assert kw["llm_judge"] == {"both_orders": False, "seed": 0, "max_tokens": 32, "cache_dir": str(tmp_path / "cache")}
    assert "api_key" not in kw["llm_judge"]  # read from OPENAI_API_KEY by the judge itself
    plain = _compare_kwargs(monkeypatch, ["--eval_dataset_name", "pairs.jsonl", "--output_dir", str(tmp_path / "p")])
    assert plain["eval_kwargs"]["judges"] == ("vader",) and plain["eval_kwargs"]["llm_judge"] is None


def test_compare_judge_errors_are_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cases = [
        (["--judge", "llm:fake"], "--judge llm:fake judges each run's samples: add --eval_dataset_name"),
        (["--eval_dataset_name", "p.jsonl", "--judge", "llm:fake"], "needs an API key: set OPENAI_API_KEY"),
        (["--eval_dataset_name", "p.jsonl", "--judge_orders", "both"], "--judge_orders both needs an LLM judge"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as err:
            _compare_kwargs(monkeypatch, [*argv, "--output_dir", str(tmp_path / "c")])
        assert err.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--judge", "gpt-4"])
    assert "'llm:MODEL'" in capsys.readouterr().err
