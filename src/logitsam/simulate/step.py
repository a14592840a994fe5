"""One training step of a real model shape under ``FakeTensorMode`` and torch's memory trackers.

The step is the trainer's own (``PreferenceTrainer.compute_loss``, then backward and the optimizer step):

    loss = head_inside_forward(model, input_ids, attention_mask, head_pass)  # backbone, then the head pass
    loss.backward()
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

``head_pass(hidden, head)`` is logitsam's: ``logits_sam(...)`` (rho > 0) or the DPO loss of
``sequence_logps(...)``, both given ``index=`` (the completion positions, found on the host beforehand),
so the head runs with static shapes and no host sync. The reference log-probs are precomputed, as
``precompute_ref_log_probs: true`` (the default) has them: two (B,) inputs.

``trainer=`` picks whose step it is (``TRAINERS``): ``ours`` (the above), or one of the two TRL trainers at
TRL 1.16's defaults, whose ``precompute_ref_log_probs=False`` keeps a live reference model: a second copy of
the model in the policy's dtype (``create_model_from_path(..., dtype=model.dtype)``), in eval mode, outside the
optimizer, run under ``no_grad``. TRL leaves its parameters' ``requires_grad`` set, so autocast caches their
bf16 copies during the reference forward, as it does the policy's; that is simulated as TRL runs it.

- ``trl`` (``trl_step``): ``DPOTrainer._compute_loss``: the policy forward with TRL's fused head
  (``add_fused_lm_head``, ``model(..., labels=labels, fused_lm_head=True).log_probs``), then the reference's,
  then the sigmoid loss on the summed completion log-probs.
- ``trl-subclass`` (``subclass_step``): ``LogitsSAMDPOTrainer.compute_loss`` at ``LogitsSAMConfig``'s
  defaults (``SUBCLASS_DEFAULTS``): the reference first (``compute_ref_log_probs``: logitsam's head without
  statistics), then ``train.step.HeadStep`` with logits-SAM.

TRL's fused head picks its path by device: on CUDA with Triton it scores only the completion positions
(``hidden_states[mask]``, data-dependent) and folds each logits tile in a Triton kernel; elsewhere it scores
every position (2B x (T - 1)) and folds each tile with torch ops. The simulation runs on the CPU, so ``trl``
is its torch path, unpatched, whose fold temporaries a GPU run does not have (``report.budget``: ``trl_fold``).

The optimizer is warmed before the tracked step: AdamW's two moments exist and the gradients are None,
as at every step after the first. It is ``fused=True``, the Trainer's default ``adamw_torch_fused``, which
holds no temporaries of the parameters' size.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, PreTrainedConfig

from ..core import logits_sam, sequence_logps
from ..core.head import IGNORE_INDEX, completion_index, shift_labels
from ..core.head_chunked import DEFAULT_VOCAB_CHUNK_SIZE
from ..core.losses import preference_loss
from ..train._inside import head_inside_forward
from ..train.step import HeadStep
from . import PRECISIONS, TRAINERS

# MemTracker / FSDPMemTracker categories -> our columns
COLUMNS = ("params", "grads", "optimizer", "activations", "temps")
_COLUMN_OF = {
    "Parameter": "params", "Sharded Param": "params", "Unsharded Param": "params", "All Gather": "params",
    "Gradient": "grads", "Sharded Grad": "grads", "Unsharded Grad": "grads", "Reduce Scatter": "grads",
    "Optstate": "optimizer", "OptState": "optimizer",
    "Activation": "activations",
    "Temp": "temps", "Buffer": "temps", "Other": "temps", "Inputs": "temps",
}


@dataclass(frozen=True)
class Batch:
    """One micro-batch per device: ``pairs`` chosen/rejected pairs (2 x pairs rows) of ``seq_len`` tokens, whose
    last ``completion_fraction`` are completion tokens (TRL's defaults: 8 pairs, max_length 1024)."""

    pairs: int = 8
    seq_len: int = 1024
    completion_fraction: float = 0.5

    def __post_init__(self):
        if self.pairs < 1 or self.seq_len < 2 or not 0 < self.completion_fraction <= 1:
            raise ValueError(f"need pairs >= 1, seq_len >= 2 and 0 < completion_fraction <= 1; got {self}")

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def completion_tokens(self) -> int:
        """n: the label positions of the micro-batch (the last position of a row predicts nothing)."""
        return self.rows * max(1, min(self.seq_len - 1, round(self.completion_fraction * self.seq_len)))


def host_batch(batch: Batch, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real CPU tensors: input_ids, attention_mask (R, T), labels (R, T, shifted), index (n,), ref logps (B,),
    and TRL's completion_mask (R, T: 1 on the completion tokens, which ``labels`` predict)."""
    g = torch.Generator().manual_seed(seed)
    R, T = batch.rows, batch.seq_len
    ids = torch.randint(0, vocab_size, (R, T), generator=g)
    labels = torch.full((R, T), IGNORE_INDEX)
    start = T - 1 - batch.completion_tokens // R
    labels[:, start:T - 1] = ids[:, start + 1:]  # position t predicts token t + 1
    completion_mask = torch.zeros(R, T, dtype=torch.long)
    completion_mask[:, start + 1:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones(R, T, dtype=torch.long), "labels": labels,
            "index": completion_index(labels), "ref_chosen": -100 * torch.rand(batch.pairs, generator=g),
            "ref_rejected": -100 * torch.rand(batch.pairs, generator=g), "completion_mask": completion_mask}


# the batch keys each trainer's step reads (TRL's collator gives input_ids, attention_mask, completion_mask;
# logitsam.trl's adds the completion positions, found on the host)
_INPUTS = {"ours": ("input_ids", "attention_mask", "labels", "index", "ref_chosen", "ref_rejected"),
           "trl-subclass": ("input_ids", "attention_mask", "completion_mask", "index"),
           "trl": ("input_ids", "attention_mask", "completion_mask")}


def build_model(config: PreTrainedConfig, precision: str, *, gradient_checkpointing: bool) -> nn.Module:
    """The causal LM with random weights, in train mode: float32 master weights, or bfloat16 weights."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # transformers refuses SDPA for Gemma 2 (attention soft-cap, switched off in shapes.py): built eager, run SDPA
    attn = "eager" if config.model_type == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    if gradient_checkpointing:  # what models.load_model does for `gradient_checkpointing: true`
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def build_reference(config: PreTrainedConfig, precision: str) -> nn.Module:
    """TRL's live reference model: the same model in the policy's dtype (``create_model_from_path(...,
    dtype=model.dtype)``), in eval mode and without gradient checkpointing (only the policy gets it); its parameters
    keep ``requires_grad`` (TRL does not freeze them) but no optimizer holds them and ``no_grad`` runs them."""
    return build_model(config, precision, gradient_checkpointing=False).eval()


def shard(model: nn.Module, world_size: int, precision: str) -> None:
    """FSDP2 as accelerate's fsdp2.yaml applies it: one group per decoder layer plus the root (embeddings, norm,
    head), reshard after forward; with bf16 mixed precision, bf16 gathers and reductions over float32 shards."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with unset_fake_temporarily():  # the mesh is built outside FakeTensorMode
        mesh = init_device_mesh("cpu", (world_size,))
    half = precision == "bf16-autocast"
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16) if half else MixedPrecisionPolicy()
    layers = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """torch's fake process group of ``world_size`` ranks, this process rank 0: collectives do nothing."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def warm_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW with its state built (one step on zero gradients), gradients None again."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


# LogitsSAMConfig's defaults that shape the step (tests/test_simulate.py checks them against logitsam.trl, which
# this layer does not import); the batch's eval size enters sam_chunk_size "auto" (LogitsSAMDPOTrainer.step)
SUBCLASS_DEFAULTS = {"sam_rho": 1e-4, "sam_chunk_size": "auto", "sam_vocab_chunk_size": DEFAULT_VOCAB_CHUNK_SIZE,
                     "sam_norm": "local", "sam_variant": "plain", "per_device_eval_batch_size": 8}
# DPOConfig's loss at TRL 1.16's defaults (as logitsam.trl.preference_loss_kwargs maps it), and the policy's fused
# head outputs DPOTrainer asks for (use_weighting=False)
TRL_LOSS = {"loss_type": ["sigmoid"], "beta": 0.1, "loss_weights": [1.0]}
TRL_POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def make_head_pass(inputs: dict, *, rho: float, chunk_size: int | None, beta: float = 0.1):
    """The trainer's head pass (sigmoid DPO loss, precomputed reference), logits-SAM when rho > 0."""
    labels, index = inputs["labels"], inputs["index"]

    def loss_fn(out):
        losses, _, _ = preference_loss("sigmoid", out.chosen_logps, out.rejected_logps, inputs["ref_chosen"],
                                       inputs["ref_rejected"], beta=beta)
        return losses.mean()

    def head_pass(hidden, head):  # hidden (2B, T, d)
        if rho > 0:
            loss, _ = logits_sam(hidden, head, labels, loss_fn, rho, chunk_size=chunk_size, index=index)
            return loss
        return loss_fn(sequence_logps(hidden, head, labels, chunk_size=chunk_size, index=index))

    return head_pass


