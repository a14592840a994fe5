"""torch.compile: unwrapping a compiled model, a compile-stable head forward, and ``torch_compile: true`` training.

The head pass (clean pass, eps, perturbed pass, loss) runs eager behind ``torch.compiler.disable``: one deliberate
graph break at the LM head. The backbone before it is one compiled graph, and later steps reuse it.
"""

import json

import pytest
import torch
from _run_config import run_config, write_pairs
from conftest import make_tiny_llama, make_tiny_tokenizer
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, TrainerCallback

from logitsam.models import lm_head_of, reference_context, unwrap_model
from logitsam.train._inside import head_inside_forward
from logitsam.train.run import run_training
from logitsam.train.trainer import PreferenceTrainer


@pytest.fixture
def fresh_dynamo():
    """Counts from zero, and no compiled code left behind for later tests."""
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def _ids(vocab: int, shape=(2, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, shape, generator=g)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[1, :2] = 0  # left padding on one row
    return input_ids, attention_mask


# ---- unwrap_model -------------------------------------------------------------------------------


def test_unwrap_model_sees_through_compile_data_parallel_and_peft():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = make_tiny_llama()
    # torch.compile is lazy: wrapping compiles nothing until the first call
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model), torch.compile(torch.nn.DataParallel(model))):
        assert unwrap_model(wrapped) is model
        assert lm_head_of(wrapped) is model.lm_head
    peft = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    compiled = torch.compile(peft)
    assert unwrap_model(compiled) is peft.get_base_model()
    lora = [m for m in peft.modules() if isinstance(m, BaseTunerLayer)]
    with reference_context(compiled) as ref:  # the adapters of the PEFT model under the compile wrapper go off
        assert ref is compiled and lora and all(m.disable_adapters for m in lora)
    assert not any(m.disable_adapters for m in lora)
    with pytest.raises(TypeError, match="got Linear"):
        unwrap_model(torch.compile(torch.nn.Linear(2, 2)))


# ---- the persistent head forward ------------------------------------------------------------------


def test_head_inside_forward_installs_one_forward_and_keeps_the_plain_one():
    model = make_tiny_llama()
    head = model.lm_head
    input_ids, attention_mask = _ids(128)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)

        def full_logits(hidden, head):  # hidden (B, T, d) for every position
            return hidden @ head.weight.T

        got = head_inside_forward(model, input_ids, attention_mask, full_logits)
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-6)
        installed = head.__dict__["forward"]
        head_inside_forward(model, input_ids, attention_mask, lambda hidden, head: hidden.sum())
        assert head.__dict__["forward"] is installed  # the same object every call: nothing for dynamo to re-guard
        # outside a pass the head is the plain nn.Linear again
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask).logits, logits)

        def fails(hidden, head):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            head_inside_forward(model, input_ids, attention_mask, fails)
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask).logits, logits)


@pytest.mark.parametrize("hooked", ["before", "after"])
def test_head_forward_keeps_an_accelerate_hook(hooked):
    """accelerate binds its own forward on the instance (``add_hook_to_module``): plain calls still run it."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = make_tiny_llama()
    input_ids, attention_mask = _ids(128)
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if hooked == "after":  # our forward first, the hook wraps it
            head_inside_forward(model, input_ids, attention_mask, lambda hidden, head: hidden.sum())
        add_hook_to_module(model.lm_head, Count())
        for _ in range(2):
            out = head_inside_forward(model, input_ids, attention_mask, lambda hidden, head: hidden.new_tensor(7.0))
            assert out.item() == 7.0
        passes = Count.calls  # "before": the pass replaces the hooked forward, as it always did; "after": wrapped
        assert passes == (0 if hooked == "before" else 2)
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask).logits, want)
        assert Count.calls == passes + 1


def test_compiled_head_passes_reuse_one_graph(fresh_dynamo):
    """A new head_pass closure each call changes nothing dynamo guards on: one compile, then cache hits.

    backend="eager" runs dynamo's capture without inductor's code generation, so this stays fast.
    """
    model = make_tiny_llama()
    compiled = torch.compile(model, backend="eager")
    input_ids, attention_mask = _ids(128)
    seen = []
    for step in range(3):
        labels = input_ids.roll(step)  # a new tensor captured by a new closure, as in each trainer step

        def head_pass(hidden, head, labels=labels):
            return torch.nn.functional.cross_entropy((hidden @ head.weight.T).flatten(0, 1), labels.flatten())

        loss = head_inside_forward(compiled, input_ids, attention_mask, head_pass)
        loss.backward()
        seen.append(counters["frames"]["total"])
    assert seen[0] > 0 and seen[1] == seen[0] and seen[2] == seen[0], seen
    assert counters["stats"]["unique_graphs"] == 1
    assert list(counters["graph_break"]) and all("_run_head_pass" in why for why in counters["graph_break"])


# ---- torch_compile: true through the trainer ------------------------------------------------------


class _CompileCounts(TrainerCallback):
    """Dynamo's counters at the end of each optimizer step: (frames compiled, graphs)."""

    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append((counters["frames"]["total"], counters["stats"]["unique_graphs"]))


