"""LogitsSAMDPOTrainer against TRL 1.16's DPOTrainer (sam_rho = 0) and our PreferenceTrainer (logits-SAM).

Each comparison runs both trainers on the same tiny random Llama, the same pairs and the same settings.
With ``sam_rho = 0`` one SGD step must leave the same weights as TRL's (and log the same loss and metrics);
a loss with its sign flipped, a wrong reference or a mis-mapped ``label_smoothing`` moves the weights the
other way. With logits-SAM on, the perturbed loss and every gradient must equal PreferenceTrainer's on the
same tokens (the batch is TRL's, mapped to logitsam's collator keys by ``as_logitsam_batch``).
"""

import copy

import pytest
import torch

pytest.importorskip("trl")

from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainingArguments  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from logitsam.core import IGNORE_INDEX  # noqa: E402
from logitsam.train.trainer import PreferenceTrainer  # noqa: E402
from logitsam.trl import LogitsSAMConfig, LogitsSAMDPOTrainer  # noqa: E402

WORDS = ["good", "bad", "fine", "great", "awful", "nice", "poor", "kind", "rude", "calm"]
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens")
SAM_METRICS = ("loss_pre", "loss_post", "grad_norm", "first_order")


def pairs(n=4):
    rows = [{"prompt": f"Say something {i}:", "chosen": f" {WORDS[i % 10]} {WORDS[i % 10]} day",
             "rejected": f" {WORDS[(3 * i + 1) % 10]} night {i}"} for i in range(n)]
    return Dataset.from_list(rows)


def settings(out, **overrides):
    values = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant", report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                  seed=0, dataloader_num_workers=0, disable_tqdm=True, beta=0.5, max_length=64, bf16=False)
    values.update(overrides)
    return values


def models(tie=False):
    tok = make_tiny_tokenizer()
    return tok, make_tiny_llama(vocab_size=len(tok), tie=tie), make_tiny_llama(vocab_size=len(tok), tie=tie, seed=1)


def one_step(trainer_cls, config_cls, out, tok, model, ref, **overrides):
    args = config_cls(**settings(out, **overrides))
    trainer = trainer_cls(model=copy.deepcopy(model), ref_model=None if ref is None else copy.deepcopy(ref),
                          args=args, train_dataset=pairs(), processing_class=tok)
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    return trainer.state.log_history[0], weights


def assert_same_step(ours, theirs, before):
    """Same loss and metrics, and the same update to every trained weight (the update is far from 0)."""
    (log_a, w_a), (log_b, w_b) = ours, theirs
    assert log_a["loss"] == pytest.approx(log_b["loss"], rel=1e-5, abs=1e-6)
    for key in TRL_METRICS:
        assert log_a[key] == pytest.approx(log_b[key], rel=1e-4, abs=1e-5), key
    assert w_a.keys() == w_b.keys()
    moved = max((w_b[k] - before[k]).abs().max().item() for k in w_b)
    assert moved > 1e-3
    for k in w_a:
        torch.testing.assert_close(w_a[k] - before[k], w_b[k] - before[k], rtol=1e-4, atol=1e-5 * moved, msg=k)


