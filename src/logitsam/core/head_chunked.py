"""Chunked LM-head log-probs that never hold the (tokens x vocab) logits.

Equals ``head.dense_head_logps`` (same signature, same output). Tokens are processed in chunks of
``chunk_size`` and, within a chunk, the vocabulary in slices of ``vocab_chunk_size`` with an online
log-sum-exp (running max ``m``, rescaled sums). The custom autograd function keeps only the
per-token log-sum-exp and recomputes each logits block in backward, so peak extra memory is
O(chunk_size x vocab_chunk_size) instead of O(tokens x V).

Per token: lse = m + log s with a running max m and s = sum_v exp(z_v - m) (see ``_forward``).

Precision: the blocks are computed in the compute dtype (``head.compute_dtype``: the caller's autocast
dtype for float32 weights under autocast, else the weight's), in forward *and* backward, with
autocast off inside and explicit casts. A perturbation in a half compute dtype is kept apart from the
weight (``head.SplitDelta``): each block is ``h W_v^T + b_v + s (h U_v^T)``, one extra matmul per
block in forward and one in backward (dL/dH).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .head import (
    STAT_NAMES,
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
    """The block's weight in the compute dtype; a fused (float32/64) delta is added here."""
    w = weight[v0:v1] if delta is None or isinstance(delta, SplitDelta) else weight[v0:v1] + delta[v0:v1]
    return w.to(cdt)  # (v, d)


def _block_logits(h, w_block, delta, bias, v0, v1):
    """Logits block (c, v) in the accumulation dtype; ``h`` and ``w_block`` are in the compute dtype."""
    b = None if bias is None else bias[v0:v1].to(w_block.dtype)
    z = F.linear(h, w_block, b).to(acc_dtype(w_block.dtype))
    if isinstance(delta, SplitDelta):
        z += F.linear(h, delta.unit[v0:v1]).float() * delta.scale  # eps's own product, summed in float32
    return z


def _rows_of_delta(delta, rows, acc):
    """``delta[rows]`` in the accumulation dtype (for the one-hot part of dL/dH)."""
    if isinstance(delta, SplitDelta):
        return delta.unit[rows].to(acc) * delta.scale
    return delta[rows].to(acc)


def _label_hits(targets, v0, v1):
    """Mask of targets inside vocab slice [v0, v1) and their local column (clamped for gather)."""
    inside = (targets >= v0) & (targets < v1)
    return inside, (targets - v0).clamp(0, v1 - v0 - 1)


@torch.no_grad()
def _forward(h, weight, delta, bias, targets, chunk_size, vocab_chunk_size, with_stats, cdt):
    """Returns lse (n,), label logit (n,) and stats (n, 7) or None, in the accumulation dtype.

    Online log-sum-exp with a running max m and s = sum_v exp(z_v - m). Each block is shifted in place
    and exponentiated once; the log-probs are computed the same way with or without statistics, so the
    two modes agree bit for bit. Statistics ride along, rescaled like s:
        t = sum_v exp(z_v - m) z_v,  q = sum_v exp(2 (z_v - m)),
        entropy = lse - t / s,  sum_v p_v^2 = q / s^2,  log p(y*) = -log s,  log sum_v p_v^2 = log q - 2 log s.
    """
    n, V, acc = h.shape[0], weight.shape[0], acc_dtype(cdt)
    lse = h.new_empty(n, dtype=acc)
    label_logit = torch.empty_like(lse)
    stats = h.new_empty(n, len(STAT_NAMES), dtype=acc) if with_stats else None
    for i0, i1 in _slices(n, chunk_size):
        h_c, y_c = h[i0:i1].to(cdt), targets[i0:i1]
        m = torch.full((i1 - i0,), float("-inf"), dtype=acc, device=h.device)
        s, t, q, zsum, y_logit = (torch.zeros_like(m) for _ in range(5))
        amax = torch.zeros_like(y_c)
        for v0, v1 in _slices(V, vocab_chunk_size):
            z = _block_logits(h_c, _block_weight(weight, delta, v0, v1, cdt), delta, bias, v0, v1)  # (c, v)
            inside, col = _label_hits(y_c, v0, v1)
            y_logit = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), y_logit)
            z_max, z_arg = z.max(-1)
            if with_stats:
                zsum += z.sum(-1)
                amax = torch.where(z_max > m, z_arg + v0, amax)
            m_new = torch.maximum(m, z_max)
            scale = (m - m_new).exp()
            z.sub_(m_new[:, None])  # z' = z - m_new <= 0
            if with_stats:
                e = z.exp()
                e_sum = e.sum(-1)
                t = t * scale + torch.einsum("cv,cv->c", e, z) + m_new * e_sum  # sum e z = sum e z' + m sum e
                q = q * scale * scale + torch.einsum("cv,cv->c", e, e)
            else:
                e_sum = z.exp_().sum(-1)
            s = s * scale + e_sum
            m = m_new
        lse[i0:i1] = m + s.log()
        label_logit[i0:i1] = y_logit
        if with_stats:
            top1 = (amax == y_c).to(acc)
            log_s = s.log()
            stats[i0:i1] = torch.stack([lse[i0:i1] - t / s, 1.0 / s, top1, q / (s * s), zsum, -log_s,
                                        q.log() - 2 * log_s], dim=1)
    return lse, label_logit, stats