@pytest.fixture
def tiny_llama_dir(tmp_path):
    tok = make_tiny_tokenizer()
    out = tmp_path / "tiny-llama-32"
    model = make_tiny_llama(vocab_size=len(tok), tie=True, hidden_size=32)  # tied, as SmolLM2
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow  # inductor on CPU: ~50 s for the first case with a cold inductor cache, ~10 s each once cached
@pytest.mark.parametrize("sam", ["none", "logits"])
def test_compiled_training_equals_eager(tiny_llama_dir, tmp_path, cache, monkeypatch, fresh_dynamo, sam):
    """``torch_compile: true`` (inductor, CPU) trains as eager does, compiling the backbone once.

    Tolerances: the same float32 math, but inductor fuses the RMSNorms, rotary embeddings and the attention
    softmax and reorders their reductions, so values differ in the last bits. Measured: losses and grad norms
    at most 2e-7 relative, weights after 3 SGD steps (lr 1e-2) at most 4e-9 absolute. Allowed: 1e-5 relative
    (50x) and 1e-7 absolute (25x), far below what one wrong term changes: logits-SAM's eps at rho 0.05 moves
    the loss by 9% (0.693 -> 0.753), and an lr 1e-2 step moves a weight by ~1e-5.
    """
    data = write_pairs(tmp_path / "pairs.jsonl", 32)
    counts = _CompileCounts()
    init = PreferenceTrainer.__init__

    def init_with_counts(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(counts)

    monkeypatch.setattr(PreferenceTrainer, "__init__", init_with_counts)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"run-{compiled}"
        # one padded length for every batch, so a shape change cannot be mistaken for a recompile
        run_training(run_config(tiny_llama_dir, data, out, sam=sam, torch_compile=compiled, optim="sgd",
                                pad_to_multiple_of=48, eval_size=0))
        logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[compiled] = ([r for r in logs if "loss" in r], AutoModelForCausalLM.from_pretrained(out).state_dict())
        if not compiled:
            assert counts.after_step == [(0, 0)] * 3  # eager really is eager
            counts.after_step.clear()

    (eager_logs, eager_weights), (compiled_logs, compiled_weights) = runs[False], runs[True]
    keys = ["loss", "grad_norm"] + (["sam/loss_pre", "sam/loss_post"] if sam == "logits" else [])
    assert len(eager_logs) == len(compiled_logs) == 3
    for e, c in zip(eager_logs, compiled_logs, strict=True):
        for key in keys:
            assert c[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6), (c["step"], key)
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    moved = max((eager_weights[k] - initial[k]).abs().max() for k in eager_weights)
    assert moved > 1e-3  # the steps did train
    for k in eager_weights:
        torch.testing.assert_close(compiled_weights[k], eager_weights[k], rtol=0, atol=1e-7, msg=k)

    # the backbone is one graph; the only graph breaks are the head pass (one per frame on the call stack
    # from the compiled module down to the LM head's forward); steps 2 and 3 compile nothing
    assert counts.after_step[0][1] == 1, counts.after_step
    assert counts.after_step == [counts.after_step[0]] * 3, counts.after_step
    breaks = dict(counters["graph_break"])
    assert breaks and all("_run_head_pass" in why for why in breaks), list(breaks)