CASES = {
    "sigmoid": {"loss_type": "sigmoid"},
    "ipo": {"loss_type": "ipo"},
    "weighted": {"loss_type": ["sigmoid", "ipo", "sft"], "loss_weights": [0.8, 0.3, 1.0]},
    "sigmoid-ls": {"loss_type": "sigmoid", "label_smoothing": 0.2},  # TRL 1.16 ignores it for sigmoid
    "robust-ls": {"loss_type": "robust", "label_smoothing": 0.2},
    "exo_pair": {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    "discopop": {"loss_type": "discopop", "discopop_tau": 0.3},
    # TRL's loss options (issue: the missing DPOConfig features), each against TRL's own code path
    "forward_kl": {"loss_type": "sigmoid", "f_divergence_type": "forward_kl"},
    "js-ipo": {"loss_type": "ipo", "f_divergence_type": "js_divergence"},
    "alpha-hinge": {"loss_type": "hinge", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    "wpo": {"loss_type": "sigmoid", "use_weighting": True},
    # (not with sft: TRL 1.16 multiplies its expanded scalar in place and raises; ours runs)
    "wpo-weighted": {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5], "use_weighting": True},
    "ld": {"loss_type": "sigmoid", "ld_alpha": 0.3},
    "ld-wpo-js": {"loss_type": "sigmoid_norm", "ld_alpha": 0.5, "use_weighting": True,
                  "f_divergence_type": "js_divergence"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_rho_zero_step_equals_trl(tmp_path, case):
    tok, model, ref = models()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    ours = one_step(LogitsSAMDPOTrainer, LogitsSAMConfig, tmp_path / "ours", tok, model, ref, sam_rho=0.0,
                    **CASES[case])
    theirs = one_step(DPOTrainer, DPOConfig, tmp_path / "trl", tok, model, ref, **CASES[case])
    assert_same_step(ours, theirs, before)
    assert not any(k.startswith("sam/") for k in ours[0])


@pytest.mark.parametrize("reference", ["tied", "precomputed", "peft"])
def test_rho_zero_reference_modes_equal_trl(tmp_path, reference):
    """TRL's reference handling is reused: tied head, precomputed reference log-probs, PEFT adapters off."""
    tok, model, ref = models(tie=reference == "tied")
    extra, kwargs = {}, {}
    if reference == "precomputed":  # computed once before training, by TRL, read from the batch
        extra = {"precompute_ref_log_probs": True}
    if reference == "peft":  # the reference is the policy with its adapters off
        peft = pytest.importorskip("peft")
        ref = None
        kwargs["peft_config"] = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False)
    runs = []
    for trainer_cls, config_cls, more in ((LogitsSAMDPOTrainer, LogitsSAMConfig, {"sam_rho": 0.0}),
                                          (DPOTrainer, DPOConfig, {})):
        args = config_cls(**settings(tmp_path / trainer_cls.__name__, **extra, **more))
        trainer = trainer_cls(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=args,
                              train_dataset=pairs(), processing_class=tok, **kwargs)
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
        trainer.train()
        runs.append((trainer.state.log_history[0],
                     {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}))
    if reference == "peft":
        assert all("lora" in k for k in before)
    assert runs[0][0]["rewards/margins"] != 0.0  # the policy is not its own reference
    assert_same_step(*runs, before)


def test_bf16_autocast_default_close_to_trl(tmp_path):
    """TRL's configs default to bf16 autocast (on CPU too): both heads round differently, the step agrees to bf16."""
    tok, model, ref = models()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    runs = [one_step(LogitsSAMDPOTrainer, LogitsSAMConfig, tmp_path / "ours", tok, model, ref, sam_rho=0.0, bf16=True),
            one_step(DPOTrainer, DPOConfig, tmp_path / "trl", tok, model, ref, bf16=True)]
    assert runs[0][0]["loss"] == pytest.approx(runs[1][0]["loss"], rel=1e-2)
    ua = torch.cat([(runs[0][1][k] - before[k]).flatten() for k in before])
    ub = torch.cat([(runs[1][1][k] - before[k]).flatten() for k in before])
    assert torch.nn.functional.cosine_similarity(ua, ub, dim=0) > 0.999


def as_logitsam_batch(batch):
    """TRL's collated batch -> logitsam's collator keys: labels are the completion tokens, -100 elsewhere."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def grads_of(trainer, model, inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    trainer._flush_metrics("train")  # metrics stay on the device until a logging step reduces them
    sam = {k: trainer._metrics["train"][f"sam/{k}"][-1] for k in SAM_METRICS}
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, sam


FEATURES = {"ld_alpha": 0.4, "use_weighting": True, "f_divergence_type": "js_divergence"}


@pytest.mark.parametrize(("tie", "chunk", "variant", "loss_type", "features"), [
    (False, None, "plain", "sigmoid", {}), (True, None, "plain", "sigmoid", {}), (False, 7, "plain", "ipo", {}),
    (True, 5, "asam", ["sigmoid", "sft"], {}), (False, None, "plain", "sigmoid", FEATURES),
    (True, 5, "plain", "ipo", FEATURES),
])
def test_logits_sam_equals_preference_trainer(tmp_path, tie, chunk, variant, loss_type, features):
    """The perturbed loss, the SAM statistics and every gradient equal PreferenceTrainer's on TRL's tokens
    (with TRL's loss options too: LD-DPO, WPO and an f-divergence in both passes)."""
    tok, model, ref = models(tie=tie)
    rho = 0.05
    args = LogitsSAMConfig(**settings(tmp_path / "ours", sam_rho=rho, sam_chunk_size=chunk, sam_vocab_chunk_size=37,
                                      sam_variant=variant, loss_type=loss_type, **features))
    ours = LogitsSAMDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=args,
                               train_dataset=pairs(), processing_class=tok)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    loss_a, grads_a, sam_a = grads_of(ours, ours.model, batch)

    theirs = PreferenceTrainer(model=copy.deepcopy(model), args=TrainingArguments(str(tmp_path / "pt"), use_cpu=True,
                               report_to="none"), loss_type=loss_type, beta=0.5, sam="logits", sam_rho=rho,
                               sam_variant=variant, ref_model=copy.deepcopy(ref).eval(),
                               chunk_size=chunk, vocab_chunk_size=37, ld_alpha=features.get("ld_alpha"),
                               use_weighting=features.get("use_weighting", False),
                               loss_params={k: v for k, v in features.items() if k.startswith("f_")})
    loss_b, grads_b, sam_b = grads_of(theirs, theirs.model, as_logitsam_batch(batch))

    assert sam_a["loss_post"] - sam_a["loss_pre"] > 1e-3  # the perturbation acts
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for key in SAM_METRICS:
        assert sam_a[key] == pytest.approx(sam_b[key], rel=1e-4, abs=1e-7), key
    assert ours._metrics["train"]["sam/first_order_ratio"][-1] == pytest.approx(1.0, abs=0.5)
    for k, g in grads_b.items():
        torch.testing.assert_close(grads_a[k], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=k)
    # ... and they are not the plain gradients
    ours.args.sam_rho = 0.0
    ours.model.zero_grad(set_to_none=True)
    ours.compute_loss(ours.model, batch).backward()
    plain = {k: p.grad for k, p in ours.model.named_parameters()}
    assert max(((plain[k] - g).abs().max() / g.abs().max()).item() for k, g in grads_b.items()) > 1e-3


def test_evaluate_equals_trl(tmp_path):
    """Evaluation runs the plain head pass (no SAM) and logs TRL's eval_* metrics with TRL's values."""
    tok, model, ref = models()
    results = []
    for trainer_cls, config_cls, more in ((LogitsSAMDPOTrainer, LogitsSAMConfig, {"sam_rho": 0.05}),
                                          (DPOTrainer, DPOConfig, {})):
        args = config_cls(**settings(tmp_path / trainer_cls.__name__, per_device_eval_batch_size=3, **more))
        trainer = trainer_cls(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=args,
                              train_dataset=pairs(), eval_dataset=pairs(5), processing_class=tok)
        results.append(trainer.evaluate())
    ours, theirs = results
    assert not any("sam/" in k for k in ours)
    for key in ("eval_loss", *(f"eval_{k}" for k in TRL_METRICS if k != "num_tokens")):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("reference", ["live", "precomputed", "peft"])
@pytest.mark.parametrize("rho", [0.0, 1e-3])
def test_step_one_rewards_are_exactly_zero(tmp_path, reference, rho):
    """At step 1 the reference is the policy: one head for both gives rewards of exactly 0, as TRL logs (its own
    head for both). Before, the reference went through TRL's head and the policy through ours, so margins were
    +-1e-5 and rewards/accuracies a coin flip (0.25 to 1.0) on float rounding."""
    tok, model, _ = models()
    overrides = dict(sam_rho=rho, precompute_ref_log_probs=reference == "precomputed")
    kwargs = {}
    if reference == "peft":
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM")
    ref = copy.deepcopy(model) if reference == "live" else None
    args = LogitsSAMConfig(**settings(tmp_path / reference, **overrides))
    trainer = LogitsSAMDPOTrainer(model=copy.deepcopy(model), ref_model=ref, args=args, train_dataset=pairs(),
                                  processing_class=tok, **kwargs)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["rewards/margins"] == 0.0 and log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0
    assert log["rewards/accuracies"] == 0.0
    assert log["loss"] == pytest.approx(0.6931471805599453, abs=1e-6) if rho == 0 else log["loss"] > 0.6931


def test_chunking_defaults_to_auto(tmp_path):
    """``sam_chunk_size`` defaults to auto, as in ``logitsam train``: dense for this tiny head, chunked at 152k."""
    assert LogitsSAMConfig(**settings(tmp_path)).sam_chunk_size == "auto"
    assert LogitsSAMConfig(**settings(tmp_path, sam_chunk_size="256")).sam_chunk_size == 256
    tok, model, _ = models()
    args = LogitsSAMConfig(**settings(tmp_path))
    trainer = LogitsSAMDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                                  train_dataset=pairs(), processing_class=tok)
    assert trainer.step.chunk_size is None
    from logitsam.train.run import resolve_chunk_size

    # TRL's defaults: 8 pairs x 1,024 tokens per device; Qwen2.5-7B's vocabulary
    assert resolve_chunk_size("auto", tokens=2 * 8 * 1024, vocab_size=152064) is not None


class TwoRanks:
    """``accelerator`` as rank 0 of 2 sees it on the last, uneven batch of an epoch: ``gather`` returns every rank's
    values (rank 1's: twice rank 0's), ``gather_for_metrics`` drops rank 1's as if they were duplicated samples."""

    num_processes = 2

    def __init__(self):
        self.calls = []

    def gather(self, x):
        self.calls.append("gather")
        return torch.cat([x, 2 * x])

    def gather_for_metrics(self, x, use_gather_object=False):
        self.calls.append("gather_for_metrics")
        return x


def test_metrics_are_reduced_with_gather_not_gather_for_metrics(tmp_path, monkeypatch):
    """Per-rank totals (token counts, the (sum, count) pairs of the per-token means, SAM's per-rank statistics) are
    summed or averaged over every rank: ``gather_for_metrics`` would truncate them on an epoch's last batch."""
    tok, model, ref = models()
    args = LogitsSAMConfig(**settings(tmp_path, sam_rho=0.05))
    trainer = LogitsSAMDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=args,
                                  train_dataset=pairs(), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    flushed = []
    for accelerator in (None, TwoRanks()):
        trainer.compute_loss(trainer.model, batch)  # the same micro-batch: the same local values
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        with monkeypatch.context() as m:
            if accelerator is not None:
                m.setattr(trainer, "accelerator", accelerator)
            trainer._flush_metrics("train")
        flushed.append({k: v[-1] for k, v in trainer._metrics["train"].items()})
    local, both = flushed
    assert accelerator.calls == ["gather"]  # one gather per logging step, and never gather_for_metrics
    assert both["num_tokens"] == 3 * local["num_tokens"] > 0  # summed: rank 0's + rank 1's (twice as many)
    for key in ("sam/loss_pre", "sam/loss_post", "sam/grad_norm"):  # the mean over ranks
        assert both[key] == pytest.approx(1.5 * local[key], rel=1e-6), key
    for key in ("entropy", "logits/chosen", "logps/chosen", "mean_token_accuracy"):  # sum / sum: unchanged
        assert both[key] == pytest.approx(local[key], rel=1e-6, abs=1e-9), key


def _soft_capped_gemma2(vocab_size):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=2,
        eos_token_id=3))


