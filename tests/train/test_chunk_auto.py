"""`sam_chunk_size: auto`: the chunked head when one micro-batch's fp32 logits exceed the budget."""

import pytest
import yaml
from _run_config import run_config, write_pairs

import logitsam.train.run as run
from logitsam.core.head_chunked import DEFAULT_CHUNK_SIZE
from logitsam.demo.run import demo_plan
from logitsam.train import build_config
from logitsam.train.run import LOGITS_BUDGET_BYTES, TRAINING_DEFAULTS, resolve_chunk_size, run_training

SMOLLM2_VOCAB = 49_152
QWEN_VOCAB = 151_936


def test_auto_picks_chunked_for_a_152k_vocabulary_at_8k_tokens():
    # 8,192 x 151,936 x 4 bytes = 4.6 GiB > 1 GiB
    assert resolve_chunk_size("auto", tokens=8192, vocab_size=QWEN_VOCAB) == DEFAULT_CHUNK_SIZE


@pytest.mark.parametrize("quick", [False, True])
def test_auto_picks_dense_for_the_demo(quick):
    train = demo_plan(quick)["train"]
    batch = max(train["per_device_train_batch_size"], TRAINING_DEFAULTS["per_device_eval_batch_size"])
    tokens = 2 * batch * train["max_length"]  # full demo: 640 tokens x 49,152 x 4 = 0.12 GiB
    assert resolve_chunk_size("auto", tokens=tokens, vocab_size=SMOLLM2_VOCAB) is None


def test_auto_picks_dense_for_the_smollm2_recipe():
    recipe = yaml.safe_load(open("recipes/smollm2_hh_dpo_logits_sam.yaml"))
    tokens = 2 * max(recipe["per_device_train_batch_size"], recipe["per_device_eval_batch_size"]) * recipe["max_length"]
    assert resolve_chunk_size("auto", tokens=tokens, vocab_size=SMOLLM2_VOCAB) is None  # 3,072 tokens: 0.56 GiB


def test_the_budget_is_a_strict_bound_and_explicit_values_pass_through():
    at_budget = LOGITS_BUDGET_BYTES // (4 * SMOLLM2_VOCAB)
    assert resolve_chunk_size("auto", tokens=at_budget, vocab_size=SMOLLM2_VOCAB) is None
    assert resolve_chunk_size("auto", tokens=at_budget + 1, vocab_size=SMOLLM2_VOCAB) == DEFAULT_CHUNK_SIZE
    assert resolve_chunk_size(None, tokens=10**6, vocab_size=QWEN_VOCAB) is None
    assert resolve_chunk_size(128, tokens=1, vocab_size=2) == 128


def test_config_default_is_auto_and_bad_values_name_the_key():
    assert build_config(None, {}).sam_chunk_size == "auto"
    assert build_config(None, {"sam_chunk_size": "null"}).sam_chunk_size is None
    assert build_config(None, {"sam_chunk_size": "256"}).sam_chunk_size == 256
    for bad in ("0", "-3", "big", "true", "1.5"):
        with pytest.raises(ValueError, match="sam_chunk_size"):
            build_config(None, {"sam_chunk_size": bad})


@pytest.mark.parametrize("budget,expected", [(LOGITS_BUDGET_BYTES, "dense"), (1, f"chunked({DEFAULT_CHUNK_SIZE})")])
def test_the_run_resolves_auto_and_logs_the_path(tiny_model_dir, tmp_path, monkeypatch, caplog, budget, expected):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run, "LOGITS_BUDGET_BYTES", budget)
    with caplog.at_level("INFO", logger="logitsam.train"):
        run_training(run_config(tiny_model_dir, pairs, tmp_path / "run", max_steps=1, eval_size=0, sam="logits"))
    assert f"head={expected}" in caplog.text  # what the trainer was given
    assert "LM head: " + ("dense" if expected == "dense" else "chunked") in caplog.text
