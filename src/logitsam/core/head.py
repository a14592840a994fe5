"""LM-head log-probs: the dense reference implementation and the shared output type.

Both head implementations (this dense one and `head_chunked.chunked_head_logps`) share one
signature, ``(hidden, weight, bias, labels, *, with_stats) -> HeadOutput``, so a logits-SAM
perturbed weight ``weight + eps`` is just another tensor passed in.

The naive expression both equal::

    logits = hidden @ weight.T + bias                      # (R, T, V)
    token_logps = log_softmax(logits)[r, t, labels[r, t]]  # 0 where labels == -100
    logps = token_logps.sum(-1)                            # (R,)

Precision. The matmuls run in the *compute dtype*: the caller's autocast dtype when autocast is on
(float32 weights under ``torch.autocast``), else the weight's dtype. The softmax and every sum run in
float32. A perturbation ``weight_delta`` (the logits-SAM eps, entries ~1e-7) cannot be added to a
half-precision weight: bf16's spacing at |W| ~ 0.02 is ~1e-4, so ``W + eps`` rounds back to ``W``.
In a half compute dtype the perturbed logits are therefore formed as two products,
``Z = H W^T + s * (H U^T)`` with ``eps = s U`` (``U = eps / max|eps|``, so fp16 does not underflow),
each product in the compute dtype, the sum in float32 (``split_delta``). This costs one extra
(tokens x V x d) matmul in forward and one in backward (dL/dH). In float64, and in float32 when float32
matmuls are exact, the fused ``H (W + eps)^T`` is exact to rounding and is kept. Float32 matmuls that
may run in reduced precision (TF32 on CUDA: ``allow_tf32``, which TrainingArguments ``tf32: true`` sets;
``torch.set_float32_matmul_precision("high"/"medium")``) round their *inputs* to 11 (TF32) or 8 (bf16)
significant bits, so ``W + eps`` loses eps as in half precision: float32 then takes the split path too
(``reduced_fp32_matmul``, ``split_compute``). The clean product is the same bits in the clean and the
perturbed pass, and ``H U^T`` carries eps with the matmul's relative error (2^-9 .. 2^-11), not its
absolute spacing at |W|.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


HALF_DTYPES = (torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax/accumulation dtype: float32 for half types, the input dtype for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def _flag(read):
    """A precision flag's value, or None where this torch lacks it or refuses to read it (torch >= 2.9 raises
    when the legacy and the new fp32-precision APIs were mixed)."""
    try:
        return read()
    except (AttributeError, RuntimeError):
        return None


def reduced_fp32_matmul(device: torch.device | str | None = None) -> bool:
    """Whether float32 matmuls on ``device`` (default CPU) may round their inputs below float32 precision.

    True when ``torch.get_float32_matmul_precision()`` is not ``"highest"`` ("high": TF32, "medium": bf16
    allowed), or the device's backend flag allows it: on CUDA ``torch.backends.cuda.matmul.allow_tf32`` (the
    legacy flag) or ``torch.backends.cuda.matmul.fp32_precision == "tf32"`` (torch >= 2.9), on CPU
    ``torch.backends.mkldnn.matmul.fp32_precision`` in ("tf32", "bf16"). Then a fused ``H (W + eps)^T`` with a
    float32 weight rounds the logits-SAM eps (~1e-7) away with W's low mantissa bits, so the heads keep
    eps apart (``split_compute``). Read at call time: cheap, no device sync.
    """
    if _flag(torch.get_float32_matmul_precision) not in (None, "highest"):
        return True
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        matmul = torch.backends.cuda.matmul
        return bool(_flag(lambda: matmul.allow_tf32)) or _flag(lambda: matmul.fp32_precision) == "tf32"
    if kind == "cpu":
        mkldnn = getattr(torch.backends, "mkldnn", None)
        return _flag(lambda: mkldnn.matmul.fp32_precision) in ("tf32", "bf16")
    return False


def split_compute(dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
    """Whether a weight perturbation must be kept apart from the weight in compute dtype ``dtype``.

    Half dtypes always (``W + eps`` rounds back to W); float32 when its matmuls run in reduced precision
    (``reduced_fp32_matmul``: TF32 or bf16 inputs lose eps the same way); float64 never.
    """
    return dtype in HALF_DTYPES or (dtype == torch.float32 and reduced_fp32_matmul(device))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: the autocast dtype for a float32 weight under autocast, else its own."""
    device = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