@pytest.mark.parametrize("zero3", [False, True], ids=["at-construction", "zero3-at-train-begin"])
def test_soft_capped_head_is_refused(tmp_path, monkeypatch, zero3):
    """Logits that are not ``hidden @ W^T`` are refused: at construction, or, when ZeRO-3 partitioned the model at
    load (its weights are empty until the engine's forward gathers them), at train begin on the prepared model,
    before any step (``test_trl_zero3.py`` runs the real ZeRO-3 path)."""
    import logitsam.trl
    from logitsam.models import ModelError

    tok = make_tiny_tokenizer()
    args = LogitsSAMConfig(**settings(tmp_path, precompute_ref_log_probs=True))
    if zero3:
        monkeypatch.setattr(logitsam.trl, "_zero3_partitioned", lambda model: True)
    build = lambda: LogitsSAMDPOTrainer(model=_soft_capped_gemma2(len(tok)), args=args,  # noqa: E731
                                        train_dataset=pairs(), processing_class=tok)
    if not zero3:
        with pytest.raises(ModelError, match=r"does not compute its logits as hidden @ W\^T"):
            build()
        return
    trainer = build()
    assert trainer._head_checked is False
    with pytest.raises(ModelError, match=r"does not compute its logits as hidden @ W\^T"):
        trainer.train()
    assert trainer.state.global_step == 0
