"""Sharpness-aware perturbations: logits-SAM on the LM head, and the full-SAM baseline.

SAM (Foret et al., ICLR 2021, Eq. 2) evaluates the gradient at ``w + eps`` with
``eps = rho * g / ||g||``. logits-SAM (Luo et al., ICLR 2026, Alg. 1) restricts the perturbation to
the LM head ``W`` and takes ``g`` along the logit path only: ``g = dL/dZ^T H`` with ``Z = H W^T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist

from .head import HeadOutput, dense_head_logps
from .head_chunked import DEFAULT_VOCAB_CHUNK_SIZE, chunked_head_logps

NORMS = ("local", "global")
NORM_FLOOR = 1e-12


def _reduce_squared_norm(sq: torch.Tensor, norm: str) -> torch.Tensor:
    """``local``: this device's squared norm. ``global``: the mean over ranks (one scalar all-reduce)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "global" and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        sq = sq / dist.get_world_size()
    return sq


VARIANTS = ("plain", "adaptive", "asam")


class Ascent(NamedTuple):
    """The SAM ascent step for one weight (or, from ``sam_ascent``, one list of weights).

    eps (V, d): the perturbation (a constant); ``weight.dtype``, except float32 for a float16 weight
        (eps entries ~1e-7 underflow float16).
    grad_norm: 0-dim float32, the norm that scaled it.
    first_order: 0-dim float32, ``<g, eps>`` on this device: the first-order loss change the
        perturbation should cause (``rho * ||g||`` for plain SAM with ``norm="local"``).
    """

    eps: torch.Tensor | list[torch.Tensor]
    grad_norm: torch.Tensor
    first_order: torch.Tensor


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"SAM variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def sam_ascent(grads: list[torch.Tensor], weights: list[torch.Tensor], rho: float, *, norm: str = "local",
               variant: str = "plain", inplace: bool = False) -> Ascent:
    """The ascent step over a list of weights, one norm for all of them (logits-SAM: the head; full SAM: all).

    - ``plain`` (Foret et al. 2021, Eq. 2): eps = rho * g / ||g||
    - ``adaptive`` (the logits-SAM authors' flag): eps = rho * (|W| g) / || |W| g ||
    - ``asam`` (Kwon et al., ICML 2021, Eq. 8): eps = rho * (W^2 g) / || |W| g ||

    Norms are over all the tensors together, accumulated in float32 and clamped at 1e-12 before the
    square root is used as a divisor. ``norm="global"`` averages the squared norm over ranks when
    torch.distributed is initialised (one scalar all-reduce).

    Args:
        grads: gradients ``g`` (logit path only for logits-SAM), one per weight.
        weights: the unperturbed weights (read by adaptive/asam only).
        inplace: plain SAM may scale float32 gradients in place (saves one buffer each).
    Returns:
        ``Ascent(eps list, grad_norm, first_order)``.
    """
    check_variant(variant)
    g = [x.detach().float() for x in grads]
    w_abs = [w.detach().float().abs() for w in weights] if variant != "plain" else None
    scaled = g if variant == "plain" else [a * x for a, x in zip(w_abs, g, strict=True)]
    local_sq = torch.stack([x.square().sum() for x in scaled]).sum()
    # <g, eps> / factor: sum g^2 (plain), sum |W| g^2 (adaptive), sum W^2 g^2 (asam)
    along = torch.stack([(x * y).sum() for x, y in zip(scaled, g, strict=True)]).sum() if variant == "adaptive" \
        else local_sq.clone()
    grad_norm = _reduce_squared_norm(local_sq, norm).sqrt()
    factor = rho / grad_norm.clamp_min(NORM_FLOOR)
    eps = []
    for i, (x, orig) in enumerate(zip(scaled, grads, strict=True)):
        fresh = variant != "plain" or inplace or x.data_ptr() != orig.data_ptr()  # may we write into x?
        if variant == "asam":
            x = x.mul_(w_abs[i])
        x = x.mul_(factor) if fresh else x * factor
        eps.append(x.to(torch.float32 if weights[i].dtype == torch.float16 else weights[i].dtype))
    return Ascent(eps, grad_norm, along * factor)


def sam_perturbation(grad: torch.Tensor, weight: torch.Tensor, rho: float, *, norm: str = "local",
                     variant: str = "plain", inplace: bool = False) -> Ascent:
    """``sam_ascent`` for one weight: ``Ascent(eps (V, d), grad_norm, first_order)``."""
    eps, grad_norm, first_order = sam_ascent([grad], [weight], rho, norm=norm, variant=variant, inplace=inplace)
    return Ascent(eps[0], grad_norm, first_order)


def head_fn(chunk_size: int | None = None, vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE
            ) -> Callable[..., HeadOutput]:
    """The dense head (``chunk_size=None``) or the chunked one, with one call signature."""
    if chunk_size is None:
        return dense_head_logps

    def head(hidden, weight, bias, labels, *, with_stats=True, weight_delta=None):
        return chunked_head_logps(
            hidden, weight, bias, labels, with_stats=with_stats, chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size, weight_delta=weight_delta,
        )

    return head


def sequence_logps(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE,
    with_stats: bool = True,
) -> HeadOutput:
    """Per-token and per-sequence log-probs through the unperturbed head (see ``logits_sam``)."""
    head = head_fn(chunk_size, vocab_chunk_size)
    return head(hidden, lm_head.weight, getattr(lm_head, "bias", None), labels, with_stats=with_stats)


