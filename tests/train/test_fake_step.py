"""The head step and a Trainer micro-batch run under FakeTensorMode: no data-dependent shape, no host sync.

Under ``FakeTensorMode`` every tensor is a shape-and-dtype stand-in: ``nonzero`` raises
``DynamicOutputShapeException`` and ``.item()`` / ``float()`` / ``bool()`` raise ``DataDependentOutputException``.
So a step that runs here issues no host sync on a GPU either (each one would stall the device and the FSDP2 /
ZeRO-3 prefetch behind it). The same step at 7B shapes is what ``logitsam simulate`` measures.
"""

import copy

import pytest
import torch
from conftest import make_tiny_llama
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeCopyMode,
    FakeTensorMode,
)
from transformers import TrainingArguments

from logitsam.core import logits_sam, sequence_logps
from logitsam.core.head import completion_index
from logitsam.core.losses import preference_loss
from logitsam.train.step import HeadStep
from logitsam.train.trainer import PreferenceTrainer

V, D, R, T = 97, 24, 4, 12
HEADS = {"dense": {}, "chunked": {"chunk_size": 8, "vocab_chunk_size": 32}}
PRECISIONS = {"fp32": (torch.float32, None), "bf16 autocast": (torch.float32, torch.bfloat16),
              "bf16 weights": (torch.bfloat16, None)}


def _labels_and_index():
    """Real labels (completion = the last 5 positions of each row), and their index, found on the host."""
    labels = torch.randint(0, V, (R, T))
    labels[:, : T - 5] = -100
    return labels, completion_index(labels)


def _dpo(ref):
    def loss_fn(out):
        n = out.logps.shape[0] // 2
        return preference_loss("sigmoid", out.logps[:n], out.logps[n:], ref[:n], ref[n:], beta=0.1)[0].mean()

    return loss_fn


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("sam", [False, True])
def test_head_step_has_no_host_sync(head, precision, sam):
    w_dtype, autocast = PRECISIONS[precision]
    labels, index = _labels_and_index()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        hidden = torch.randn(R, T, D, dtype=w_dtype).requires_grad_()
        lm_head = torch.nn.Linear(D, V, bias=False, dtype=w_dtype)
        labels_f, index_f = mode.from_tensor(labels), mode.from_tensor(index)
        loss_fn = _dpo(torch.randn(R))
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            if sam:
                loss, stats = logits_sam(hidden, lm_head, labels_f, loss_fn, 1e-3, index=index_f, **HEADS[head])
                assert all(stats[k].shape == () for k in ("loss_pre", "loss_post", "grad_norm", "first_order"))
            else:
                loss = loss_fn(sequence_logps(hidden, lm_head, labels_f, index=index_f, **HEADS[head]))
        loss.backward()
        assert hidden.grad.shape == hidden.shape and lm_head.weight.grad.shape == (V, D)


@pytest.mark.parametrize("head", list(HEADS))
def test_without_the_index_the_head_would_sync(head):
    """The control: the same head without a precomputed index needs ``nonzero`` (a host sync); so the test
    above can fail."""
    labels, _ = _labels_and_index()
    with FakeTensorMode() as mode:
        hidden = torch.randn(R, T, D)
        lm_head = torch.nn.Linear(D, V, bias=False)
        with pytest.raises((DynamicOutputShapeException, DataDependentOutputException)):
            sequence_logps(hidden, lm_head, mode.from_tensor(labels), **HEADS[head])


def _real_batch(vocab):
    """What the collator hands the step: real host tensors, the completion index included."""
    input_ids = torch.randint(4, vocab, (R, T))
    labels = input_ids.clone()
    labels[:, : T - 5] = -100
    from logitsam.train.step import batch_completion_index

    index = batch_completion_index(labels)  # the collator's host-side work, on real tensors
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(R, T, dtype=torch.long), "labels": labels,
             "completion_index": index, "ref_chosen_logps": -torch.rand(R // 2) * 10,
             "ref_rejected_logps": -torch.rand(R // 2) * 10}
    return batch


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("sam", ["none", "logits"])
def test_trainer_micro_batch_has_no_host_sync(tmp_path, chunk, sam):
    """``PreferenceTrainer.compute_loss`` on a tiny Llama whose weights are fake: forward, head step, loss,
    metrics (kept on the device) and backward."""
    trainer = PreferenceTrainer(model=make_tiny_llama(vocab_size=V), args=TrainingArguments(
        str(tmp_path), use_cpu=True, report_to="none"), sam=sam, sam_rho=1e-3, chunk_size=chunk, vocab_chunk_size=32)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with FakeCopyMode(mode):
        model = copy.deepcopy(trainer.model)  # the same module, its weights fake
    real = _real_batch(V)
    with mode:
        batch = {k: mode.from_tensor(v) for k, v in real.items()}
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        assert model.lm_head.weight.grad is not None
        assert trainer._deferred._pending["train"], "the micro-batch's metrics were recorded on the device"


def test_head_step_is_shared(tmp_path):
    """Both trainers run ``HeadStep``: the PreferenceTrainer's settings land in one."""
    trainer = PreferenceTrainer(model=make_tiny_llama(vocab_size=V), args=TrainingArguments(
        str(tmp_path), use_cpu=True, report_to="none"), sam="logits", sam_rho=0.0, chunk_size=8, ld_alpha=0.5)
    assert isinstance(trainer.step, HeadStep)
    assert trainer.step.rho == 0.0 and trainer.step.chunk_size == 8 and trainer.step.ld_alpha == 0.5
