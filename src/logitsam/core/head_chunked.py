"""Chunked LM-head log-probs that never hold the (tokens x vocab) logits.

Equals ``head.dense_head_logps`` (same signature, same output). Tokens are processed in chunks of
``chunk_size`` and, within a chunk, the vocabulary in slices of ``vocab_chunk_size`` with an online
log-sum-exp (running max ``m``, rescaled sums). The custom autograd function keeps only the
per-token log-sum-exp and recomputes each logits block in backward, so peak extra memory is
O(chunk_size x vocab_chunk_size) instead of O(tokens x V).

Per token: lse = m + log s with a running max m and s = sum_v exp(z_v - m) (see ``_forward``).

Precision: the blocks are computed in the compute dtype (``head.compute_dtype``: the caller's autocast
dtype for float32 weights under autocast, else the weight's), in forward *and* backward, with
autocast off inside and explicit casts. A perturbation in a half compute dtype, or in float32 when
float32 matmuls may run in reduced precision (TF32 / bf16 inputs: ``head.reduced_fp32_matmul``), is kept
apart from the weight (``head.SplitDelta``, ``head.split_compute``): each block is
``h W_v^T + b_v + s (h U_v^T)``, one extra matmul per block in forward and one in backward (dL/dH).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .head import (
    HeadOutput,
    SplitDelta,
    acc_dtype,
    assemble,
    check_targets,
    compute_dtype,
    split_delta,
    valid_tokens,
)

DEFAULT_CHUNK_SIZE = 512
DEFAULT_VOCAB_CHUNK_SIZE = 8192


def _slices(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _block_weight(weight, delta, v0, v1, cdt):
    """The block's weight in the compute dtype, cast once per call; a fused (float64, exact float32) delta is added
    here."""
    w = weight[v0:v1] if delta is None or isinstance(delta, SplitDelta) else weight[v0:v1] + delta[v0:v1]
    return w.to(cdt)  # (v, d)


def _block_logits(h, w_block, delta, bias, v0, v1):
    """Logits block (c, v) in the accumulation dtype; ``h`` and ``w_block`` are in the compute dtype."""
    b = None if bias is None else bias[v0:v1].to(w_block.dtype)
    z = F.linear(h, w_block, b).to(acc_dtype(w_block.dtype))
    if isinstance(delta, SplitDelta):  # eps's own product, summed in float32
        z += F.linear(h, delta.unit[v0:v1]).float() * delta.block_scale(v0, v1)
    return z


def _rows_of_delta(delta, rows, acc):
    """``delta[rows]`` in the accumulation dtype (for the one-hot part of dL/dH)."""
    if isinstance(delta, SplitDelta):
        scale = delta.scale.repeat_interleave(delta.block)[: delta.unit.shape[0]]  # (V,) per-row scale
        return delta.unit[rows].to(acc) * scale[rows, None]
    return delta[rows].to(acc)


def _label_hits(targets, v0, v1):
    """Mask of targets inside vocab slice [v0, v1) and their local column (clamped for gather)."""
    inside = (targets >= v0) & (targets < v1)
    return inside, (targets - v0).clamp(0, v1 - v0 - 1)


@torch.no_grad()
def _forward(h, weight, delta, bias, targets, chunk_size, vocab_chunk_size, with_stats, cdt):
    """Returns lse (n,), label logit (n,) and stats (n, 7) or None, in the accumulation dtype.

    Vocabulary slices outside, token chunks inside: each weight slice is cast to the compute dtype once per
    call. Online log-sum-exp per token with a running max m and s = sum_v exp(z_v - m), kept for all n tokens.
    Each block is shifted in place and exponentiated once; the log-probs are computed the same way with or
    without statistics, so the two modes agree bit for bit. Statistics ride along, rescaled like s:
        t = sum_v exp(z_v - m) z_v,  q = sum_v exp(2 (z_v - m)),
        entropy = lse - t / s,  sum_v p_v^2 = q / s^2,  log p(y*) = -log s,  log sum_v p_v^2 = log q - 2 log s.
    """
    n, V, acc = h.shape[0], weight.shape[0], acc_dtype(cdt)
    hc = h.to(cdt)  # (n, d)
    m = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
    s, t, q, zsum, y_logit = (torch.zeros_like(m) for _ in range(5))
    amax = torch.zeros_like(targets)
    for v0, v1 in _slices(V, vocab_chunk_size):
        w_block = _block_weight(weight, delta, v0, v1, cdt)
        for i0, i1 in _slices(n, chunk_size):
            c = slice(i0, i1)
            z = _block_logits(hc[c], w_block, delta, bias, v0, v1)  # (c, v)
            inside, col = _label_hits(targets[c], v0, v1)
            y_logit[c] = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), y_logit[c])
            z_max, z_arg = z.max(-1)
            m_old = m[c].clone()
            if with_stats:
                zsum[c] += z.sum(-1)
                amax[c] = torch.where(z_max > m_old, z_arg + v0, amax[c])
            m_new = torch.maximum(m_old, z_max)
            scale = (m_old - m_new).exp()
            z.sub_(m_new[:, None])  # z' = z - m_new <= 0
            if with_stats:
                e = z.exp()
                e_sum = e.sum(-1)
                t[c] = t[c] * scale + torch.einsum("cv,cv->c", e, z) + m_new * e_sum  # sum e z = sum e z' + m sum e
                q[c] = q[c] * scale * scale + torch.einsum("cv,cv->c", e, e)
            else:
                e_sum = z.exp_().sum(-1)
            s[c] = s[c] * scale + e_sum
            m[c] = m_new
    log_s = s.log()
    lse = m + log_s
    if not with_stats:
        return lse, y_logit, None
    top1 = (amax == targets).to(acc)
    stats = torch.stack([lse - t / s, 1.0 / s, top1, q / (s * s), zsum, -log_s, q.log() - 2 * log_s], dim=1)
    return lse, y_logit, stats


def _accumulate(out, a, b, alpha=1.0):
    """out += alpha * a @ b, in place when dtypes match (fp32), else through a temporary."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_((a @ b).to(out.dtype), alpha=alpha)