@dataclass
class SplitDelta:
    """A weight perturbation kept apart from the weight: row ``r`` of delta is ``scale[r // block] * unit[r]``.

    Attributes:
        unit (V, d): delta scaled per block of ``block`` rows to max-abs 1, in the compute dtype (entries in
            [-1, 1]: no fp16 underflow). The only (V, d) buffer logits-SAM adds in a split compute dtype.
        scale (ceil(V / block),): float32, the max-abs of each block of delta.
        block: rows per scale; ``V`` (one scale) for the dense head, the vocabulary slice for the chunked one.
    """

    unit: torch.Tensor
    scale: torch.Tensor
    block: int

    def dense(self) -> torch.Tensor:
        """delta (V, d) in float32, materialised (for tests and the fused-path comparison)."""
        rows = self.scale.repeat_interleave(self.block)[: self.unit.shape[0]]
        return self.unit.float() * rows[:, None]

    def block_scale(self, v0: int, v1: int) -> torch.Tensor:
        """The 0-dim scale of rows [v0, v1), which must lie in one block."""
        if v0 // self.block != (v1 - 1) // self.block:
            raise ValueError(f"rows [{v0}, {v1}) span two perturbation blocks of {self.block} rows")
        return self.scale[v0 // self.block]


def split_delta(delta: torch.Tensor | None, dtype: torch.dtype, block: int | None = None
                ) -> torch.Tensor | SplitDelta | None:
    """``delta`` as it enters a head in compute dtype ``dtype``: split when ``split_compute(dtype, device)``
    (half dtypes; float32 under reduced-precision matmuls), else fused (itself: float64, exact float32).

    The split form is built block by block (``block`` rows, default all), so the only temporary above the
    (V, d) ``unit`` is one block in float32.
    """
    if isinstance(delta, SplitDelta) or delta is None:
        return delta
    delta = delta.detach()
    if not split_compute(dtype, delta.device):
        return delta
    V = delta.shape[0]
    block = V if block is None else block
    unit = torch.empty(delta.shape, dtype=dtype, device=delta.device)
    scales = []
    for v0 in range(0, V, block):
        rows = delta[v0:v0 + block].float()
        s = torch.linalg.vector_norm(rows, ord=float("inf")).clamp_min(torch.finfo(torch.float32).tiny)
        unit[v0:v0 + block] = rows / s
        scales.append(s)
    return SplitDelta(unit, torch.stack(scales), block)

# Columns of the per-token statistics tensor, in order (all computed on completion tokens only).
STAT_NAMES = ("entropy", "argmax_prob", "top1", "sum_p2", "logits_sum", "argmax_logp", "log_sum_p2")


@dataclass
class HeadOutput:
    """Per-token and per-row log-probs from one head pass, plus head statistics.

    Rows are ``R = 2B`` sequences, chosen rows first: row ``i`` and row ``i + B`` form pair ``i``.

    Attributes:
        token_logps (R, T): ``log p(labels[r, t])``, 0 at ignored positions. Differentiable.
        logps (R,): per-row sum of ``token_logps`` over completion tokens. Differentiable.
        lengths (R,): completion token counts (int64).
        entropy, argmax_prob, top1, sum_p2, logits_sum, argmax_logp, log_sum_p2 (R,): per-row *sums* over
            completion tokens of the token entropy ``-sum_v p_v log p_v``, the probability of the argmax
            token ``p(y*)``, ``1[argmax == label]``, ``sum_v p_v^2``, ``sum_v z_v`` (raw logits),
            ``log p(y*)`` and ``log sum_v p_v^2`` (WPO's per-token normaliser). float32, detached;
            ``None`` when the pass ran with ``with_stats=False``.
        vocab_size: V.
    """

    token_logps: torch.Tensor
    logps: torch.Tensor
    lengths: torch.Tensor
    vocab_size: int
    entropy: torch.Tensor | None = None
    argmax_prob: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    sum_p2: torch.Tensor | None = None
    logits_sum: torch.Tensor | None = None
    argmax_logp: torch.Tensor | None = None
    log_sum_p2: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.logps.shape[0] // 2

    @property
    def chosen_logps(self) -> torch.Tensor:
        return self.logps[: self.num_pairs]

    @property
    def rejected_logps(self) -> torch.Tensor:
        return self.logps[self.num_pairs :]

    @property
    def chosen_lengths(self) -> torch.Tensor:
        return self.lengths[: self.num_pairs]

    @property
    def rejected_lengths(self) -> torch.Tensor:
        return self.lengths[self.num_pairs :]

    def detach(self) -> HeadOutput:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return HeadOutput(**{k: v.detach() if torch.is_tensor(v) else v for k, v in values.items()})


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with input_ids (R, T) -> the token each position predicts (-100 at the end)."""
    shifted = labels.new_full(labels.shape, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def completion_index(labels: torch.Tensor) -> torch.Tensor:
    """(n,) long: the flat positions of ``labels (R, T)`` that are not ``IGNORE_INDEX``.

    Data-dependent (``nonzero``): compute it where the labels are still on the host (the collator) and pass
    it to the head as ``index=``, so the head step has static shapes and no host sync.
    """
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def valid_tokens(hidden: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None):
    """Select the completion positions: returns ``(h (n, d), targets (n,), flat_index (n,), row (n,))``.

    ``index``: ``completion_index(labels)`` computed beforehand; the selection is then sync-free and the label
    range is checked by a device-side assertion. Without it, the positions and the range are found here
    (one host sync each: fine for library calls, not inside a training step).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (R, T, d) and labels (R, T); got hidden {tuple(hidden.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    T = hidden.shape[1]
    flat_labels = labels.reshape(-1)
    flat_index = completion_index(labels) if index is None else index.to(labels.device)  # (n,)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index)  # (n, d)
    return h, flat_labels.index_select(0, flat_index), flat_index, flat_index // T


def check_targets(targets: torch.Tensor, vocab_size: int, *, sync: bool = True) -> None:
    """Labels must lie in [0, V). ``sync=False``: an asynchronous device-side assertion (no host sync)."""
    if not sync:
        torch._assert_async(((targets >= 0) & (targets < vocab_size)).all(),
                            f"a label is outside the vocabulary [0, {vocab_size})")
        return
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        bad = targets[(targets < 0) | (targets >= vocab_size)][0].item()
        raise ValueError(
            f"label {bad} is outside the vocabulary [0, {vocab_size}); use {IGNORE_INDEX} for ignored positions"
        )


def assemble(
    token_lp: torch.Tensor,
    stats: torch.Tensor | None,
    flat_index: torch.Tensor,
    row: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
) -> HeadOutput:
    """Scatter per-token values ``(n,)`` back to rows: token_logps (R, T), per-row sums (R,)."""
    R, T = labels.shape
    token_logps = token_lp.new_zeros(R * T).index_copy(0, flat_index, token_lp).view(R, T)
    logps = token_lp.new_zeros(R).index_add(0, row, token_lp)
    lengths = torch.zeros(R, dtype=torch.long, device=row.device).index_add_(0, row, torch.ones_like(row))
    out = HeadOutput(token_logps=token_logps, logps=logps, lengths=lengths, vocab_size=vocab_size)
    if stats is not None:
        sums = stats.new_zeros(R, stats.shape[1]).index_add(0, row, stats)  # (R, len(STAT_NAMES))
        for j, name in enumerate(STAT_NAMES):
            setattr(out, name, sums[:, j])
    return out


@torch.no_grad()
def token_stats(logits: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dense per-token statistics ``(n, 7)`` in STAT_NAMES order from fp32 logits and log-softmax."""
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    logp_max, argmax = logp.max(-1)
    top1 = (argmax == targets).to(p.dtype)
    log_sum_p2 = torch.logsumexp(2 * logp, dim=-1)  # log sum_v p_v^2 without underflow
    return torch.stack([entropy, logp_max.exp(), top1, (p * p).sum(-1), logits.sum(-1), logp_max, log_sum_p2], dim=1)


def dense_head_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    with_stats: bool = True,
    weight_delta: torch.Tensor | SplitDelta | None = None,
    index: torch.Tensor | None = None,
) -> HeadOutput:
    """Per-token and per-row log-probs with full logits in memory (the reference implementation).

    Args:
        hidden (R, T, d): final hidden states, the input of the LM head.
        weight (V, d), bias (V,) or None: the head.
        labels (R, T): the token each position predicts (already shifted), -100 where ignored.
        with_stats: also compute the per-row statistics of ``HeadOutput``.
        weight_delta (V, d) or None: a constant added to the weight (the logits-SAM eps), or its split form.
        index (n,) or None: ``completion_index(labels)`` computed beforehand (then no host sync here).

    Only completion positions are projected; logits are upcast to float32 before the softmax. In a
    half compute dtype, or float32 under reduced-precision matmuls (TF32), the perturbed logits are
    ``H W^T + b + s (H U^T)`` (see the module docstring).
    """
    h, targets, flat_index, row = valid_tokens(hidden, labels, index)
    check_targets(targets, weight.shape[0], sync=index is None)
    cdt = compute_dtype(weight)
    delta = split_delta(weight_delta, cdt)
    if isinstance(delta, SplitDelta):
        logits = _SplitLinear.apply(h, weight, bias, delta, cdt)  # (n, V) float32
    else:
        if delta is not None:
            weight = weight + delta  # float64 / exact float32: the naive definition, exact to rounding
        logits = F.linear(h, weight, bias).to(acc_dtype(cdt))  # (n, V)
    logp = logits.log_softmax(-1)
    token_lp = logp.gather(1, targets[:, None]).squeeze(1)  # (n,)
    stats = token_stats(logits, logp, targets) if with_stats else None
    return assemble(token_lp, stats, flat_index, row, labels, weight.shape[0])


def _blocks(delta: SplitDelta):
    V = delta.unit.shape[0]
    return ((v0, min(v0 + delta.block, V)) for v0 in range(0, V, delta.block))


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


class _SplitLinear(torch.autograd.Function):
    """``Z = H W^T + b + s (H U^T)`` in float32 from two products in the compute dtype (dense, split only).

    Backward keeps the eps term apart in the same way:
        dL/dH = (G W) + s (G U)  (each product in the compute dtype, summed in float32, cast once),
        dL/dW = G^T H,  dL/db = sum_n G;   G = dL/dZ in the compute dtype. No gradient reaches eps.
    Autocast is off inside: the casts are explicit, so forward and backward use the same dtype.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, delta: SplitDelta, cdt):
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(cdt), weight.to(cdt)
            z = F.linear(hc, wc, _cast(bias, cdt)).float()
            for v0, v1 in _blocks(delta):
                z[:, v0:v1] += F.linear(hc, delta.unit[v0:v1]).float() * delta.block_scale(v0, v1)
        ctx.save_for_backward(hc, wc)
        ctx.delta, ctx.dtypes, ctx.has_bias = delta, (h.dtype, weight.dtype), bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return z

    @staticmethod
    def backward(ctx, grad_z):
        hc, wc = ctx.saved_tensors
        if ctx.delta is None:
            raise RuntimeError("the logits-SAM perturbed head releases eps in its first backward; it cannot be "
                               "backpropagated twice (retain_graph)")
        (h_dtype, w_dtype), delta, ctx.delta = ctx.dtypes, ctx.delta, None  # eps freed as this backward ends
        grad_h = grad_w = grad_b = None
        with torch.autocast(grad_z.device.type, enabled=False):
            g = grad_z.to(hc.dtype)  # (n, V)
            if ctx.needs_input_grad[0]:
                grad_h = (g @ wc).float()
                for v0, v1 in _blocks(delta):
                    grad_h += (g[:, v0:v1] @ delta.unit[v0:v1]).float() * delta.block_scale(v0, v1)
                grad_h = grad_h.to(h_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (g.T @ hc).to(w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_z.sum(0).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None
