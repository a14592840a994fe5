"""The trainer end to end on a tiny random Llama: SAM modes, losses, resume, accumulation, non-finite."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from logitsam.train import build_config
from logitsam.train.run import run_training
from logitsam.train.trainer import NonFiniteLossError, PreferenceTrainer


def config(tiny_model_dir, pairs_file, out, cache, **overrides):
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(pairs_file),
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_steps": 1000,
        "eval_size": 4,
        "max_length": 48,
        "max_prompt_length": 24,
        "seed": 0,
        "sam_rho": 0.05,
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    values.update(overrides)
    cfg = build_config(None, {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()})
    return cfg


def final_weights(out):
    model = AutoModelForCausalLM.from_pretrained(out)
    return {k: v.clone() for k, v in model.state_dict().items()}


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sam", ["none", "logits", "full"])
def test_each_sam_mode_trains_and_saves(tiny_model_dir, pairs_file, tmp_path, cache, sam):
    out = tmp_path / f"run-{sam}"
    result = run_training(config(tiny_model_dir, pairs_file, out, cache, sam=sam))
    assert result["global_step"] == 3
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = final_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = records(out)
    train_logs = [r for r in logs if "loss" in r]
    assert len(train_logs) == 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected"):
        assert key in train_logs[0] and all(map(lambda r: r[key] == r[key], train_logs)), key
    if sam == "none":
        assert "sam/loss_pre" not in train_logs[0]
    else:
        for r in train_logs:
            assert r["sam/loss_post"] > r["sam/loss_pre"] and r["sam/grad_norm"] > 0
    assert "eval_rewards/accuracies" in result["metrics"] and "eval_loss" in result["metrics"]
    # step 1 uses the initial policy = reference: all rewards are exactly 0 and the clean loss is log 2
    assert train_logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    clean_loss = train_logs[0]["loss"] if sam == "none" else train_logs[0]["sam/loss_pre"]
    assert clean_loss == pytest.approx(0.693147, abs=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "cpo", "slic"])
def test_losses_through_the_trainer(tiny_model_dir, pairs_file, tmp_path, cache, loss_type):
    out = tmp_path / loss_type
    run_training(config(tiny_model_dir, pairs_file, out, cache, loss_type=loss_type, sam="logits", max_steps=2))
    train_logs = [r for r in records(out) if "loss" in r]
    assert len(train_logs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_logs)
    # reference-free losses load no reference: no cached reference values were written
    ref_cache = cache / "ref_logps"
    if loss_type in ("simpo", "cpo", "slic"):
        assert not ref_cache.exists() or not any(ref_cache.iterdir())


def test_resume_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path, cache):
    straight = tmp_path / "straight"
    run_training(config(tiny_model_dir, pairs_file, straight, cache, max_steps=4, sam="logits"))
    split = tmp_path / "split"
    # the first half: a run that stops at step 2 with a checkpoint (same schedule: max_steps stays 4)
    cfg = config(tiny_model_dir, pairs_file, split, cache, max_steps=4, sam="logits", save_steps=2)
    cfg.training_args["max_steps"] = 4
    from logitsam.train.run import build_training_args

    class StopAt2(Exception):
        pass

    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise StopAt2

    orig_init = PreferenceTrainer.__init__

    def init_with_stop(self, *a, **kw):
        orig_init(self, *a, **kw)
        self.add_callback(Stop())

    PreferenceTrainer.__init__ = init_with_stop
    try:
        with pytest.raises(StopAt2):
            run_training(cfg)
    finally:
        PreferenceTrainer.__init__ = orig_init
    assert (split / "checkpoint-2").exists()
    assert build_training_args(cfg).max_steps == 4
    resumed = config(tiny_model_dir, pairs_file, split, cache, max_steps=4, sam="logits", save_steps=2,
                     resume_from_checkpoint=str(split / "checkpoint-2"))
    run_training(resumed)
    a, b = final_weights(straight), final_weights(split)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    steps = [r["step"] for r in records(split) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the resumed run continues the same metrics file
    # every logged step, not only the end: the same losses and SAM values as the uninterrupted run
    keys = ("loss", "sam/loss_pre", "sam/loss_post", "rewards/margins", "learning_rate")
    logged = [r[k] for r in records(split) if "loss" in r for k in keys]
    expected = [r[k] for r in records(straight) if "loss" in r for k in keys]
    assert len(logged) == 4 * len(keys) and logged == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_accumulation_equals_bigger_batch(tiny_model_dir, pairs_file, tmp_path, cache):
    """Batch 4 x accumulation 1 == batch 2 x accumulation 2 (plain DPO).

    SGD, because Adam's per-coordinate normalisation turns float noise in near-zero gradients
    (padding differs between the two layouts) into full-size update differences.
    """
    a, b = tmp_path / "a", tmp_path / "b"
    run_training(config(tiny_model_dir, pairs_file, a, cache, max_steps=2, eval_size=0, optim="sgd"))
    run_training(config(tiny_model_dir, pairs_file, b, cache, max_steps=2, eval_size=0, optim="sgd",
                        per_device_train_batch_size=2, gradient_accumulation_steps=2))
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5, msg=k)


def test_nonfinite_loss_stops_or_skips(tiny_model_dir, pairs_file, tmp_path, cache, monkeypatch):
    orig = PreferenceTrainer._loss_fn

    def poisoned(self, *args):
        fn = orig(self, *args)
        return lambda out: fn(out) * float("nan") if self.state.global_step == 1 else fn(out)

    monkeypatch.setattr(PreferenceTrainer, "_loss_fn", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        run_training(config(tiny_model_dir, pairs_file, tmp_path / "stop", cache, on_nonfinite="stop", save_steps=1))
    assert not (tmp_path / "stop" / "checkpoint-2").exists()
    out = tmp_path / "skip"
    run_training(config(tiny_model_dir, pairs_file, out, cache, on_nonfinite="skip", max_steps=3, eval_size=0))
    logs = [r for r in records(out) if "loss" in r]
    assert len(logs) == 3 and logs[1].get("nonfinite_skipped") == 1.0
    assert all(torch.isfinite(v).all() for v in final_weights(out).values())


def test_reference_cache_is_reused(tiny_model_dir, pairs_file, tmp_path, cache, caplog):
    run_training(config(tiny_model_dir, pairs_file, tmp_path / "one", cache, max_steps=1))
    files = list((cache / "ref_logps").iterdir())
    assert len(files) == 2  # train and eval parts
    with caplog.at_level("INFO", logger="logitsam.train"):
        run_training(config(tiny_model_dir, pairs_file, tmp_path / "two", cache, max_steps=1))
    assert "reused from cache" in caplog.text
    assert sorted(files) == sorted((cache / "ref_logps").iterdir())
    # a different tokenisation gives a new fingerprint
    run_training(config(tiny_model_dir, pairs_file, tmp_path / "three", cache, max_steps=1, max_prompt_length=8))
    assert len(list((cache / "ref_logps").iterdir())) == 4


def test_on_the_fly_reference_equals_precomputed(tiny_model_dir, pairs_file, tmp_path, cache):
    """A frozen reference copy run per batch gives the same training as cached reference log-probs."""
    a, b = tmp_path / "pre", tmp_path / "fly"
    run_training(config(tiny_model_dir, pairs_file, a, cache, max_steps=2, sam="logits"))
    run_training(config(tiny_model_dir, pairs_file, b, cache, max_steps=2, sam="logits",
                        precompute_ref_log_probs=False))
    la, lb = [r for r in records(a) if "loss" in r], [r for r in records(b) if "loss" in r]
    for ra, rb in zip(la, lb, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["rewards/margins"] == pytest.approx(ra["rewards/margins"], abs=1e-6)
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("precompute", [True, False])
def test_peft_reference_is_the_policy_without_adapters(tiny_model_dir, pairs_file, tmp_path, cache, precompute):
    out = tmp_path / f"lora-{precompute}"
    result = run_training(config(tiny_model_dir, pairs_file, out, cache, max_steps=2, sam="logits", use_peft=True,
                                 lora_r=4, lora_alpha=8, precompute_ref_log_probs=precompute, report_to="tensorboard"))
    logs = [r for r in records(out) if "loss" in r]
    # LoRA's B starts at zero: at step 1 the policy equals the adapter-free reference exactly
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["sam/loss_pre"] == pytest.approx(0.693147, abs=1e-5)
    assert (out / "adapter_model.safetensors").exists() and result["global_step"] == 2
    assert list(out.rglob("events.out.tfevents*")), "report_to=tensorboard wrote no event file"


def test_gradient_checkpointing_through_the_trainer_equals_off(tiny_model_dir, pairs_file, tmp_path, cache,
                                                               monkeypatch):
    """``gradient_checkpointing: true``: load_model enables non-reentrant checkpointing and Trainer.train enables it
    again with ``gradient_checkpointing_kwargs`` (made explicit: non-reentrant). Two logits-SAM steps with SGD land
    on the same weights as without checkpointing, so every gradient, the backbone's recomputed ones included, is
    the same; and the checkpointing really ran, non-reentrant."""
    import logitsam.train.run as run

    loaded = []
    real = run.load_policy
    monkeypatch.setattr(run, "load_policy", lambda cfg: loaded.append(real(cfg)) or loaded[-1])
    runs = {}
    for on in (False, True):
        runs[on] = tmp_path / f"gc-{on}"
        run_training(config(tiny_model_dir, pairs_file, runs[on], cache, max_steps=2, eval_size=0, optim="sgd",
                            sam="logits", learning_rate=0.1, gradient_checkpointing=on))
    model = loaded[-1][1]
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func.keywords.get("use_reentrant") is False for m in layers)
    w_off, w_on = final_weights(runs[False]), final_weights(runs[True])
    assert any(not torch.equal(w_off[k], v) for k, v in final_weights(tiny_model_dir).items())
    for k in w_off:
        torch.testing.assert_close(w_on[k], w_off[k], atol=1e-6, rtol=0, msg=k)
