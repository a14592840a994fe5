"""One preference micro-batch's head step, shared by ``PreferenceTrainer`` and ``LogitsSAMDPOTrainer``.

    backbone once (inside the outermost wrapper's forward) -> hidden (2B, T, d)
    -> head pass: plain (``sequence_logps``) or logits-SAM (``logits_sam``), dense or chunked
    -> ``preference_loss`` on the per-row log-probs (LD-DPO's sums with ``ld_alpha``), WPO-weighted
    -> + the MoE routers' load-balancing loss

Nothing here reads a value back to the host: the completion positions come precomputed from the collator
(``completion_index``), statistics stay 0-dim device tensors, and ``DeferredMetrics`` reduces them over
ranks once per logging step. A new host sync in this path fails ``tests/train/test_fake_step.py``, which runs
the step under ``FakeTensorMode``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..core import HeadOutput, first_order_ratio, logits_sam, sequence_logps
from ..core.head import IGNORE_INDEX, completion_index, shift_labels
from ..core.head_chunked import DEFAULT_VOCAB_CHUNK_SIZE
from ..core.losses import preference_loss
from ..core.weighting import ld_logps, wpo_weights
from ._inside import head_inside_forward

COMPLETION_INDEX = "completion_index"  # the collator's (n,) flat positions of the shifted labels


def batch_completion_index(labels: torch.Tensor) -> torch.Tensor:
    """``completion_index`` of ``shift_labels(labels)``: run it in the collator, where ``labels`` (2B, T) are on
    the host, and pass the result to the step as ``index``."""
    return completion_index(shift_labels(labels))


@dataclass
class StepResult:
    """What one head step leaves for the trainer's metrics (all detached device tensors).

    loss: the loss to backpropagate (0-dim, attached). out: the clean pass's ``HeadOutput`` (statistics included).
    rewards: the clean pass's (chosen (B,), rejected (B,)) rewards from the first listed loss.
    logps: (2B,) the per-row log-probs the loss read (LD-DPO's sums when ``ld_alpha`` is set).
    sam: ``loss_pre``, ``loss_post``, ``grad_norm``, ``first_order``, ``first_order_ratio`` (empty without SAM).
    extra: ``aux_loss`` (MoE), ``wpo/weight`` (WPO's mean weight) when they apply.
    """

    loss: torch.Tensor
    out: HeadOutput
    rewards: tuple[torch.Tensor, torch.Tensor]
    logps: torch.Tensor
    sam: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class HeadStep:
    """The settings of the head step; ``__call__`` runs one micro-batch.

    Args:
        loss_kwargs: ``preference_loss`` keywords: ``loss_type`` (name or list), ``beta``, the losses' own keys.
        rho, norm, variant: logits-SAM (``rho = 0``: the plain path, no SAM cost at all).
        chunk_size, vocab_chunk_size: the LM head's chunking (``chunk_size=None``: dense).
        ld_alpha: LD-DPO (Liu et al., 2024): log-probs of the tokens past the shorter completion weighted by alpha.
        use_weighting: WPO (Zhou et al., 2024): per-pair weights from the clean pass, reused by the perturbed one.
        aux_coef: the MoE routers' load-balancing loss weight (0: not requested).
    """

    loss_kwargs: dict
    rho: float = 0.0
    norm: str = "local"
    variant: str = "plain"
    chunk_size: int | None = None
    vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE
    ld_alpha: float | None = None
    use_weighting: bool = False
    aux_coef: float = 0.0

    @property
    def chunks(self) -> dict:
        return {"chunk_size": self.chunk_size, "vocab_chunk_size": self.vocab_chunk_size}

    def logps(self, out: HeadOutput, labels: torch.Tensor) -> torch.Tensor:
        """(2B,) the per-row log-probs the loss reads: plain sums, or LD-DPO's with ``ld_alpha``."""
        return out.logps if self.ld_alpha is None else ld_logps(out.token_logps, labels, self.ld_alpha)

    def loss_fn(self, ref_chosen, ref_rejected, labels, kept: dict):
        """The loss of one head pass. The clean and the perturbed pass both call it: LD-DPO's sums and WPO's
        weights enter both; the weights and rewards kept are those of the first pass (the clean one)."""
        def loss_fn(out: HeadOutput) -> torch.Tensor:
            logps = self.logps(out, labels)
            n = logps.shape[0] // 2
            losses, chosen_rewards, rejected_rewards = preference_loss(
                policy_chosen_logps=logps[:n], policy_rejected_logps=logps[n:], ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected, chosen_lengths=out.chosen_lengths,
                rejected_lengths=out.rejected_lengths, **self.loss_kwargs)
            if self.use_weighting:
                if "wpo" not in kept:
                    kept["wpo"] = wpo_weights(out)
                losses = losses * kept["wpo"].to(losses.dtype)
            kept.setdefault("rewards", (chosen_rewards.detach(), rejected_rewards.detach()))
            return losses.mean()  # TRL: sum_k w_k mean(loss_k) == mean(sum_k w_k loss_k)

        return loss_fn

    def __call__(self, model, input_ids, attention_mask, labels, index, ref_chosen, ref_rejected, *,
                 sam: bool, loss_fn=None, kept: dict | None = None) -> StepResult:
        """One micro-batch: ``labels`` (2B, T) already shifted, ``index`` their ``completion_index`` (or None: found
        here, with a host sync). ``sam``: apply logits-SAM (training with ``rho > 0``). ``loss_fn``, ``kept``: a
        loss closure built by the caller from ``self.loss_fn`` (default: built here) and its dict."""
        sam = sam and self.rho > 0
        if loss_fn is None:
            kept = {}
            loss_fn = self.loss_fn(ref_chosen, ref_rejected, labels, kept)
        side: dict = {}

        def head_pass(hidden, head):  # hidden (2B, T, d); runs as the head's forward, so a sharded head is gathered
            if sam:
                loss, stats = logits_sam(hidden, head, labels, loss_fn, self.rho, norm=self.norm,
                                         variant=self.variant, index=index, **self.chunks)
                side["out"], side["sam"] = stats.pop("clean"), stats
                return loss
            out = sequence_logps(hidden, head, labels, index=index, **self.chunks)
            side["out"] = out.detach()
            return loss_fn(out)

        aux = {} if self.aux_coef else None
        loss = head_inside_forward(model, input_ids, attention_mask, head_pass, aux=aux)
        extra = {}
        if aux:  # MoE: the routers' load-balancing loss, added once (it does not depend on the head)
            loss = loss + self.aux_coef * aux["aux_loss"].to(loss.dtype)
            extra["aux_loss"] = aux["aux_loss"].detach().float()
        if "wpo" in kept:
            extra["wpo/weight"] = kept["wpo"].detach().float().mean()
        stats = side.get("sam", {})
        if stats:
            stats["first_order_ratio"] = first_order_ratio(stats["loss_pre"], stats["loss_post"], stats["first_order"])
        out = side["out"]
        return StepResult(loss, out, kept["rewards"], self.logps(out, labels).detach(), stats, extra)


class DeferredMetrics:
    """Per-micro-batch metrics kept as device tensors, reduced over ranks once per logging step (one gather).

    ``add(mode, means=..., ratios=..., sums=...)`` per micro-batch, all 0-dim tensors:
    - means: the mean over ranks (NaN on any rank makes that micro-batch's value NaN, as before),
    - ratios: ``(numerator, denominator)`` summed over ranks, then divided (0 when the denominator is 0; TRL's
      per-token means),
    - sums: summed over ranks (token counts).
    ``flush(mode, gather)`` returns ``{key: [one float per micro-batch]}``; ``gather`` is accelerate's (every rank
    must flush at the same points: ``Trainer.log`` runs on every rank).
    """

    def __init__(self):
        self._pending: dict[str, list[tuple[tuple, torch.Tensor]]] = defaultdict(list)

    def add(self, mode: str, *, means: dict | None = None, ratios: dict | None = None, sums: dict | None = None):
        means, ratios, sums = means or {}, ratios or {}, sums or {}
        layout = (tuple(means), tuple(ratios), tuple(sums))
        values = [*means.values(), *(x for pair in ratios.values() for x in pair), *sums.values()]
        if values:
            self._pending[mode].append((layout, torch.stack([torch.as_tensor(v).detach().float().reshape(())
                                                             .to(values[0].device) for v in values])))

    def flush(self, mode: str, gather, world_size: int) -> dict[str, list[float]]:
        pending, self._pending[mode] = self._pending[mode], []
        result: dict[str, list[float]] = defaultdict(list)
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for layout, values in pending:
            groups[layout].append(values)
        for (mean_keys, ratio_keys, sum_keys), rows in groups.items():
            local = torch.stack(rows)  # (K, M) this rank's micro-batches
            every = gather(local[None]).reshape(world_size, *local.shape) if world_size > 1 else local[None]
            m = len(mean_keys)
            reduced = {k: every[:, :, j].mean(0) for j, k in enumerate(mean_keys)}
            for j, k in enumerate(ratio_keys):
                num, den = every[:, :, m + 2 * j].sum(0), every[:, :, m + 2 * j + 1].sum(0)
                reduced[k] = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
            base = m + 2 * len(ratio_keys)
            for j, k in enumerate(sum_keys):
                reduced[k] = every[:, :, base + j].sum(0)
            keys = list(reduced)
            table = torch.stack([reduced[k] for k in keys]).tolist()  # the one host sync of the logging step
            for k, column in zip(keys, table, strict=True):
                result[k].extend(column)
        return dict(result)


def ratio_out_of_band(flushed: dict[str, list[float]], ratio_is_measurable, band: tuple[float, float]
                      ) -> tuple[float, str] | None:
    """The first logged ``sam/first_order_ratio`` outside ``band`` that is measurable, with why: ``(r, "low")`` (eps is
    below the working precision: logits-SAM acts as plain DPO) or ``(r, "high")`` (rho is far too large); else None."""
    if "sam/first_order_ratio" not in flushed:  # plain steps, or full SAM (no first-order prediction)
        return None
    triples = zip(flushed.get("sam/first_order_ratio", []), flushed.get("sam/loss_pre", []),
                  flushed.get("sam/first_order", []), strict=True)
    for r, loss_pre, first_order in triples:
        if math.isfinite(r) and ratio_is_measurable(loss_pre, first_order) and not band[0] <= r <= band[1]:
            return r, "low" if r < band[0] else "high"
    return None


__all__ = ["COMPLETION_INDEX", "DeferredMetrics", "HeadStep", "StepResult", "batch_completion_index",
           "ratio_out_of_band", "IGNORE_INDEX"]
