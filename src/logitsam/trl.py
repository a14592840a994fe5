"""`LogitsSAMDPOTrainer`: TRL 1.16's DPOTrainer with logitsam's head pass, logits-SAM and losses.

A TRL script changes in three lines::

    from logitsam.trl import LogitsSAMConfig, LogitsSAMDPOTrainer
    args = LogitsSAMConfig(output_dir="out", sam_rho=1e-4, ...)        # was DPOConfig(...)
    trainer = LogitsSAMDPOTrainer(model=model, args=args, ...)          # was DPOTrainer(...)

Everything except the loss stays TRL's: dataset preparation and collator, the reference (a reference
model, precomputed reference log-probs or PEFT adapters switched off, all through TRL's own
``compute_ref_log_probs``), ``disable_dropout``, logging, checkpoints. One micro-batch (``compute_loss``):

    backbone once -> hidden (2B, T, d) -> head pass: plain (``sequence_logps``) or logits-SAM (``logits_sam``)
    -> ``preference_loss`` with DPOConfig's keys mapped by ``preference_loss_kwargs`` -> TRL's metrics + sam/*

With ``sam_rho = 0`` the loss and gradients are TRL's own (the same formula on the same tokens); the head
pass differs from TRL's fused head only in float rounding.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from dataclasses import dataclass, field

try:
    import trl
    from trl import DPOConfig, DPOTrainer
except ImportError as e:  # the optional extra
    raise ImportError("logitsam.trl needs TRL 1.16: pip install 'logitsam[trl]'") from e

import torch

from .core import IGNORE_INDEX, VARIANTS, HeadOutput, first_order_ratio, logits_sam, sequence_logps, shift_labels
from .core.head_chunked import DEFAULT_VOCAB_CHUNK_SIZE
from .core.losses import LOSS_TYPES, preference_loss
from .core.sam import NORMS
from .core.weighting import ld_logps, wpo_weights
from .models import check_linear_head
from .train._inside import head_inside_forward
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
    sam_chunk_size: int | None = field(default=None, metadata={
        "help": "Completion tokens per chunk of every policy head pass; None: dense (n_tokens x V) logits."})
    sam_vocab_chunk_size: int = field(default=DEFAULT_VOCAB_CHUNK_SIZE, metadata={
        "help": "Vocabulary slice of the chunked head (used when sam_chunk_size is set)."})

    def __post_init__(self):
        super().__post_init__()
        rho = self.sam_rho
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"LogitsSAMConfig key 'sam_rho' = {rho!r} must be a finite number >= 0")
        for key, allowed in (("sam_norm", NORMS), ("sam_variant", VARIANTS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"LogitsSAMConfig key {key!r} = {getattr(self, key)!r} is not one of {list(allowed)}")
        for key in ("sam_chunk_size", "sam_vocab_chunk_size"):
            value = getattr(self, key)
            if value is None and key == "sam_chunk_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LogitsSAMConfig key {key!r} = {value!r} must be an integer >= 1"
                                 + (" or None" if key == "sam_chunk_size" else ""))


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
    are not ``hidden @ W^T`` (soft-cap, logit scale).
    """

    def __init__(self, model, ref_model=None, args: LogitsSAMConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = LogitsSAMConfig(f"{str(name).split('/')[-1] or 'model'}-LogitsSAM-DPO")
        if not isinstance(args, LogitsSAMConfig):
            raise TypeError(f"LogitsSAMDPOTrainer needs args=LogitsSAMConfig(...) (a DPOConfig with the sam_* keys), "
                            f"got {type(args).__name__}")
        self._loss_kwargs = preference_loss_kwargs(args)
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        if self._is_vision_dataset:
            raise ValueError("LogitsSAMDPOTrainer supports text datasets only (this one has images)")
        self._ratio_warned = False
        self._check_head()

    def _check_head(self):
        """Our head computes ``hidden @ W^T``; refuse a policy whose logits are not that (TRL's head scales them)."""
        dataset = self.train_dataset
        rows = [dataset[i] for i in range(min(2, len(dataset)))] if hasattr(dataset, "__len__") \
            else [next(iter(dataset))]
        batch = self.data_collator(rows)
        check_linear_head(self.model, batch["input_ids"], batch["attention_mask"])

    # ---- one micro-batch ---------------------------------------------------------------------
    def _ref_logps(self, inputs):
        """TRL's reference log-probs: precomputed, or TRL's ``compute_ref_log_probs`` (reference model,
        or the policy with its PEFT adapters off), each (B,)."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        model = self.ref_model if self.ref_model is not None else self.model
        ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
        return ref_chosen.detach(), ref_rejected.detach()

    def _logps(self, out: HeadOutput, labels) -> torch.Tensor:
        """(2B,) the sequence log-probs TRL's loss reads: plain sums, or LD-DPO's with ``ld_alpha``."""
        return out.logps if self.ld_alpha is None else ld_logps(out.token_logps, labels, self.ld_alpha)

    def _loss_fn(self, ref_chosen, ref_rejected, labels, kept: dict):
        def loss_fn(out: HeadOutput) -> torch.Tensor:
            logps = self._logps(out, labels)
            n = logps.shape[0] // 2
            losses, _, _ = preference_loss(
                policy_chosen_logps=logps[:n], policy_rejected_logps=logps[n:],
                ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths, **self._loss_kwargs,
            )
            if self.use_weighting:  # WPO: the clean pass's weights, reused by the perturbed pass
                if "wpo" not in kept:
                    kept["wpo"] = wpo_weights(out)
                losses = losses * kept["wpo"].to(losses.dtype)
            return losses.mean()  # TRL: sum_k w_k mean(loss_k) == mean(sum_k w_k loss_k)

        return loss_fn

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        # (2B, T): the token each position predicts, -100 outside the completions (TRL's completion_mask)
        labels = shift_labels(inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX))
        ref_chosen, ref_rejected = self._ref_logps(inputs)
        loss_fn = self._loss_fn(ref_chosen, ref_rejected, labels, {})
        chunks = {"chunk_size": args.sam_chunk_size, "vocab_chunk_size": args.sam_vocab_chunk_size}
        sam = args.sam_rho > 0 and model.training
        side = {}  # the clean pass's detached HeadOutput and the SAM statistics, out of the forward

        def head_pass(hidden, head):  # hidden (2B, T, d); runs as the head's forward (a sharded head is gathered)
            if sam:
                loss, stats = logits_sam(hidden, head, labels, loss_fn, args.sam_rho, norm=args.sam_norm,
                                         variant=args.sam_variant, **chunks)
                side["out"], side["sam"] = stats.pop("clean"), stats
                return loss
            out = sequence_logps(hidden, head, labels, **chunks)
            side["out"] = out.detach()
            return loss_fn(out)

        aux = {} if self.aux_loss_enabled else None
        loss = head_inside_forward(model, inputs["input_ids"], inputs["attention_mask"], head_pass, aux=aux)
        if aux:  # TRL: loss + router_aux_loss_coef * the model's load-balancing loss
            loss = loss + self.router_aux_loss_coef * aux["aux_loss"]
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux["aux_loss"]).mean().item())
        self._log_trl_metrics(mode, side["out"], ref_chosen, ref_rejected, inputs, self._logps(side["out"], labels))
        if sam:
            self._log_sam_metrics(mode, side["sam"])
        if return_outputs:  # TRL's deprecated path: the logits come from an extra forward
            warnings.warn("`return_outputs=True` recomputes the logits with an extra forward pass (as TRL does)",
                          FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                use_cache=False)
            return loss, outputs
        return loss

    # ---- metrics: TRL 1.16's names, computed as its `_compute_loss` computes them --------------------
    def _log_trl_metrics(self, mode, out: HeadOutput, ref_chosen, ref_rejected, inputs, logps):
        gather, gather_m, store = self.accelerator.gather, self.accelerator.gather_for_metrics, self._metrics[mode]

        def token_mean(total, tokens):  # a per-token mean over all ranks, 0 without tokens
            total, tokens = gather_m(total).sum().item(), gather_m(tokens).sum().item()
            return total / tokens if tokens > 0 else 0.0

        n = out.num_pairs
        store["entropy"].append(token_mean(out.entropy.sum(), out.lengths.sum()))
        if mode == "train":
            self._total_train_tokens += gather_m(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        store["num_tokens"] = [self._total_train_tokens]
        # TRL's per-token mean_logits is the mean over the vocabulary: sum_v z_v / V
        store["logits/chosen"].append(token_mean(out.logits_sum[:n].sum() / out.vocab_size, out.chosen_lengths.sum()))
        store["logits/rejected"].append(token_mean(out.logits_sum[n:].sum() / out.vocab_size,
                                                   out.rejected_lengths.sum()))
        store["mean_token_accuracy"].append(token_mean(out.top1[:n].sum(), out.chosen_lengths.sum()))
        chosen_logps, rejected_logps = logps[:n], logps[n:]  # LD-DPO's sums when ld_alpha is set, as in TRL
        chosen_rewards = self.beta * (chosen_logps - ref_chosen)  # (B,)
        rejected_rewards = self.beta * (rejected_logps - ref_rejected)
        store["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        store["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        store["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        store["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        store["logps/chosen"].append(gather(chosen_logps).mean().item())
        store["logps/rejected"].append(gather(rejected_logps).mean().item())

    def _log_sam_metrics(self, mode, stats: dict):
        stats = dict(stats, first_order_ratio=first_order_ratio(stats["loss_pre"], stats["loss_post"],
                                                                stats["first_order"]))
        self._warn_ratio(stats)
        keys = list(stats)
        values = torch.tensor([[float(stats[k]) for k in keys]], device=self.accelerator.device)  # (1, K)
        means = self.accelerator.gather(values).mean(0).tolist()  # one collective; the mean over ranks
        for key, value in zip(keys, means, strict=True):
            self._metrics[mode][f"sam/{key}"].append(value)

    def _warn_ratio(self, stats: dict):
        """One warning per run when ``sam/first_order_ratio`` leaves ``RATIO_BAND`` (see PreferenceTrainer)."""
        r = stats["first_order_ratio"]
        if self._ratio_warned or not math.isfinite(r) or not ratio_is_measurable(stats["loss_pre"],
                                                                                 stats["first_order"]):
            return
        if not RATIO_BAND[0] <= r <= RATIO_BAND[1]:
            self._ratio_warned = True
            why = ("the perturbation is below the working precision: logits-SAM acts as plain DPO; keep float32 "
                   "head weights (bf16=True autocast over float32 weights) or raise sam_rho" if r < RATIO_BAND[0]
                   else "sam_rho is so large that the loss is far from linear over the perturbation; lower sam_rho")
            logger.warning("sam/first_order_ratio = %.3g at step %d (expected ~1, band %s): %s.",
                           r, self.state.global_step, RATIO_BAND, why)
