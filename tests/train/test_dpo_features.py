"""TRL 1.16's DPOConfig features in logitsam: LD-DPO, WPO, TR-DPO, disable_dropout, num_tokens, MoE aux loss,
padding, parallel tokenisation and the model keys. Each checked against a value worked out another way (by
hand, float64 loops, the naive two-pass SAM, an uninterrupted run); TRL's own code paths are compared in
tests/trl/test_trl_trainer.py."""

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from test_trainer import config, final_weights, records
from transformers import TrainingArguments

from logitsam.core import IGNORE_INDEX, dense_head_logps, shift_labels
from logitsam.core.head_chunked import chunked_head_logps
from logitsam.core.losses import preference_loss
from logitsam.core.weighting import ld_logps, wpo_weights
from logitsam.data import PreferenceCollator, build_preference_dataset
from logitsam.models import ModelError, forward_hidden, load_model
from logitsam.train.config import ConfigError, TrainConfig
from logitsam.train.run import model_init_kwargs, run_training
from logitsam.train.trainer import PreferenceTrainer, check_reference_keys, disable_dropout_in_model, sync_reference


# ---- LD-DPO ------------------------------------------------------------------------------------------------
def test_ld_logps_by_hand():
    """Pair 0: chosen 2 tokens, rejected 4 -> shared length 2; pair 1: chosen 3, rejected 1 -> shared 1."""
    lp = torch.tensor([[0.0, -1.0, -2.0, 0.0, 0.0, 0.0],   # chosen 0: completion at t = 1, 2
                       [-0.5, -0.1, -0.2, -0.3, 0.0, 0.0],  # chosen 1: t = 0, 1, 2
                       [0.0, -1.0, -1.0, -4.0, -8.0, 0.0],  # rejected 0: t = 1..4
                       [0.0, 0.0, 0.0, 0.0, 0.0, -3.0]], dtype=torch.float64)  # rejected 1: t = 5
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=bool)
    labels = torch.where(mask, 7, IGNORE_INDEX)
    a = 0.25
    expected = [-1 - 2, -0.5 + a * (-0.1 - 0.2), -1 - 1 + a * (-4 - 8), -3.0]  # (-0.3 is outside the mask)
    torch.testing.assert_close(ld_logps(lp, labels, a), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(ld_logps(lp, labels, 1.0), (lp * mask).sum(1))  # alpha = 1: plain sums
    # the gradient reaches exactly the tokens, with weight 1 or alpha
    x = lp.clone().requires_grad_(True)
    ld_logps(x, labels, a).sum().backward()
    weight = torch.tensor([[0, 1, 1, 0, 0, 0], [1, a, a, 0, 0, 0], [0, 1, 1, a, a, 0], [0, 0, 0, 0, 0, 1]],
                          dtype=torch.float64)
    torch.testing.assert_close(x.grad, weight)


# ---- WPO ---------------------------------------------------------------------------------------------------
def head_case(seed=0, V=11, d=6, R=4, T=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, T, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[3, 3:] = IGNORE_INDEX
    return hidden, weight, labels


def test_log_sum_p2_statistic_by_hand_dense_and_chunked():
    hidden, weight, labels = head_case()
    out = dense_head_logps(hidden, weight, None, labels)
    expected = torch.zeros(4, dtype=torch.float64)
    for r in range(4):
        for t in range(5):
            if labels[r, t] != IGNORE_INDEX:
                p = torch.softmax(hidden[r, t] @ weight.T, -1)
                expected[r] += math.log(float((p * p).sum()))
    torch.testing.assert_close(out.log_sum_p2, expected)
    chunked = chunked_head_logps(hidden, weight, None, labels, chunk_size=3, vocab_chunk_size=4)
    torch.testing.assert_close(chunked.log_sum_p2, expected)
    torch.testing.assert_close(out.sum_p2, chunked.sum_p2)


def test_wpo_weights_by_hand():
    """w_i = exp(mean_t [log p(y_t) - log sum_v p_v^2]) over chosen i, times the same over rejected i."""
    hidden, weight, labels = head_case(seed=3)
    out = dense_head_logps(hidden, weight, None, labels)
    factor = []
    for r in range(4):
        terms = []
        for t in range(5):
            if labels[r, t] != IGNORE_INDEX:
                p = torch.softmax(hidden[r, t] @ weight.T, -1)
                terms.append(math.log(float(p[labels[r, t]])) - math.log(float((p * p).sum())))
        factor.append(math.exp(sum(terms) / len(terms)))
    expected = torch.tensor([factor[0] * factor[2], factor[1] * factor[3]], dtype=torch.float32)
    torch.testing.assert_close(wpo_weights(out), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="with_stats"):
        wpo_weights(dense_head_logps(hidden, weight, None, labels, with_stats=False))


def batch_of(tok, folder, n=4):
    """n pairs of different completion lengths, collated."""
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say something {i}:", "chosen": " good good day" + "!" * i,
                                        "rejected": f" bad night {i}"}) + "\n" for i in range(n)))
    ds, _ = build_preference_dataset(path, tok, max_length=64)
    return PreferenceCollator(tok.pad_token_id)([ds[i] for i in range(n)])


