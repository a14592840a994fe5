"""The trainer in bf16: logits-SAM's live first-order check, and weights that can (or cannot) learn."""

import json

import pytest
import torch
from test_trainer import config, records
from transformers import AutoModelForCausalLM

from logitsam.train.run import run_training
from logitsam.train.trainer import ratio_is_measurable, unmastered_half_params


def _ratios(out):
    return [r["sam/first_order_ratio"] for r in records(out) if "sam/first_order_ratio" in r]


@pytest.mark.parametrize("dtype,bf16", [("float32", True), ("bfloat16", False), ("bfloat16", True)])
def test_logged_first_order_ratio_is_one_in_bf16(tiny_model_dir, pairs_file, tmp_path, cache, dtype, bf16):
    """bf16 autocast over fp32 weights, and pure bf16 weights: eps acts, so r = 1 + O(rho)."""
    out = tmp_path / "run"
    run_training(config(tiny_model_dir, pairs_file, out, cache, sam="logits", sam_rho=1e-3, dtype=dtype,
                        bf16=bf16, learning_rate=1e-3))
    ratios = _ratios(out)
    assert len(ratios) == 3
    assert all(abs(r - 1) < 0.1 for r in ratios), ratios


def test_rounded_away_perturbation_warns_once(tiny_model_dir, pairs_file, tmp_path, cache, caplog, monkeypatch):
    """With the old fused ``W + eps`` in bf16 (eps rounds away), the run says so, once."""
    from logitsam.core import head, head_chunked

    def fused(delta, dtype, block=None):  # eps in the compute dtype, added to the weight: rounds away in bf16
        if isinstance(delta, head.SplitDelta):
            return delta.dense().to(dtype)
        return None if delta is None else delta.detach()

    monkeypatch.setattr(head, "split_delta", fused)
    monkeypatch.setattr(head_chunked, "split_delta", fused)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="logitsam.train"):
        run_training(config(tiny_model_dir, pairs_file, out, cache, sam="logits", sam_rho=1e-4, dtype="bfloat16"))
    assert caplog.text.count("sam/first_order_ratio =") == 1
    assert "below the working precision" in caplog.text
    assert all(abs(r) < 0.5 for r in _ratios(out)), _ratios(out)


def test_ratio_measurability():
    assert ratio_is_measurable(0.69, 1e-4) and not ratio_is_measurable(0.69, 1e-7)
    assert not ratio_is_measurable(100.0, 1e-4)  # float32 spacing at 100 is 7.6e-6


def _moved_fraction(before, after):
    """Fraction of entries of the transformer-layer and head weights that changed (embeddings excluded:
    rows of tokens absent from the batch get no gradient)."""
    moved = total = 0
    for name, b in before.items():
        if "embed_tokens" in name:
            continue
        a = after[name].to(b.dtype)
        moved += int((a != b).sum())
        total += b.numel()
    return moved / total


@pytest.mark.parametrize("dtype,bf16,expect_moved", [("bfloat16", False, False), ("float32", True, True)])
def test_pure_bf16_adamw_drops_updates(tiny_model_dir, pairs_file, tmp_path, cache, caplog, dtype, bf16,
                                       expect_moved):
    """AdamW at lr 5e-7 (the Mistral recipe's): its first step moves each weight by ~lr, far below bf16's
    spacing (~1e-4 at |w| ~ 0.02), so pure-bf16 weights stay put; fp32 master weights + bf16 autocast move."""
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="logitsam.train"):
        run_training(config(tiny_model_dir, pairs_file, out, cache, sam="logits", sam_rho=1e-3, dtype=dtype,
                            bf16=bf16, learning_rate=5e-7, max_steps=1))
    model_dtype = getattr(torch, dtype)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    before = {k: v.to(model_dtype) for k, v in initial.items()}
    after = AutoModelForCausalLM.from_pretrained(out, dtype=model_dtype).state_dict()
    moved = _moved_fraction(before, after)
    warned = "the optimizer keeps no float32 copy" in caplog.text
    if expect_moved:
        assert moved > 0.95 and not warned, moved
    else:
        assert moved < 0.05 and warned, moved


def test_float16_weights_are_refused(tiny_model_dir, pairs_file, tmp_path, cache):
    with pytest.raises(ValueError, match="float16 weights cannot be trained"):  # a ConfigError
        run_training(config(tiny_model_dir, pairs_file, tmp_path / "run", cache, dtype="float16"))


def test_fp16_autocast_trains_with_logits_sam(tiny_model_dir, pairs_file, tmp_path, cache):
    """fp32 weights + fp16 autocast + the Trainer's gradient scaler: finite steps and r ~ 1."""
    out = tmp_path / "run"
    result = run_training(config(tiny_model_dir, pairs_file, out, cache, sam="logits", sam_rho=1e-3, fp16=True,
                                 learning_rate=1e-3))
    assert result["global_step"] == 3
    assert all(abs(r - 1) < 0.1 for r in _ratios(out))
    assert all(json.dumps(r).count("NaN") == 0 for r in records(out))


def test_unmastered_half_params_counts_trainable_half_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[1].requires_grad_(False)
    args = type("Args", (), {"deepspeed": None})()
    assert unmastered_half_params(model, args) == (20, torch.bfloat16)
    args.deepspeed = "ds.json"  # DeepSpeed keeps its own fp32 master weights
    assert unmastered_half_params(model, args) == (0, None)
