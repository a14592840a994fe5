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

from .head import HeadOutput, SplitDelta, compute_dtype, dense_head_logps, split_compute, split_delta
from .head_chunked import DEFAULT_VOCAB_CHUNK_SIZE, chunked_head_grad, chunked_head_logps

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


def _squared_norm(x: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``sum x^2`` in float32 (float64 for float64 x), with no temporary above ``rows`` rows of x.

    Pairwise sums over slices of rows: ``torch.linalg.vector_norm`` on the CPU accumulates a long float32
    vector so loosely that ||g||^2 of a 49152 x 576 head comes out 0.35 % low (``square().sum()``: 5e-8).
    """
    flat = x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.stack([flat[i:i + rows].to(acc).square().sum() for i in range(0, flat.shape[0], rows)]).sum()


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
    g = [x.detach() for x in grads]
    acc = [torch.promote_types(x.dtype, torch.float32) for x in g]  # norms accumulate in float32 at least
    if variant == "plain":  # no (V, d) temporary: norms from row slices of the gradients
        local_sq = torch.stack([_squared_norm(x).float() for x in g]).sum()
        along = local_sq.clone()  # <g, eps> / factor = sum g^2
    else:
        w_abs = [w.detach().to(a).abs() for w, a in zip(weights, acc, strict=True)]
        scaled = [wa * x.to(a) for wa, x, a in zip(w_abs, g, acc, strict=True)]  # |W| g
        local_sq = torch.stack([_squared_norm(x).float() for x in scaled]).sum()
        # <g, eps> / factor: sum |W| g^2 (adaptive), sum W^2 g^2 (asam)
        along = local_sq.clone() if variant == "asam" else \
            torch.stack([(x * y.to(x.dtype)).sum().float() for x, y in zip(scaled, g, strict=True)]).sum()
    grad_norm = _reduce_squared_norm(local_sq, norm).sqrt()
    factor = rho / grad_norm.clamp_min(NORM_FLOOR)
    eps = []
    for i, x in enumerate(g):
        target = torch.float32 if weights[i].dtype == torch.float16 else weights[i].dtype
        if variant == "plain":
            e = x.mul_(factor) if inplace and x.dtype == target else x.to(target, copy=True).mul_(factor)
        else:
            e = (scaled[i].mul_(w_abs[i]) if variant == "asam" else scaled[i]).mul_(factor).to(target)
        eps.append(e)
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

    def head(hidden, weight, bias, labels, *, with_stats=True, weight_delta=None, index=None, donate_delta=False):
        return chunked_head_logps(
            hidden, weight, bias, labels, with_stats=with_stats, chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size, weight_delta=weight_delta, index=index, donate_delta=donate_delta,
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
    index: torch.Tensor | None = None,
) -> HeadOutput:
    """Per-token and per-sequence log-probs through the unperturbed head (see ``logits_sam``)."""
    head = head_fn(chunk_size, vocab_chunk_size)
    return head(hidden, lm_head.weight, getattr(lm_head, "bias", None), labels, with_stats=with_stats, index=index)


class BlockAscent:
    """``sam_ascent`` for one head weight, built from its gradient one vocabulary slice at a time.

    Called as ``w_sink(v0, v1, g)`` by ``chunked_head_grad`` with each (v, d) slice of ``g = dL/dW``
    (float32, or float64 for float64 weights); ``finish`` then gives the same ``Ascent`` as
    ``sam_perturbation(g, weight, rho)``, without a float32 (V, d) copy of g:
    - float64, or float32 with exact matmuls: the unnormalised numerator (g, |W| g or W^2 g) is written into
      one (V, d) buffer of the weight's dtype and scaled in place by ``rho / ||.||`` at the end: that buffer
      is eps.
    - split compute (``head.split_compute``: bf16/fp16, incl. float32 weights under autocast, and float32
      whose matmuls may round to TF32/bf16): each slice is stored as ``unit = numerator / max|numerator|``
      in the compute dtype with its float32 scale, a ``SplitDelta`` whose blocks are the slices;
      ``first_order`` is ``<g, eps>`` for the rounded unit actually used.
    """

    def __init__(self, weight: torch.Tensor, variant: str = "plain", cdt: torch.dtype | None = None,
                 block: int | None = None):
        self.weight, self.variant = weight.detach(), check_variant(variant)
        self.cdt = compute_dtype(weight) if cdt is None else cdt
        self.split = split_compute(self.cdt, weight.device)
        self.block = block or weight.shape[0]
        self.buffer = torch.empty(weight.shape, dtype=self.cdt if self.split else weight.dtype, device=weight.device)
        self.scales: list[torch.Tensor] = []
        self.sq = torch.zeros((), dtype=torch.float32, device=weight.device)  # ||.||^2 of this device's head
        self.along = torch.zeros_like(self.sq)  # <g, numerator> (times the slice scales in split compute)

    def __call__(self, v0: int, v1: int, g: torch.Tensor) -> None:
        """Take slice [v0, v1) of g (v, d); it is this call's to overwrite."""
        w_abs = None if self.variant == "plain" else self.weight[v0:v1].to(g.dtype).abs()
        scaled = g if w_abs is None else w_abs * g  # the norm's operand: g, or |W| g
        sq = _squared_norm(scaled).float()
        self.sq += sq
        numer = scaled.mul_(w_abs) if self.variant == "asam" else scaled  # eps's direction: g, |W| g, W^2 g
        if not self.split:
            self.along += sq if numer is g else (numer * g).sum().float()
            self.buffer[v0:v1] = numer
            return
        if v0 != len(self.scales) * self.block or v1 - v0 > self.block:
            raise ValueError(f"vocabulary slice [{v0}, {v1}) does not match the ascent's blocks of {self.block}")
        s = torch.linalg.vector_norm(numer, ord=float("inf")).float().clamp_min(torch.finfo(torch.float32).tiny)
        unit = self.buffer[v0:v1]
        unit.copy_(numer.div_(s))  # rounded to the compute dtype here
        # <g, s * unit>: with the rounded unit, so the first-order prediction matches the eps actually used
        if w_abs is None:  # numer was g itself, now g / s
            self.along += s * s * (unit.to(numer.dtype) * numer).sum().float()
        else:
            self.along += s * (unit.to(g.dtype) * g).sum().float()
        self.scales.append(s)

    def finish(self, rho: float, norm: str = "local") -> Ascent:
        grad_norm = _reduce_squared_norm(self.sq, norm).sqrt()
        factor = rho / grad_norm.clamp_min(NORM_FLOOR)
        if self.split:
            eps = SplitDelta(self.buffer, torch.stack(self.scales) * factor, self.block)
        else:
            eps = self.buffer.mul_(factor.to(self.buffer.dtype))
        return Ascent(eps, grad_norm, self.along * factor)


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
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The preference loss at the logits-SAM-perturbed head, in one backbone pass.

    1. clean pass, outside the training graph: ``g_W = dL/dW`` along the logit path only,
       ``Z0 = H.detach() W.detach()^T``; with tied embeddings this is *not* autograd of L w.r.t. the
       shared weight, which would also flow through the input embedding.
    2. ``eps = rho g_W / ||g_W||`` (see ``sam_perturbation``), a constant.
    3. training pass: ``Z = H (W + eps)^T + b``, never writing into W, so a tied input embedding sees
       the unperturbed weight; the returned loss backpropagates into the hidden states (hence the
       backbone) and into W. The bias is never perturbed.

    Dense head: step 1 is autograd of the dense clean pass (the reference). Chunked head: ``chunked_head_grad``
    hands g_W over slice by slice to ``BlockAscent``, so the extra head memory is one (V, d) buffer in the
    compute dtype (eps, or its unit direction in split compute) plus one slice's working set; when that buffer
    has the weight's dtype (float32 weights without autocast, bf16 weights) the perturbed backward writes the
    weight's gradient into it, so nothing (V, d) is added at all. The returned loss can then be
    backpropagated once only.

    Args:
        hidden (R, T, d): final hidden states, chosen rows first then rejected rows.
        lm_head: the output module (``weight (V, d)``, optional ``bias (V,)``), possibly tied.
        labels (R, T): the token each position predicts (already shifted), -100 where ignored.
        loss_fn: maps a ``HeadOutput`` (``logps (R,)``, ``lengths (R,)``, ...) to a scalar loss.
        rho: SAM radius; 0 gives exactly the plain loss and gradients.
        chunk_size, vocab_chunk_size: None for the dense head, else the chunked head's sizes.
        norm: ``"local"`` (per device and micro-batch, the authors' choice) or ``"global"``.
        variant: ``plain``, ``adaptive`` (the authors' |W|-scaled eps) or ``asam`` (see ``sam_ascent``).
        index (n,) or None: ``head.completion_index(labels)`` computed beforehand: no host sync anywhere.
    Returns:
        loss (0-dim tensor) at the perturbed head, and stats: ``loss_pre``, ``loss_post``,
        ``grad_norm``, ``first_order`` (``<g, eps>``, the change ``loss_post - loss_pre`` should show
        to first order; see ``first_order_ratio``) as detached 0-dim tensors (read them once per logging
        step, not per micro-batch), and ``clean`` (the detached clean-pass ``HeadOutput`` with statistics).

    Precision: in a half compute dtype (bf16/fp16 weights, or float32 weights under autocast), and for
    float32 weights whose matmuls may run in reduced precision (TF32: ``allow_tf32``, TrainingArguments
    ``tf32``, ``set_float32_matmul_precision("high"/"medium")``; see ``head.reduced_fp32_matmul``), the
    perturbed pass forms ``H W^T`` and ``H eps^T`` as separate products and sums them in float32
    (``head.split_delta``), so eps is not rounded away with W's low mantissa bits; the clean product is
    the same bits in both passes, so ``loss_post - loss_pre`` measures eps alone.
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    head = head_fn(chunk_size, vocab_chunk_size)
    cdt = compute_dtype(weight)
    if chunk_size is None:
        with torch.enable_grad():
            w0 = weight.detach().requires_grad_(True)
            b0 = None if bias is None else bias.detach()
            clean = dense_head_logps(hidden.detach(), w0, b0, labels, with_stats=True, index=index)
            loss_pre = loss_fn(clean)
            (grad_w,) = torch.autograd.grad(loss_pre, w0)
        eps, grad_norm, first_order = sam_perturbation(grad_w, weight, rho, norm=norm, variant=variant, inplace=True)
        del grad_w
        delta = split_delta(eps, cdt)
        del eps
    else:
        ascent = BlockAscent(weight, variant, cdt, vocab_chunk_size or weight.shape[0])
        clean, loss_pre = chunked_head_grad(hidden, weight, bias, labels, loss_fn, ascent, chunk_size=chunk_size,
                                            vocab_chunk_size=vocab_chunk_size, index=index)
        delta, grad_norm, first_order = ascent.finish(rho, norm)
    donate = {} if chunk_size is None else {"donate_delta": True}  # eps's buffer becomes the weight's gradient
    perturbed = head(hidden, weight, bias, labels, with_stats=False, weight_delta=delta, index=index, **donate)
    loss = loss_fn(perturbed)
    stats = {
        "loss_pre": loss_pre.detach(),
        "loss_post": loss.detach(),
        "grad_norm": grad_norm.detach(),
        "first_order": first_order.detach(),
        "clean": clean.detach(),
    }
    return loss, stats


def first_order_ratio(loss_pre, loss_post, first_order):
    """``r = (loss_post - loss_pre) / <g, eps>``: 1 + O(rho) when the perturbation really acts.

    Near 0 means eps was rounded away (the perturbation is below the working precision); far above
    1 means rho is so large that the loss is no longer linear over the step. NaN when the predicted
    change is 0 (rho = 0 or a zero gradient). Floats in, a float out; tensors in, a 0-dim float32 tensor
    out (no host sync).
    """
    if torch.is_tensor(first_order):
        fo = first_order.float()
        change = torch.as_tensor(loss_post, device=fo.device).float() - torch.as_tensor(loss_pre, device=fo.device)
        return torch.where((fo == 0) | ~torch.isfinite(fo), torch.full_like(fo, float("nan")), change / fo)
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