def test_wpo_and_ld_under_logits_sam_equal_the_naive_two_pass_definition(tmp_path):
    """loss = mean_i w_i l_i(W + eps) with w from the clean head W, LD-DPO sums in both passes, and
    eps = rho g / ||g||, g = d/dW mean_i w_i l_i(W) (the head weight alone; the hidden states held fixed)."""
    tok = make_tiny_tokenizer()
    model, ref = make_tiny_llama(vocab_size=len(tok), seed=0), make_tiny_llama(vocab_size=len(tok), seed=1)
    batch = batch_of(tok, tmp_path)
    rho, alpha, beta = 0.05, 0.4, 0.5
    trainer = PreferenceTrainer(model=copy.deepcopy(model), args=TrainingArguments(str(tmp_path), use_cpu=True,
                                report_to="none"), loss_type="sigmoid", beta=beta, sam="logits", sam_rho=rho,
                                ref_model=copy.deepcopy(ref), ld_alpha=alpha, use_weighting=True)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)

    labels = shift_labels(batch["labels"])
    with torch.no_grad():
        ref_out = dense_head_logps(forward_hidden(ref, batch["input_ids"], batch["attention_mask"]),
                                   ref.lm_head.weight, None, labels)
        ref_lp = ld_logps(ref_out.token_logps, labels, alpha)
        hidden = forward_hidden(model, batch["input_ids"], batch["attention_mask"])
    W = model.lm_head.weight.detach().clone().requires_grad_(True)

    def loss_at(w, weights=None):
        out = dense_head_logps(hidden, w, None, labels)
        lp = ld_logps(out.token_logps, labels, alpha)
        losses = preference_loss("sigmoid", lp[:4], lp[4:], ref_lp[:4], ref_lp[4:], beta=beta)[0]
        weights = wpo_weights(out) if weights is None else weights
        return (losses * weights).mean(), weights

    clean, w_clean = loss_at(W)
    (g,) = torch.autograd.grad(clean, W)
    eps = rho * g / g.norm()
    post, _ = loss_at(W.detach() + eps, w_clean)
    torch.testing.assert_close(loss.detach(), post, rtol=1e-5, atol=1e-7)
    assert float(post - clean) > 1e-4  # the perturbation acts
    trainer._flush_metrics("train")  # metrics stay on the device until a logging step reduces them
    assert trainer._metrics["train"]["sam/loss_pre"][-1] == pytest.approx(float(clean), rel=1e-5)
    assert trainer._metrics["train"]["wpo/weight"][-1] == pytest.approx(float(w_clean.mean()), rel=1e-6)
    # the perturbed head's own weights would differ: the test can tell the two choices apart
    _, w_post = loss_at(W.detach() + eps)
    assert (w_post - w_clean).abs().max() > 1e-6


# ---- TR-DPO ------------------------------------------------------------------------------------------------
def test_sync_reference_mixes_every_parameter():
    tok = make_tiny_tokenizer()
    policy, ref = make_tiny_llama(len(tok), tie=True, seed=0), make_tiny_llama(len(tok), tie=True, seed=1)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    sync_reference(policy, ref, 0.3)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, 0.7 * before[k] + 0.3 * policy.state_dict()[k], msg=k)


