"""`LogitsSAMDPOTrainer`: TRL 1.16's DPOTrainer with logitsam's head pass, logits-SAM and losses.

A TRL script changes in three lines::

    from logitsam.trl import LogitsSAMConfig, LogitsSAMDPOTrainer
    args = LogitsSAMConfig(output_dir="out", sam_rho=1e-4, ...)        # was DPOConfig(...)
    trainer = LogitsSAMDPOTrainer(model=model, args=args, ...)          # was DPOTrainer(...)

Everything except the loss and the head stays TRL's: dataset preparation and collator (plus the completion
positions, found on the host), the choice of reference (a reference model, precomputed reference log-probs or PEFT
adapters switched off), ``disable_dropout``, logging, checkpoints. One micro-batch (``compute_loss``), the same
head step as ``logitsam train``'s (``train.step.HeadStep``):

    backbone once -> hidden (2B, T, d) -> head pass: plain (``sequence_logps``) or logits-SAM (``logits_sam``)
    -> ``preference_loss`` with DPOConfig's keys mapped by ``preference_loss_kwargs`` -> TRL's metrics + sam/*

The reference, live or precomputed, goes through the same head without statistics (``compute_ref_log_probs``),
chunked like the policy: no (2B, T, V) logits anywhere, and at step 1 (policy == reference) the rewards are
exactly 0, as TRL's are. Metrics stay on the device and are reduced over ranks once per logging step.
With ``sam_rho = 0`` the loss and gradients are TRL's own (the same formula on the same tokens); the head
pass differs from TRL's fused head only in float rounding.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

try:
    import trl
    from accelerate.utils import is_peft_model
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as e:  # the optional extra
    raise ImportError("logitsam.trl needs TRL 1.16: pip install 'logitsam[trl]'") from e

import torch
from transformers import TrainerCallback

from .core import IGNORE_INDEX, VARIANTS, sequence_logps, shift_labels
from .core.head_chunked import DEFAULT_VOCAB_CHUNK_SIZE
from .core.losses import LOSS_TYPES
from .core.sam import NORMS
from .train._inside import check_linear_head_inside, head_inside_forward
from .train.config import ConfigError
from .train.run import resolve_chunk_size
from .train.step import COMPLETION_INDEX, DeferredMetrics, HeadStep, batch_completion_index, ratio_out_of_band
from .train.trainer import RATIO_BAND, ratio_is_measurable

logger = logging.getLogger("logitsam.trl")

TESTED_TRL = "1.16"
if not trl.__version__.startswith(TESTED_TRL + "."):
    logger.warning("logitsam.trl is tested with TRL %s.x; TRL %s is installed", TESTED_TRL, trl.__version__)

# The DPOConfig keys TRL 1.16's DPOTrainer reads for each loss_type besides `beta` (dpo_trainer.py,
# `_compute_loss`). `label_smoothing` means nothing to the other losses there, `sigmoid` included.
TRL_LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "sigmoid": (), "hinge": (), "ipo": (), "exo_pair": ("label_smoothing",), "nca_pair": (),
    "robust": ("label_smoothing",), "bco_pair": (), "sppo_hard": (), "aot": ("label_smoothing",),
    "aot_unpaired": ("label_smoothing",), "apo_zero": (), "apo_down": (), "discopop": ("discopop_tau",),
    "sft": (), "sigmoid_norm": (),
}

# DPOConfig / TrainingArguments keys TRL (or transformers' Trainer) would act on and this subclass cannot honour:
# key -> why. Refused when set to anything truthy.
REFUSED_KEYS: dict[str, str] = {
    "use_liger_kernel": "Liger patches the model's forward and its logits path, which logitsam's head pass replaces "
                        "(the LM head runs inside the model's forward as logitsam's head step)",
    "padding_free": "logitsam's head step needs padded (2B, T) rows: chosen and rejected completions are rows of one "
                    "padded batch (TRL 1.16 itself falls back to padding)",
}


def refuse_unsupported_keys(args) -> None:
    """Raise ``ConfigError`` (a ValueError) naming the first key of ``REFUSED_KEYS`` that ``args`` sets, its value and
    why logitsam cannot honour it, instead of accepting it and silently training without it."""
    for key, why in REFUSED_KEYS.items():
        value = getattr(args, key, None)
        if value:
            raise ConfigError(f"{type(args).__name__} key {key!r} = {value!r} is not supported by LogitsSAMDPOTrainer: "
                              f"{why}; set {key}=False")


@dataclass
class LogitsSAMConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus the logits-SAM keys (Luo et al., ICLR 2026, Alg. 1).

    Every DPOConfig key keeps TRL's meaning. ``sam_rho = 0`` trains plain DPO with logitsam's head.
    """

    sam_rho: float = field(default=1e-4, metadata={
        "help": "logits-SAM radius rho on the LM head (the paper's best: 1e-4); 0 trains without SAM."})
    sam_norm: str = field(default="local", metadata={
        "help": "Norm of the head gradient: local (per device and micro-batch, the authors') or global "
                "(mean of the squared norms over ranks).", "choices": list(NORMS)})
    sam_variant: str = field(default="plain", metadata={
        "help": "Perturbation: plain (rho g/||g||), adaptive (the authors' rho |W|g/|| |W|g ||) or asam "
                "(Kwon et al. 2021: rho W^2 g/|| |W|g ||).", "choices": list(VARIANTS)})
    sam_chunk_size: str | None = field(default="auto", metadata={
        "help": "Completion tokens per chunk of every head pass (policy and reference): an integer, None (dense "
                "n_tokens x V logits) or auto (chunked when one micro-batch's fp32 logits would exceed 1 GiB, e.g. "
                "always at TRL's default batch with a 128k vocabulary)."})
    sam_vocab_chunk_size: int = field(default=DEFAULT_VOCAB_CHUNK_SIZE, metadata={
        "help": "Vocabulary slice of the chunked head (used when sam_chunk_size is set)."})

    def __post_init__(self):
        refuse_unsupported_keys(self)
        super().__post_init__()
        rho = self.sam_rho
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"LogitsSAMConfig key 'sam_rho' = {rho!r} must be a finite number >= 0")
        for key, allowed in (("sam_norm", NORMS), ("sam_variant", VARIANTS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"LogitsSAMConfig key {key!r} = {getattr(self, key)!r} is not one of {list(allowed)}")
        if isinstance(self.sam_chunk_size, str) and self.sam_chunk_size.strip().isdigit():
            self.sam_chunk_size = int(self.sam_chunk_size)  # from the command line
        if isinstance(self.sam_chunk_size, str) and self.sam_chunk_size.lower() in ("none", "null"):
            self.sam_chunk_size = None
        for key in ("sam_chunk_size", "sam_vocab_chunk_size"):
            value = getattr(self, key)
            if key == "sam_chunk_size" and (value is None or value == "auto"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LogitsSAMConfig key {key!r} = {value!r} must be an integer >= 1"
                                 + (", None or 'auto'" if key == "sam_chunk_size" else ""))


def preference_loss_kwargs(args: DPOConfig) -> dict:
    """``preference_loss`` keyword arguments that mean what ``args`` means to TRL 1.16's DPOTrainer.

        preference_loss(**preference_loss_kwargs(args), policy_chosen_logps=..., ...)

    Returns ``loss_type`` (list), ``beta``, ``loss_weights`` and each loss's own keys from ``TRL_LOSS_KEYS``
    (``label_smoothing`` only when a listed loss reads it in TRL, ``discopop_tau`` for discopop).

    Raises:
        ValueError: a loss_type TRL 1.16 does not have, or a key one listed loss needs that another listed
            loss of ours would read with a meaning TRL does not give it (``label_smoothing`` with sigmoid).
    """
    names = list(args.loss_type)
    unknown = [n for n in names if n not in TRL_LOSS_KEYS]
    if unknown:
        raise ValueError(f"DPOConfig key 'loss_type' = {unknown} is not a TRL 1.16 DPO loss; allowed: "
                         f"{list(TRL_LOSS_KEYS)} (logitsam's other losses run through `logitsam train`)")
    kwargs = {"loss_type": names, "beta": args.beta, "loss_weights": args.loss_weights or [1.0] * len(names)}
    for key in dict.fromkeys(k for n in names for k in TRL_LOSS_KEYS[n]):
        value = getattr(args, key)
        misread = [n for n in names
                   if key not in TRL_LOSS_KEYS[n] and key in inspect.signature(LOSS_TYPES[n]).parameters]
        if misread and value:
            raise ValueError(f"DPOConfig key {key!r} = {value!r} is read by {names} here, but TRL 1.16 ignores it for "
                             f"{misread}; train these losses in separate runs or set {key} to 0")
        kwargs[key] = value
    if args.f_divergence_type != "reverse_kl":  # f-DPO: preference_loss refuses the losses TRL refuses it for
        kwargs.update(f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef)
    return kwargs


class LogitsSAMDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` whose loss is computed by logitsam: one backbone pass, our head pass
    (plain or logits-SAM, dense or chunked) and ``logitsam.core.losses.preference_loss``.

    Takes DPOTrainer's arguments; ``args`` is a ``LogitsSAMConfig``. Logged: TRL's metrics, computed as TRL
    computes them, from the clean (unperturbed) head pass, and with logits-SAM ``sam/loss_pre``,
    ``sam/loss_post`` (the loss that is backpropagated and logged as ``loss``), ``sam/grad_norm``,
    ``sam/first_order`` (``<g, eps>``) and ``sam/first_order_ratio``.

    TRL's loss options all apply, in both logits-SAM passes: ``f_divergence_type`` (in ``preference_loss``),
    ``ld_alpha`` (LD-DPO sums of the policy's token log-probs; TRL's reference pass applies it to the
    reference), ``use_weighting`` (WPO weights from the clean pass, reused by the perturbed one) and an MoE
    model's router aux loss. Not supported (ValueError at construction): vision datasets, models whose logits
    are not ``hidden @ W^T`` (soft-cap, logit scale), ``use_liger_kernel`` and ``padding_free`` (``ConfigError``).
    The head check runs at construction, or, for a model DeepSpeed ZeRO-3 partitioned at load (``zero.Init``: every
    weight is empty outside its module's forward), at the start of ``train`` on the prepared engine.
    """

    def __init__(self, model, ref_model=None, args: LogitsSAMConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = LogitsSAMConfig(f"{str(name).split('/')[-1] or 'model'}-LogitsSAM-DPO")
        if not isinstance(args, LogitsSAMConfig):
            raise TypeError(f"LogitsSAMDPOTrainer needs args=LogitsSAMConfig(...) (a DPOConfig with the sam_* keys), "
                            f"got {type(args).__name__}")
        refuse_unsupported_keys(args)  # also when set on the config after it was built
        self._loss_kwargs = preference_loss_kwargs(args)
        self._step = None  # the head step; its chunking needs the model's vocabulary (set once the model is loaded)
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        if self._is_vision_dataset:
            raise ValueError("LogitsSAMDPOTrainer supports text datasets only (this one has images)")
        self._ratio_warned = False
        self._deferred = DeferredMetrics()
        self._with_completion_index()
        self._head_checked = False
        if _zero3_partitioned(self.model):  # its weights are empty until the engine's forward gathers them
            self.add_callback(_CheckHeadAtTrainBegin(self))
        else:
            self._check_head(self.model)

    @property
    def step(self) -> HeadStep:
        """The shared head step (``train.step.HeadStep``) with this config's loss, SAM and chunking."""
        if self._step is None:
            args = self.args
            weight = self.model.get_output_embeddings().weight
            vocab = getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partition is empty: ds_shape is real
            tokens = 2 * max(args.per_device_train_batch_size, args.per_device_eval_batch_size) * (args.max_length
                                                                                                   or 1024)
            chunk = resolve_chunk_size(args.sam_chunk_size, tokens=tokens, vocab_size=vocab)
            aux = self.router_aux_loss_coef if getattr(self, "aux_loss_enabled", False) else 0.0
            self._step = HeadStep(self._loss_kwargs, rho=args.sam_rho, norm=args.sam_norm, variant=args.sam_variant,
                                  chunk_size=chunk, vocab_chunk_size=args.sam_vocab_chunk_size, ld_alpha=self.ld_alpha,
                                  use_weighting=self.use_weighting, aux_coef=aux)
            logger.info("LogitsSAMDPOTrainer: LM head %s (sam_chunk_size=%s, V=%d, up to %d tokens per micro-batch)",
                        "dense" if chunk is None else f"chunked, {chunk} tokens per chunk", args.sam_chunk_size, vocab,
                        tokens)
        # the SAM settings are read from args at every step, as TRL reads its own
        args = self.args
        self._step.rho, self._step.norm, self._step.variant = args.sam_rho, args.sam_norm, args.sam_variant
        return self._step

    def _with_completion_index(self):
        """Add the completion positions to TRL's batches, found in the collator while they are on the host (an
        iterable dataset is dispatched by accelerate, which would split them: there the head finds them itself)."""
        from datasets import IterableDataset

        datasets = [self.train_dataset] + (list(self.eval_dataset.values()) if isinstance(self.eval_dataset, dict)
                                           else [self.eval_dataset])
        if not any(isinstance(d, IterableDataset) for d in datasets):
            self.data_collator = _WithCompletionIndex(self.data_collator)

    def _check_head(self, model, device=None):
        """Our head computes ``hidden @ W^T``; refuse a policy whose logits are not that (TRL's head scales them).

        ``model``: the policy as built (at construction) or as prepared (``model_wrapped``: DDP, FSDP2, a DeepSpeed
        engine). The probes run as the head's forward inside the outermost forward, where a sharded head is gathered:
        one forward, on every rank, with the same rows (the first two of the training set)."""
        dataset = self.train_dataset
        rows = [dataset[i] for i in range(min(2, len(dataset)))] if hasattr(dataset, "__len__") \
            else [next(iter(dataset))]
        batch = self.data_collator(rows)
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        check_linear_head_inside(model, batch["input_ids"], batch["attention_mask"], name=name, device=device)
        self._head_checked = True

    # ---- the reference -----------------------------------------------------------------------
    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference log-probs (B,), (B,) through logitsam's head, without statistics and chunked like the
        policy's: used for the live reference and for TRL's precompute alike. ``model`` is the reference model, or
        the policy (PEFT: its adapters switched off, as TRL does)."""
        labels = _labels(inputs)
        adapter = nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

        def head_pass(hidden, head):  # inside the model's forward, where a sharded head is gathered
            out = sequence_logps(hidden, head, labels, with_stats=False, index=inputs.get(COMPLETION_INDEX),
                                 **self.step.chunks)
            return self.step.logps(out, labels)  # (2B,)

        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            logps = head_inside_forward(model, inputs["input_ids"], inputs["attention_mask"], head_pass).detach()
        return logps.chunk(2, dim=0)

    def _ref_logps(self, inputs):
        """Precomputed (a column of the batch) or computed now (the reference model, or PEFT adapters off)."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)

    # ---- one micro-batch ---------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = _labels(inputs)  # (2B, T)
        ref_chosen, ref_rejected = self._ref_logps(inputs)
        res = self.step(model, inputs["input_ids"], inputs["attention_mask"], labels, inputs.get(COMPLETION_INDEX),
                        ref_chosen, ref_rejected, sam=model.training)
        self._record_trl_metrics(mode, res, ref_chosen, ref_rejected, inputs)
        if return_outputs:  # TRL's deprecated path: the logits come from an extra forward
            warnings.warn("`return_outputs=True` recomputes the logits with an extra forward pass (as TRL does)",
                          FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                use_cache=False)
            return res.loss, outputs
        return res.loss

    # ---- metrics: TRL 1.16's names, computed as its `_compute_loss` computes them --------------------
    def _record_trl_metrics(self, mode, res, ref_chosen, ref_rejected, inputs):
        """This micro-batch's metrics as device tensors: per-token means as (sum, count) pairs summed over ranks
        (TRL gathers, then divides), per-pair means as (sum, pairs); reduced once per logging step."""
        out, n = res.out, res.out.num_pairs
        chosen_logps, rejected_logps = res.logps[:n], res.logps[n:]  # LD-DPO's sums when ld_alpha is set, as in TRL
        chosen_rewards = self.beta * (chosen_logps - ref_chosen)  # (B,)
        rejected_rewards = self.beta * (rejected_logps - ref_rejected)
        pairs = torch.full((), float(n), device=res.loss.device)  # a fill, not a host-to-device copy
        chosen_tokens = out.chosen_lengths.sum()
        ratios = {
            "entropy": (out.entropy.sum(), out.lengths.sum()),
            # TRL's per-token mean_logits is the mean over the vocabulary: sum_v z_v / V
            "logits/chosen": (out.logits_sum[:n].sum() / out.vocab_size, chosen_tokens),
            "logits/rejected": (out.logits_sum[n:].sum() / out.vocab_size, out.rejected_lengths.sum()),
            "mean_token_accuracy": (out.top1[:n].sum(), chosen_tokens),
            "rewards/chosen": (chosen_rewards.sum(), pairs),
            "rewards/rejected": (rejected_rewards.sum(), pairs),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).float().sum(), pairs),
            "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), pairs),
            "logps/chosen": (chosen_logps.sum(), pairs),
            "logps/rejected": (rejected_logps.sum(), pairs),
        }
        means = {**res.extra, **{f"sam/{k}": v for k, v in res.sam.items()}}  # the mean over ranks
        sums = {"num_tokens": inputs["attention_mask"].sum()} if mode == "train" else {}
        self._deferred.add(mode, means=means, ratios=ratios, sums=sums)

    def _flush_metrics(self, mode):
        """Reduce the pending micro-batches over ranks (one gather) into TRL's ``_metrics`` lists."""
        flushed = self._deferred.flush(mode, self.accelerator.gather, self.accelerator.num_processes)
        tokens = flushed.pop("num_tokens", None)
        if tokens is not None:
            self._total_train_tokens += int(sum(tokens)) // self._tp_size
        if mode == "train":
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        for key, values in flushed.items():
            self._metrics[mode][key].extend(values)
        self._warn_ratio(flushed)

    def log(self, logs, start_time=None):
        self._flush_metrics("train" if self.model.training else "eval")
        super().log(logs, start_time)

    def _warn_ratio(self, flushed: dict):
        """One warning per run when ``sam/first_order_ratio`` leaves ``RATIO_BAND`` (see PreferenceTrainer)."""
        found = None if self._ratio_warned else ratio_out_of_band(flushed, ratio_is_measurable, RATIO_BAND)
        if found:
            self._ratio_warned = True
            why = ("the perturbation is below the working precision: logits-SAM acts as plain DPO; keep float32 "
                   "head weights (bf16=True autocast over float32 weights) or raise sam_rho" if found[1] == "low"
                   else "sam_rho is so large that the loss is far from linear over the perturbation; lower sam_rho")
            logger.warning("sam/first_order_ratio = %.3g at step %d (expected ~1, band %s): %s.",
                           found[0], self.state.global_step, RATIO_BAND, why)


def _zero3_partitioned(model) -> bool:
    """Whether DeepSpeed ZeRO-3 holds ``model``'s weights as partitions (``zero.Init`` at load, or an engine)."""
    return any(hasattr(p, "ds_numel") for p in model.parameters())


class _CheckHeadAtTrainBegin(TrainerCallback):
    """Runs the head check once, at the start of training, on the prepared model (``model_wrapped``) on every rank:
    under ZeRO-3 only the engine's forward gathers the weights the check reads."""

    def __init__(self, trainer: LogitsSAMDPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if not trainer._head_checked:
            with trainer.accelerator.autocast():  # as the step runs it
                trainer._check_head(trainer.model_wrapped, device=args.device)


def _labels(inputs) -> torch.Tensor:
    """(2B, T): the token each position predicts, -100 outside the completions (TRL's completion_mask)."""
    return shift_labels(inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX))


class _WithCompletionIndex:
    """TRL's collator, plus ``completion_index``: the (n,) flat positions the head scores, found on the host."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if "completion_mask" in batch and COMPLETION_INDEX not in batch:
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
            batch[COMPLETION_INDEX] = batch_completion_index(labels)
        return batch