class KernelScratch(TorchDispatchMode):
    """Counts the scratch buffers of kernels that allocate them without the dispatcher seeing it.

    The trackers see each op's inputs and outputs only. ``aten.logsumexp`` computes ``(x - max).exp_()`` in a
    temporary of the input's size inside its kernel (CPU and CUDA alike): in the dense head's statistics that
    is one more (n, V) float32 buffer at the head's peak, found by the allocator cross-check in the tests. Here
    it gets a stand-in of that size, alive while the op runs. Entered inside the tracker, so it sees ops first.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # as the trackers do: DTensor runs its local ops, which come back here
        if func is torch.ops.aten.logsumexp.default:
            scratch = torch.empty_like(args[0])  # noqa: F841 (held while the kernel runs)
            return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def columns(snapshot: dict) -> dict[str, int]:
    """A tracker snapshot of the one device -> bytes per column, ``peak`` (their total) and ``raw`` categories."""
    if len(snapshot) > 1:
        raise AssertionError(f"expected one device, the snapshot has {list(snapshot)}")
    device_snap = next(iter(snapshot.values()), {})
    out = dict.fromkeys(COLUMNS, 0)
    raw = {}
    for key, value in device_snap.items():
        if key == "Total":
            continue
        name = getattr(key, "value", key)
        out[_COLUMN_OF[name]] += value
        raw[name] = value
    out["peak"] = device_snap.get("Total", 0)
    out["raw"] = raw
    return out


class Phases:
    """The peak of each phase of the step (forward, head, backward, optimizer), each with its categories, and of
    the parts of a phase (``parts``: the head's backward, the start of ``backward``).

    The trackers keep one running peak. Restarting it at each phase boundary gives every phase its own; it
    writes the tracker's private ``_peak_mem``/``_peak_mem_snap`` (torch 2.13), the state ``__enter__`` sets.
    After every op the trackers also update the peak of each module the op runs in, in Python over every
    module of the model: a third of the simulation's time at 7B. Only the global peak is read here, so
    ``_update_peak_stats`` keeps just that part of its work.
    """

    def __init__(self, tracker):
        self.tracker, self.peaks, self.parts, self._carried = tracker, {}, {}, {}
        tracker._update_peak_stats = self._update_global_peak

    def _update_global_peak(self, _state) -> None:
        t = self.tracker
        for dev, snap in t._curr_mem_snap.items():
            if t._peak_mem.get(dev, 0) < snap["Total"]:
                t._peak_mem[dev] = snap["Total"]
                t._peak_mem_snap[dev] = dict(snap)

    def current(self) -> dict:
        return columns(self.tracker.get_tracker_snapshot("current"))

    def end(self, name: str, within: str | None = None) -> None:
        """End phase ``name``. With ``within``, ``name`` is a part of that phase (``parts``): its peak also counts
        toward the phase's, which ends later."""
        peak = columns(self.tracker.get_tracker_snapshot("peak"))
        if within is not None:
            self.parts[name] = peak
            self._carried[within] = max(self._carried.get(within, peak), peak, key=lambda snap: snap["peak"])
        else:
            peak = max(self._carried.pop(name, peak), peak, key=lambda snap: snap["peak"])
            if peak["peak"] >= self.peaks.get(name, {"peak": -1})["peak"]:
                self.peaks[name] = peak
        now = self.tracker.get_tracker_snapshot("current")
        self.tracker._peak_mem_snap = now
        self.tracker._peak_mem = {dev: snap["Total"] for dev, snap in now.items()}


def simulate_step(config: PreTrainedConfig, *, rho: float, chunk_size: int | None, precision: str = "bf16-autocast",
                  batch: Batch | None = None, world_size: int = 0, gradient_checkpointing: bool = True,
                  fake: bool = True, seed: int = 0, around_step: contextlib.AbstractContextManager | None = None,
                  trainer: str = "ours") -> dict:
    """Memory of one training step, per phase and at its peak, in bytes per column (``COLUMNS``).

    Args:
        config: the model shape (``shapes.model_config``).
        rho: 0 for DPO, else the logits-SAM radius (``trl``: ignored, TRL has no SAM).
        chunk_size: None for the dense head, else the chunked head's tokens per chunk (``trl``: ignored, TRL's
            fused head tiles by its own constants).
        precision: "bf16-autocast" (float32 master weights, bf16 autocast) or "bf16" (bf16 weights).
        world_size: 0 for one process; N for FSDP2 over N ranks of a fake process group (rank 0's view; ``ours``
            only).
        fake: False runs the same step on real tensors (small shapes only: the cross-check).
        around_step: entered around the tracked step only (the cross-check's allocator profiler).
        trainer: whose step (``TRAINERS``): ``ours`` (precomputed reference), ``trl-subclass`` or ``trl`` (a live
            reference model, TRL's default).
    Returns:
        ``peak`` (the step's peak snapshot), ``peak_phase``, ``phases`` (each phase's peak snapshot),
        ``phase_parts`` (``head backward``: the backward until the head's input has its gradient, part of
        ``backward``), ``rest`` (at the start of the step), ``after_backward``, ``num_params``, ``seconds``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    if world_size and trainer != "ours":
        raise ValueError(f"trainer {trainer!r} is simulated in one process only (its reference model is not sharded "
                         "here); use world_size=0")
    start = time.perf_counter()
    torch.manual_seed(seed)
    batch = batch or Batch()
    host = {k: v for k, v in host_batch(batch, config.vocab_size, seed).items() if k in _INPUTS[trainer]}
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    group = fake_process_group(world_size) if world_size else contextlib.nullcontext()
    with group, mode, warnings.catch_warnings():
        # checkpoint recomputation re-enters modules in backward; ModTracker warns and copes
        warnings.filterwarnings("ignore", message="The module hierarchy tracking")
        model = build_model(config, precision, gradient_checkpointing=gradient_checkpointing)
        num_params = sum(p.numel() for p in model.parameters())
        ref = None
        if trainer != "ours":  # DPOTrainer.__init__: the reference model, and TRL's fused head on both models
            from trl.trainer.utils import add_fused_lm_head

            ref = build_reference(config, precision)
            add_fused_lm_head(model, outputs=TRL_POLICY_OUTPUTS)
            add_fused_lm_head(ref)
        if world_size:
            shard(model, world_size, precision)
        optimizer = warm_optimizer(model)
        inputs = {k: mode.from_tensor(v) if fake else v for k, v in host.items()}
        if world_size:
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs(tuple(inputs.values()))
        else:
            tracker = MemTracker()
            tracker.track_external(model, optimizer, *([ref] if ref is not None else []), *inputs.values())
        scratch = KernelScratch() if fake else contextlib.nullcontext()  # real kernels allocate their own
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16,
                                     enabled=precision == "bf16-autocast")
        with tracker, scratch, around_step or contextlib.nullcontext():
            phases = Phases(tracker)
            rest = phases.current()
            with _head_backward_part(model, phases):
                if trainer == "ours":
                    loss = ours_step(model, inputs, phases, autocast, rho=rho, chunk_size=chunk_size)
                elif trainer == "trl-subclass":
                    loss = subclass_step(model, ref, inputs, phases, autocast, rho=rho, chunk_size=chunk_size)
                else:
                    loss = trl_step(model, ref, inputs, phases, autocast)
            phases.end("forward")
            loss.backward()
            del loss  # the trainer drops the graph (and what its nodes hold) before the optimizer step
            after_backward = phases.current()
            phases.end("backward")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            phases.end("optimizer")
    peak_phase = max(phases.peaks, key=lambda name: phases.peaks[name]["peak"])
    return {"peak": phases.peaks[peak_phase], "peak_phase": peak_phase, "phases": phases.peaks,
            "phase_parts": phases.parts, "rest": rest,
            "after_backward": after_backward, "num_params": num_params, "num_param_tensors": len(optimizer.state),
            "ref_params": 0 if ref is None else sum(p.numel() for p in ref.parameters()), "trainer": trainer,
            "seconds": time.perf_counter() - start}


def ours_step(model, inputs, phases: Phases, autocast, *, rho: float, chunk_size: int | None) -> torch.Tensor:
    """``PreferenceTrainer.compute_loss`` with precomputed reference log-probs: backbone, then the head pass."""
    head_pass = make_head_pass(inputs, rho=rho, chunk_size=chunk_size)

    def head_phase(hidden, head):  # the head pass as a phase of its own
        phases.end("forward")
        loss = head_pass(hidden, head)
        phases.end("head")
        return loss

    with autocast():
        return head_inside_forward(model, inputs["input_ids"], inputs["attention_mask"], head_phase)


@contextlib.contextmanager
def _head_backward_part(model: nn.Module, phases: Phases):
    """Ends the ``head backward`` part of the backward when the backbone's output (the head's input) gets its
    gradient: the head's backward is done, the backbone's starts."""
    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if hidden.requires_grad:
            hidden.register_hook(lambda _grad: phases.end("head backward", within="backward"))

    handle = model.base_model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _forward_ends_after_backbone(model: nn.Module, phases: Phases):
    """Ends the ``forward`` phase when the backbone returns (the head runs after it, inside the model's forward)."""
    handle = model.base_model.register_forward_hook(lambda *_: phases.end("forward"))
    try:
        yield
    finally:
        handle.remove()


def subclass_step(model, ref, inputs, phases: Phases, autocast, *, rho: float, chunk_size: int | None
                  ) -> torch.Tensor:
    """``LogitsSAMDPOTrainer.compute_loss`` with TRL's live reference: ``compute_ref_log_probs`` (the reference
    through logitsam's head without statistics, chunked like the policy's, under ``no_grad``), then the shared
    ``HeadStep`` on the policy with ``sam=True`` (training)."""
    ids, mask, index = inputs["input_ids"], inputs["attention_mask"], inputs["index"]
    labels = shift_labels(ids.masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX))  # logitsam.trl._labels
    step = HeadStep(dict(TRL_LOSS), rho=rho, norm=SUBCLASS_DEFAULTS["sam_norm"],
                    variant=SUBCLASS_DEFAULTS["sam_variant"], chunk_size=chunk_size,
                    vocab_chunk_size=SUBCLASS_DEFAULTS["sam_vocab_chunk_size"])

    def ref_pass(hidden, head):  # compute_ref_log_probs
        out = sequence_logps(hidden, head, labels, with_stats=False, index=index, **step.chunks)
        return step.logps(out, labels)  # (2B,)

    with torch.no_grad(), autocast():
        ref_logps = head_inside_forward(ref, ids, mask, ref_pass).detach()
    ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)
    phases.end("reference")
    with _forward_ends_after_backbone(model, phases):
        with autocast():  # accelerate's autocast around the policy's forward, the head pass inside it
            res = step(model, ids, mask, labels, index, ref_chosen, ref_rejected, sam=True)
        phases.end("head")
    return res.loss