def test_saved_reference_keys_are_checked_not_loaded_loosely():
    """Only tied copies may be absent from reference_model.safetensors; anything else is one clear error."""
    tok = make_tiny_tokenizer()
    tied, untied = make_tiny_llama(len(tok), tie=True), make_tiny_llama(len(tok), tie=False)
    keys = set(tied.state_dict())
    check_reference_keys(tied, keys, "ck/reference_model.safetensors")
    check_reference_keys(tied, keys - {"lm_head.weight"}, "ck")  # its tie: embed_tokens.weight is there
    with pytest.raises(ModelError, match=r"ck: .*missing: \['lm_head.weight'\]"):
        check_reference_keys(untied, keys - {"lm_head.weight"}, "ck")
    with pytest.raises(ModelError, match=r"missing: \['model.norm.weight'\]"):
        check_reference_keys(tied, keys - {"model.norm.weight"}, "ck")
    with pytest.raises(ModelError, match=r"not in the model: \['extra.weight'\]"):
        check_reference_keys(tied, keys | {"extra.weight"}, "ck")


def test_tr_dpo_updates_the_reference_and_resume_continues_it(tiny_model_dir, pairs_file, tmp_path, cache):
    """sync every 2 steps: 4 steps straight equal 2 steps + resume for 2 (the reference is restored); a
    run whose reference never moves ends elsewhere; num_tokens continues across the resume."""
    common = dict(sam="logits", sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5,
                  learning_rate=0.05, optim="sgd", save_steps=2)
    straight = tmp_path / "straight"
    run_training(config(tiny_model_dir, pairs_file, straight, cache, max_steps=4, **common))
    split = tmp_path / "split"
    run_training(config(tiny_model_dir, pairs_file, split, cache, max_steps=2, **common))
    assert (split / "checkpoint-2" / "reference_model.safetensors").exists()
    run_training(config(tiny_model_dir, pairs_file, split, cache, max_steps=4, resume_from_checkpoint=True,
                        **common))
    fixed = tmp_path / "fixed"
    run_training(config(tiny_model_dir, pairs_file, fixed, cache, max_steps=4,
                        **{**common, "sync_ref_model": False, "precompute_ref_log_probs": False}))
    a, b, c = final_weights(straight), final_weights(split), final_weights(fixed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-6
    tokens = lambda out: [r["num_tokens"] for r in records(out) if "loss" in r]  # noqa: E731
    assert tokens(straight)[-1] == tokens(split)[-1] > 0
    assert tokens(straight) == sorted(tokens(straight)) and len(set(tokens(straight))) == 4


def test_tr_dpo_config_checks():
    cfg = TrainConfig(dataset_name="x", sync_ref_model=True)
    assert cfg.precompute_ref_log_probs is False  # a moving reference has nothing to precompute
    with pytest.raises(ConfigError, match="'sync_ref_model' = true cannot run with use_peft"):
        TrainConfig(dataset_name="x", sync_ref_model=True, use_peft=True)
    with pytest.raises(ConfigError, match="'ref_model_mixup_alpha' = 0.0"):
        TrainConfig(dataset_name="x", sync_ref_model=True, ref_model_mixup_alpha=0.0)


# ---- num_tokens --------------------------------------------------------------------------------------------
def test_num_tokens_counts_the_non_padding_tokens_trained_on(tiny_model_dir, pairs_file, tmp_path, cache,
                                                             monkeypatch):
    seen = []
    orig = PreferenceTrainer.compute_loss

    def spy(self, model, inputs, *a, **kw):
        if model.training:
            seen.append(int(inputs["attention_mask"].sum()))
        return orig(self, model, inputs, *a, **kw)

    monkeypatch.setattr(PreferenceTrainer, "compute_loss", spy)
    out = tmp_path / "run"
    run_training(config(tiny_model_dir, pairs_file, out, cache, sam="none", gradient_accumulation_steps=2))
    logged = [r["num_tokens"] for r in records(out) if "loss" in r]
    expected = [sum(seen[:2 * (i + 1)]) for i in range(3)]
    assert logged == expected


# ---- dropout -----------------------------------------------------------------------------------------------
def test_disable_dropout_makes_training_forwards_deterministic():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tiny_tokenizer()
    llama = make_tiny_llama(len(tok))
    llama.config.attention_dropout = 0.5
    for layer in llama.model.layers:
        layer.self_attn.attention_dropout = 0.5  # applied functionally, no nn.Dropout module
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.5,
                                      embd_pdrop=0.5, attn_pdrop=0.5))
    ids = torch.randint(0, len(tok), (2, 12))
    for model in (llama, gpt2):
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, model(ids).logits)
            disable_dropout_in_model(model)
            torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_trainer_disables_dropout_by_default_like_trl(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.3))
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    PreferenceTrainer(model=model, args=args, loss_type="simpo")
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    kept = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.3))
    PreferenceTrainer(model=kept, args=args, loss_type="simpo", disable_dropout=False)
    assert any(m.p == 0.3 for m in kept.modules() if isinstance(m, torch.nn.Dropout))