def logits_sam(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    loss_fn: Callable[[HeadOutput], torch.Tensor],
    rho: float,
    *,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE,
    norm: str = "local",
    variant: str = "plain",
) -> tuple[torch.Tensor, dict]:
    """The preference loss at the logits-SAM-perturbed head, in one backbone pass.

    1. clean pass, outside the training graph: ``g_W = dL/dW`` along the logit path only,
       ``Z0 = H.detach() W.detach()^T``; with tied embeddings this is *not* autograd of L w.r.t. the
       shared weight, which would also flow through the input embedding.
    2. ``eps = rho g_W / ||g_W||`` (see ``sam_perturbation``), a constant.
    3. training pass: ``Z = H (W + eps)^T + b``, never writing into W, so a tied input embedding sees
       the unperturbed weight; the returned loss backpropagates into the hidden states (hence the
       backbone) and into W. The bias is never perturbed.

    Args:
        hidden (R, T, d): final hidden states, chosen rows first then rejected rows.
        lm_head: the output module (``weight (V, d)``, optional ``bias (V,)``), possibly tied.
        labels (R, T): the token each position predicts (already shifted), -100 where ignored.
        loss_fn: maps a ``HeadOutput`` (``logps (R,)``, ``lengths (R,)``, ...) to a scalar loss.
        rho: SAM radius; 0 gives exactly the plain loss and gradients.
        chunk_size, vocab_chunk_size: None for the dense head, else the chunked head's sizes.
        norm: ``"local"`` (per device and micro-batch, the authors' choice) or ``"global"``.
        variant: ``plain``, ``adaptive`` (the authors' |W|-scaled eps) or ``asam`` (see ``sam_ascent``).
    Returns:
        loss (0-dim tensor) at the perturbed head, and stats: ``loss_pre``, ``loss_post``,
        ``grad_norm``, ``first_order`` (``<g, eps>``, the change ``loss_post - loss_pre`` should show
        to first order; see ``first_order_ratio``) as floats, and ``clean`` (the detached clean-pass
        ``HeadOutput`` with statistics).

    Precision: in a half compute dtype (bf16/fp16 weights, or float32 weights under autocast) the
    perturbed pass forms ``H W^T`` and ``H eps^T`` as separate products and sums them in float32
    (``head.split_delta``), so eps is not rounded away; the clean product is the same bits in both
    passes, so ``loss_post - loss_pre`` measures eps alone.
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    head = head_fn(chunk_size, vocab_chunk_size)
    with torch.enable_grad():
        w0 = weight.detach().requires_grad_(True)
        b0 = None if bias is None else bias.detach()
        clean = head(hidden.detach(), w0, b0, labels, with_stats=True)
        loss_pre = loss_fn(clean)
        (grad_w,) = torch.autograd.grad(loss_pre, w0)
    ascent = sam_perturbation(grad_w, weight, rho, norm=norm, variant=variant, inplace=True)
    del grad_w
    perturbed = head(hidden, weight, bias, labels, with_stats=False, weight_delta=ascent.eps)
    loss = loss_fn(perturbed)
    stats = {
        "loss_pre": float(loss_pre.detach()),
        "loss_post": float(loss.detach()),
        "grad_norm": float(ascent.grad_norm),
        "first_order": float(ascent.first_order),
        "clean": clean.detach(),
    }
    return loss, stats


def first_order_ratio(loss_pre: float, loss_post: float, first_order: float) -> float:
    """``r = (loss_post - loss_pre) / <g, eps>``: 1 + O(rho) when the perturbation really acts.

    Near 0 means eps was rounded away (the perturbation is below the working precision); far above
    1 means rho is so large that the loss is no longer linear over the step. NaN when the predicted
    change is 0 (rho = 0 or a zero gradient).
    """
    if first_order == 0.0 or not math.isfinite(first_order):
        return float("nan")
    return (loss_post - loss_pre) / first_order


class FullSAM:
    """The full-SAM baseline: perturb every parameter, recompute, restore exactly (two passes).

    Usage, between the caller's own forward/backward passes (the shape of davda54/sam)::

        loss(model).backward(); sam.first_step(); model.zero_grad()
        loss(model).backward(); sam.second_step(); optimizer.step()

    The perturbation is ``sam_ascent`` over all parameters with a gradient, the same formula (and the
    same ``variant`` meaning) as logits-SAM's. ``second_step`` copies the saved weights back instead of
    subtracting eps, so the restore is exact.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], rho: float, *, norm: str = "local",
                 variant: str = "plain"):
        self.params = [p for p in params if p.requires_grad]
        self.rho, self.norm, self.variant = rho, norm, check_variant(variant)
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    @torch.no_grad()
    def first_step(self) -> float:
        """Move to ``w + eps`` using the current ``.grad``; returns the gradient norm used."""
        if self._saved:
            raise RuntimeError("first_step called twice without second_step")
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            raise RuntimeError("FullSAM.first_step: no parameter has a gradient; call backward() first")
        ascent = sam_ascent([p.grad for p in with_grad], with_grad, self.rho, norm=self.norm, variant=self.variant)
        for p, eps in zip(with_grad, ascent.eps, strict=True):
            self._saved.append((p, p.detach().clone()))
            p.add_(eps.to(p.dtype))
        return float(ascent.grad_norm)

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore the saved weights exactly (the gradients in ``.grad`` stay: they are the SAM ones)."""
        for p, saved in self._saved:
            p.copy_(saved)
        self._saved.clear()