@torch.no_grad()
def head_backward(h, weight, delta, bias, targets, lse, grad_lp, chunk_size, vocab_chunk_size, need, cdt=None,
                  w_sink=None, grad_w_out=None):
    """Gradients of ``sum_i grad_lp[i] log p(targets[i])`` w.r.t. (h, weight, bias), recomputing logits.

    The head weight is ``weight + delta`` (delta None: 0, a tensor, or a ``SplitDelta``); its gradient
    is also weight's. Blocks run in ``cdt`` (default: ``compute_dtype(weight)``).
    d log p(y_i) / d z_i = onehot(y_i) - p_i, so with g = grad_lp and P = exp(Z - lse):
        grad_h = g * W[y] - g * (P W),   grad_W = onehot^T (g h) - P^T (g h),   grad_b = onehot^T g - P^T g
    The per-row factor g is applied to the small (n, d) operands, never to a (c, v) block, so a block costs
    one matmul, one in-place exp and two matmuls. Vocabulary slices outside, token chunks inside: each weight
    slice is cast once, and each (v, d) slice of grad_W is accumulated over all tokens in float32 and written
    once, in the weight's dtype (no float32 (V, d) accumulator), or handed to ``w_sink(v0, v1, block)``
    instead (then grad_W is not stored at all; the logits-SAM clean pass builds eps from the blocks).
    ``grad_w_out``: a (V, d) buffer of the weight's dtype to write grad_W into; it may be the fused ``delta``
    itself (logits-SAM donates eps: slice v of delta is read before slice v of grad_W is written).
    grad_h and grad_b accumulate in float32 (float64 for float64 inputs). Returns (grad_h, grad_w, grad_b)
    with None for gradients not needed.
    """
    cdt = compute_dtype(weight) if cdt is None else cdt
    n, V, acc = h.shape[0], weight.shape[0], acc_dtype(cdt)
    split = isinstance(delta, SplitDelta)
    need_h, need_w, need_b = need[0], need[1] or w_sink is not None, need[2] and bias is not None
    hc, g = h.to(cdt), grad_lp.to(acc)  # (n, d), (n,)
    gh = (h.to(acc) * g[:, None]).to(cdt)  # (n, d)
    gh_acc = gh.to(acc) if need_w else None  # the onehot part's rows, cast once for all slices
    grad_h = grad_w = grad_b = None
    if need_h:  # the onehot part: every target row once
        w_y = weight[targets].to(cdt).to(acc)
        if delta is not None:
            w_y += _rows_of_delta(delta, targets, acc)
        grad_h = g[:, None] * w_y
    if need_w and w_sink is None:
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if grad_w_out is None \
            else grad_w_out
    if need_b:
        grad_b = torch.zeros(V, dtype=acc, device=h.device).index_add_(0, targets, g)
    for v0, v1 in _slices(V, vocab_chunk_size):
        w_block = _block_weight(weight, delta, v0, v1, cdt)
        if need_w:  # this slice's onehot part: the target rows that fall inside it
            inside, col = _label_hits(targets, v0, v1)
            gw = torch.zeros((v1 - v0, weight.shape[1]), dtype=acc, device=h.device)
            gw.index_add_(0, col, gh_acc * inside[:, None])
        for i0, i1 in _slices(n, chunk_size):
            c = slice(i0, i1)
            p = _block_logits(hc[c], w_block, delta, bias, v0, v1).sub_(lse[c, None]).exp_()  # (c, v) probs
            p_mm = p.to(cdt)
            if need_h:
                pw = (p_mm @ w_block).to(acc)  # (c, d)
                if split:  # eps's own product, added in float32
                    pw += (p_mm @ delta.unit[v0:v1]).float() * delta.block_scale(v0, v1)
                grad_h[c].addcmul_(pw, g[c, None], value=-1.0)
            if need_w:
                _accumulate(gw, p_mm.T, gh[c], alpha=-1.0)
            if need_b:
                grad_b[v0:v1].addmv_(p.T, g[c], alpha=-1.0)
        if w_sink is not None:
            w_sink(v0, v1, gw)
        elif need_w:
            grad_w[v0:v1] = gw
    cast = lambda x, like: None if x is None else x.to(like.dtype)  # noqa: E731
    return cast(grad_h, h), grad_w, cast(grad_b, bias)