# ---- MoE router aux loss -----------------------------------------------------------------------------------
def tiny_mixtral(vocab):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, router_aux_loss_coef=0.02)
    return MixtralForCausalLM(cfg)


@pytest.mark.parametrize("coef", [None, 0.5])
def test_router_aux_loss_is_added_with_the_models_own_value(tmp_path, coef):
    tok = make_tiny_tokenizer()
    model = tiny_mixtral(len(tok))
    batch = batch_of(tok, tmp_path)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    with_aux = PreferenceTrainer(model=copy.deepcopy(model), args=args, loss_type="simpo", router_aux_loss_coef=coef)
    without = PreferenceTrainer(model=copy.deepcopy(model), args=args, loss_type="simpo", router_aux_loss_coef=0.0)
    with_aux.model.train()
    without.model.train()
    loss = with_aux.compute_loss(with_aux.model, batch)
    plain = without.compute_loss(without.model, batch)
    aux = model.train()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_router_logits=True).aux_loss
    expected_coef = 0.02 if coef is None else coef
    torch.testing.assert_close(loss, plain + expected_coef * aux, rtol=1e-5, atol=1e-7)
    assert float(aux) > 0


def test_router_aux_loss_on_a_dense_model_is_a_config_error(tmp_path):
    tok = make_tiny_tokenizer()
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ConfigError, match="'router_aux_loss_coef' = 0.1 needs a mixture-of-experts model"):
        PreferenceTrainer(model=make_tiny_llama(len(tok)), args=args, loss_type="simpo", router_aux_loss_coef=0.1)


# ---- data keys ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("null", None), ("8", 8), (16, 16), (None, None)])
def test_pad_to_multiple_of_reads_like_trl(value, expected):
    assert TrainConfig(dataset_name="x", pad_to_multiple_of=value).pad_to_multiple_of == expected


def test_pad_to_multiple_of_bad_value():
    with pytest.raises(ConfigError, match="'pad_to_multiple_of' = 'eight'"):
        TrainConfig(dataset_name="x", pad_to_multiple_of="eight")
    with pytest.raises(ConfigError, match="'pad_to_multiple_of' = 0"):
        TrainConfig(dataset_name="x", pad_to_multiple_of=0)