def _accumulate(out, a, b, alpha=1.0):
    """out += alpha * a @ b, in place when dtypes match (fp32), else through a temporary."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_((a @ b).to(out.dtype), alpha=alpha)


@torch.no_grad()
def head_backward(h, weight, delta, bias, targets, lse, grad_lp, chunk_size, vocab_chunk_size, need, cdt=None):
    """Gradients of ``sum_i grad_lp[i] log p(targets[i])`` w.r.t. (h, weight, bias), recomputing logits.

    The head weight is ``weight + delta`` (delta None: 0, a tensor, or a ``SplitDelta``); its gradient
    is also weight's. Blocks run in ``cdt`` (default: ``compute_dtype(weight)``).
    d log p(y_i) / d z_i = onehot(y_i) - p_i, so with g = grad_lp and P = exp(Z - lse):
        grad_h = g * W[y] - g * (P W),   grad_W = onehot^T (g h) - P^T (g h),   grad_b = onehot^T g - P^T g
    The per-row factor g is applied to the small (c, d) operands, never to the (c, v) block, so a
    block costs one matmul, one in-place exp and two matmuls.
    Accumulates in float32 (float64 for float64 inputs); returns a tuple with None for gradients not needed.
    """
    cdt = compute_dtype(weight) if cdt is None else cdt
    n, V, acc = h.shape[0], weight.shape[0], acc_dtype(cdt)
    split = isinstance(delta, SplitDelta)
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=h.device) if need_b else None
    for i0, i1 in _slices(n, chunk_size):
        h_c, y_c, g_c, lse_c = h[i0:i1].to(cdt), targets[i0:i1], grad_lp[i0:i1].to(acc), lse[i0:i1]
        gh = (h_c.to(acc) * g_c[:, None]).to(cdt)  # (c, d)
        # the onehot part: every target row once
        if need_h:
            w_y = weight[y_c].to(cdt).to(acc)
            if delta is not None:
                w_y += _rows_of_delta(delta, y_c, acc)
            grad_h[i0:i1] += g_c[:, None] * w_y
        if need_w:
            grad_w.index_add_(0, y_c, gh.to(acc))
        if need_b:
            grad_b.index_add_(0, y_c, g_c)
        for v0, v1 in _slices(V, vocab_chunk_size):
            w_block = _block_weight(weight, delta, v0, v1, cdt)
            p = _block_logits(h_c, w_block, delta, bias, v0, v1).sub_(lse_c[:, None]).exp_()  # (c, v) probs
            p_mm = p.to(cdt)
            if need_h:
                pw = (p_mm @ w_block).to(acc)  # (c, d)
                if split:  # eps's own product, added in float32
                    pw += (p_mm @ delta.unit[v0:v1]).float() * delta.scale
                grad_h[i0:i1].addcmul_(pw, g_c[:, None], value=-1.0)
            if need_w:
                _accumulate(grad_w[v0:v1], p_mm.T, gh, alpha=-1.0)
            if need_b:
                grad_b[v0:v1].addmv_(p.T, g_c, alpha=-1.0)
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return cast(grad_h, h), cast(grad_w, weight), cast(grad_b, bias)


class _ChunkedTokenLogps(torch.autograd.Function):
    """token log-probs (n,) and detached stats (n, 7) from (h, weight [+ delta], bias, targets).

    ``delta`` (None, a constant tensor or a ``SplitDelta``) and ``opts = (chunk_size,
    vocab_chunk_size, with_stats, compute dtype)`` are constants. Autocast is off inside forward and
    backward; both run their blocks in the compute dtype captured at forward time.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, delta, opts):
        chunk_size, vocab_chunk_size, with_stats, cdt = opts
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
        chunk_size, vocab_chunk_size, _, cdt = ctx.opts
        need = ctx.needs_input_grad[:3]
        with torch.autocast(grad_lp.device.type, enabled=False):
            grads = head_backward(h, weight, ctx.delta, bias, targets, lse, grad_lp, chunk_size, vocab_chunk_size,
                                  need=need, cdt=cdt)
        return *grads, None, None, None


def chunked_head_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    with_stats: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE,
    weight_delta: torch.Tensor | None = None,
) -> HeadOutput:
    """Chunked twin of ``dense_head_logps``: same arguments and result, O(chunk x V) extra memory.

    Args:
        hidden (R, T, d), weight (V, d), bias (V,) or None, labels (R, T): as in ``dense_head_logps``.
        chunk_size: completion tokens per chunk.
        vocab_chunk_size: vocabulary slice per block (None: the whole vocabulary in one block).
        weight_delta (V, d): a constant added to the weight slice by slice (the logits-SAM eps), so
            ``weight + weight_delta`` is never materialised; gradients still flow to ``weight``.
    """
    if weight_delta is not None and weight_delta.requires_grad:
        raise ValueError("weight_delta must be a constant (no gradient flows through the SAM perturbation)")
    if chunk_size < 1 or (vocab_chunk_size is not None and vocab_chunk_size < 1):
        raise ValueError(f"chunk sizes must be positive, got {chunk_size=} {vocab_chunk_size=}")
    h, targets, flat_index, row = valid_tokens(hidden, labels)
    V = weight.shape[0]
    check_targets(targets, V)
    cdt = compute_dtype(weight)
    delta = split_delta(weight_delta, cdt)
    token_lp, stats = _ChunkedTokenLogps.apply(h, weight, bias, targets, delta, (chunk_size, vocab_chunk_size or V,
                                                                                 with_stats, cdt))
    return assemble(token_lp, stats if with_stats else None, flat_index, row, labels, V)


__all__ = ["chunked_head_logps", "head_backward", "HeadOutput", "DEFAULT_CHUNK_SIZE"]