def _take_delta(ctx):
    """The perturbation a head's backward needs, handed over once: the (V, d) eps (or its unit direction) is then
    freed as the head's backward ends, the first thing backward does, instead of staying alive under the rest of
    the backward until the graph is freed (which put it on top of the step's peak memory). Such a graph can be
    backpropagated once (as the donated gradient buffer requires anyway)."""
    if getattr(ctx, "delta_taken", False):
        raise RuntimeError("the logits-SAM perturbed head releases eps in its first backward; it cannot be "
                           "backpropagated twice (retain_graph)")
    if ctx.delta is not None:
        ctx.delta_taken = True
    return ctx.delta


class _ChunkedTokenLogps(torch.autograd.Function):
    """token log-probs (n,) and detached stats (n, 7) from (h, weight [+ delta], bias, targets).

    ``delta`` (None, a constant tensor or a ``SplitDelta``) and ``opts = (chunk_size,
    vocab_chunk_size, with_stats, compute dtype, donate)`` are constants. ``donate``: backward writes the
    weight's gradient into the fused delta's own buffer (logits-SAM's eps, dead after this backward), so the
    perturbed pass adds no (V, d) buffer beyond the gradient itself; such a graph can be backpropagated once.
    Autocast is off inside forward and backward; both run their blocks in the compute dtype captured at
    forward time.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, delta, opts):
        chunk_size, vocab_chunk_size, with_stats, cdt, _ = opts
        with torch.autocast(h.device.type, enabled=False):
            lse, label_logit, stats = _forward(h, weight, delta, bias, targets, chunk_size, vocab_chunk_size,
                                               with_stats, cdt)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.delta, ctx.opts = delta, opts
        if stats is None:
            stats = lse.new_empty(0)
        ctx.mark_non_differentiable(stats)
        return label_logit - lse, stats

    @staticmethod
    def backward(ctx, grad_lp, _grad_stats):
        h, weight, bias, targets, lse = ctx.saved_tensors
        chunk_size, vocab_chunk_size, _, cdt, donate = ctx.opts
        need = ctx.needs_input_grad[:3]
        delta, ctx.delta = _take_delta(ctx), None  # released here, not when the graph is freed (see _take_delta)
        out = None
        if donate and need[1]:
            buf = delta.unit if isinstance(delta, SplitDelta) else delta
            if buf is not None and buf.dtype == weight.dtype and buf.shape == weight.shape:
                out = buf
        with torch.autocast(grad_lp.device.type, enabled=False):
            grads = head_backward(h, weight, delta, bias, targets, lse, grad_lp, chunk_size, vocab_chunk_size,
                                  need=need, cdt=cdt, grad_w_out=out)
        return *grads, None, None, None


def _prepare(hidden, weight, labels, chunk_size, vocab_chunk_size, index):
    if chunk_size < 1 or (vocab_chunk_size is not None and vocab_chunk_size < 1):
        raise ValueError(f"chunk sizes must be positive, got {chunk_size=} {vocab_chunk_size=}")
    h, targets, flat_index, row = valid_tokens(hidden, labels, index)
    check_targets(targets, weight.shape[0], sync=index is None)
    return h, targets, flat_index, row, vocab_chunk_size or weight.shape[0]


def chunked_head_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    with_stats: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE,
    weight_delta: torch.Tensor | SplitDelta | None = None,
    index: torch.Tensor | None = None,
    donate_delta: bool = False,
) -> HeadOutput:
    """Chunked twin of ``dense_head_logps``: same arguments and result, O(chunk x V) extra memory.

    Args:
        hidden (R, T, d), weight (V, d), bias (V,) or None, labels (R, T): as in ``dense_head_logps``.
        chunk_size: completion tokens per chunk.
        vocab_chunk_size: vocabulary slice per block (None: the whole vocabulary in one block).
        weight_delta (V, d): a constant added to the weight slice by slice (the logits-SAM eps), so
            ``weight + weight_delta`` is never materialised; gradients still flow to ``weight``. A
            ``SplitDelta`` is used as it is (its blocks must not straddle the vocabulary slices).
        index (n,) or None: ``completion_index(labels)`` computed beforehand (then no host sync here).
        donate_delta: the delta's buffer is the caller's to give away: backward writes the weight's gradient
            into it when dtypes match (logits-SAM's eps; the graph can then be backpropagated once).
    """
    if torch.is_tensor(weight_delta) and weight_delta.requires_grad:
        raise ValueError("weight_delta must be a constant (no gradient flows through the SAM perturbation)")
    h, targets, flat_index, row, vocab_chunk_size = _prepare(hidden, weight, labels, chunk_size, vocab_chunk_size,
                                                             index)
    cdt = compute_dtype(weight)
    delta = split_delta(weight_delta, cdt, block=vocab_chunk_size)
    token_lp, stats = _ChunkedTokenLogps.apply(h, weight, bias, targets, delta,
                                               (chunk_size, vocab_chunk_size, with_stats, cdt, donate_delta))
    return assemble(token_lp, stats if with_stats else None, flat_index, row, labels, weight.shape[0])


def chunked_head_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    loss_fn: Callable[[HeadOutput], torch.Tensor],
    w_sink: Callable[[int, int, torch.Tensor], None],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE,
    index: torch.Tensor | None = None,
) -> tuple[HeadOutput, torch.Tensor]:
    """A clean head pass outside the training graph and ``dL/dW`` along the logit path, slice by slice.

    Equals ``torch.autograd.grad(loss_fn(chunked_head_logps(hidden.detach(), w, bias, labels)), w)`` for a
    detached copy ``w`` of ``weight``, but the gradient is never stored whole: each vocabulary slice
    (v, d), in float32, is handed to ``w_sink(v0, v1, block)`` once. The loss reaches the head only through
    the token log-probs (statistics are detached), so ``dL/dW = sum_i (dL/d log p_i) d log p_i / dW``:
    one forward, the loss's gradient w.r.t. the (n,) token log-probs, one ``head_backward``.

    Returns:
        the clean ``HeadOutput`` (detached, with statistics) and the loss (0-dim, detached).
    """
    h, targets, flat_index, row, vocab_chunk_size = _prepare(hidden.detach(), weight, labels, chunk_size,
                                                             vocab_chunk_size, index)
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    cdt = compute_dtype(weight)
    with torch.autocast(h.device.type, enabled=False):
        lse, label_logit, stats = _forward(h, weight, None, bias, targets, chunk_size, vocab_chunk_size, True, cdt)
    with torch.enable_grad():
        token_lp = (label_logit - lse).requires_grad_()  # (n,) a leaf: the head's only path into the loss
        clean = assemble(token_lp, stats, flat_index, row, labels, weight.shape[0])
        loss = loss_fn(clean)
        (grad_lp,) = torch.autograd.grad(loss, token_lp, allow_unused=True, materialize_grads=True)
    with torch.autocast(h.device.type, enabled=False):
        head_backward(h, weight, None, bias, targets, lse, grad_lp, chunk_size, vocab_chunk_size,
                      need=(False, False, False), cdt=cdt, w_sink=w_sink)
    return clean.detach(), loss.detach()


__all__ = ["chunked_head_logps", "chunked_head_grad", "head_backward", "HeadOutput", "DEFAULT_CHUNK_SIZE"]