def test_padded_batches_train_the_same(tiny_model_dir, pairs_file, tmp_path, cache):
    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(sam="none", max_steps=2, optim="sgd", learning_rate=0.5)  # SGD: AdamW would amplify rounding
    run_training(config(tiny_model_dir, pairs_file, a, cache, **common))
    run_training(config(tiny_model_dir, pairs_file, b, cache, pad_to_multiple_of=64, **common))
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_dataset_num_proc_gives_the_same_rows_and_drop_counts(tmp_path):
    tok = make_tiny_tokenizer()
    rows = [{"prompt": f"Q{i}:" + ("x" * 80 if i % 5 == 0 else ""), "chosen": f" yes {i}", "rejected": f" no {i}"}
            for i in range(30)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one, r1 = build_preference_dataset(path, tok, max_length=48, on_invalid="drop")
    two, r2 = build_preference_dataset(path, tok, max_length=48, on_invalid="drop", num_proc=3)
    assert one.to_dict() == two.to_dict()
    assert r1.counts == r2.counts and sum(r1.counts.values()) == 6
    assert r1.first_rows == r2.first_rows


# ---- model keys --------------------------------------------------------------------------------------------
def test_model_keys_reach_from_pretrained(tiny_model_dir):
    cfg = TrainConfig(dataset_name="x", model_name_or_path=str(tiny_model_dir), attn_implementation="eager",
                      model_init_kwargs='{"attn_implementation": "sdpa", "low_cpu_mem_usage": true}')
    kwargs = model_init_kwargs(cfg)
    assert kwargs == {"attn_implementation": "eager", "low_cpu_mem_usage": True}  # the model key wins
    model = load_model(tiny_model_dir, init_kwargs=kwargs)
    assert model.config._attn_implementation == "eager"
    assert load_model(tiny_model_dir, init_kwargs={"attn_implementation": "sdpa"}).config._attn_implementation \
        == "sdpa"


@pytest.mark.parametrize("flag", ["use_dora", "use_rslora"])
def test_dora_and_rslora_reach_peft(tiny_model_dir, flag):
    pytest.importorskip("peft")
    model = load_model(tiny_model_dir, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"], flag: True})
    assert getattr(model.peft_config["default"], flag) is True
    if flag == "use_dora":
        assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_quantized_loading_without_bitsandbytes_is_one_clear_error():
    with pytest.raises(ConfigError, match="'load_in_4bit' = true needs use_peft"):
        TrainConfig(dataset_name="x", load_in_4bit=True)
    cfg = TrainConfig(dataset_name="x", load_in_4bit=True, use_peft=True)
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = torch.cuda.is_available()
    except ImportError:
        has_bnb = False
    if has_bnb:
        assert model_init_kwargs(cfg)["quantization_config"].load_in_4bit
    else:
        with pytest.raises(ModelError, match="'load_in_4bit' = true needs"):
            model_init_kwargs(cfg)


def test_model_init_kwargs_bad_json():
    with pytest.raises(ConfigError, match="'model_init_kwargs' = .* is not valid JSON"):
        TrainConfig(dataset_name="x", model_init_kwargs="{attn: eager}")


def test_config_names_the_loss_layers_f_divergences():
    """config.py keeps its own tuple (it imports no torch at module level); it must be the loss layer's."""
    from logitsam.core.losses import F_DIVERGENCES
    from logitsam.train import config

    assert config.F_DIVERGENCES == F_DIVERGENCES


def test_precompute_ref_batch_size_reaches_the_reference_pass(tiny_model_dir, pairs_file, tmp_path, cache,
                                                             monkeypatch):
    import logitsam.train.reference as reference

    sizes = []
    orig = reference.cached_reference_logps

    def spy(*args, **kw):
        sizes.append(kw["batch_size"])
        return orig(*args, **kw)

    monkeypatch.setattr(reference, "cached_reference_logps", spy)
    run_training(config(tiny_model_dir, pairs_file, tmp_path / "a", cache, sam="none", max_steps=1,
                        precompute_ref_batch_size=3))
    run_training(config(tiny_model_dir, pairs_file, tmp_path / "b", cache, sam="none", max_steps=1,
                        per_device_train_batch_size=2, per_device_eval_batch_size=5))
    assert sizes == [3, 3, 2, 5]  # (train, eval) each run: the key, else TRL's train / eval micro-batch


def test_ld_dpo_precomputed_reference_equals_the_live_one(tiny_model_dir, pairs_file, tmp_path, cache):
    """The cached reference pass applies ld_alpha as the live reference does (and does not reuse plain sums)."""
    common = dict(sam="logits", max_steps=2, optim="sgd", learning_rate=0.5, ld_alpha=0.3)
    run_training(config(tiny_model_dir, pairs_file, tmp_path / "plain", cache, sam="none", max_steps=1))  # fills
    run_training(config(tiny_model_dir, pairs_file, tmp_path / "pre", cache, **common))  # the cache, plain sums
    run_training(config(tiny_model_dir, pairs_file, tmp_path / "live", cache, precompute_ref_log_probs=False,
                        **common))
    a, b = final_weights(tmp_path / "pre"), final_weights(tmp_path / "live")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