def trl_step(model, ref, inputs, phases: Phases, autocast) -> torch.Tensor:
    """TRL 1.16's ``DPOTrainer._compute_loss`` at its defaults (sigmoid loss, beta 0.1, no ``ld_alpha``, a live
    reference model): the calls of ``_compute_loss``, less its metrics (host syncs on small tensors)."""
    ids, mask, completion_mask = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    model_kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    shift_completion_mask = completion_mask[..., 1:]
    labels = ids.masked_fill(completion_mask == 0, -100)
    with _forward_ends_after_backbone(model, phases):
        with autocast():  # accelerate wraps each prepared model's forward in autocast
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        phases.end("head")
    seq_len = shift_completion_mask.size(1)
    per_token_logps = outputs.log_probs[:, -seq_len:]
    logps = per_token_logps.sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    with torch.no_grad(), autocast():
        ref_outputs = ref(**model_kwargs, labels=labels, fused_lm_head=True)
    ref_logps = ref_outputs.log_probs[:, -seq_len:].sum(dim=1)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)
    phases.end("reference")
    delta_score = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    loss = 0.0
    for loss_type, loss_weight in zip(TRL_LOSS["loss_type"], TRL_LOSS["loss_weights"], strict=True):
        assert loss_type == "sigmoid"
        per_sequence_loss = -F.logsigmoid(TRL_LOSS["beta"] * delta_score)
        loss = loss + per_sequence_loss.mean() * loss_weight
    return loss
