"""Curvature diagnostics: the closed-form logit-Hessian trace and a Hutchinson parameter-Hessian trace.

For one token with logits ``z (V,)`` and ``p = softmax(z)``, the Hessian of the cross-entropy
``-log p_y`` with respect to ``z`` is ``diag(p) - p p^T`` (independent of the label ``y``), so

    tr(diag(p) - p p^T) = sum_v p_v - sum_v p_v^2 = 1 - sum_v p_v^2.

Summed over a row's completion tokens this is ``lengths - sum_p2``, available from a ``HeadOutput``
without another pass over the vocabulary. It is 0 for a one-hot (fully squeezed) distribution and
``1 - 1/V`` per token for a uniform one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from logitsam.core import HeadOutput

DISTRIBUTIONS = ("rademacher", "gaussian")


def logit_hessian_trace(policy: HeadOutput) -> Tensor:
    """Per-row trace of the logit Hessian of the token cross-entropy, summed over completion tokens.

        trace[r] = sum_{t in completion(r)} (1 - sum_v p_{r,t,v}^2) = lengths[r] - sum_p2[r]

    Args:
        policy: a head pass run with ``with_stats=True`` (needs ``sum_p2``).
    Returns:
        trace (R,) float32; 0 for a row with no completion token.
    """
    if policy.sum_p2 is None:
        raise ValueError("logit_hessian_trace needs HeadOutput.sum_p2; run the head with with_stats=True")
    return policy.lengths.to(policy.sum_p2.dtype) - policy.sum_p2


def _probe(like: Tensor, distribution: str, generator: torch.Generator) -> Tensor:
    if distribution == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return (2 * bits - 1).to(like.dtype)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def hutchinson_trace(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    num_probes: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H), H the Hessian of ``loss_fn()`` w.r.t. ``params`` (jointly).

        tr(H) = E_v[v^T H v],  E[v v^T] = I,
        estimate = mean_k v_k^T H v_k,  stderr = std_k(v_k^T H v_k) / sqrt(K)   (sample std, ddof=1)

    Each ``H v`` is a Hessian-vector product (double backward through ``autograd.grad`` with
    ``create_graph=True``); the loss and its gradient graph are built once and reused by every probe.
    Rademacher probes (entries +-1) give the lower variance, ``2 sum_{i != j} H_ij^2``: exact for a
    diagonal H. Gaussian probes add ``2 sum_i H_ii^2``.

    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines" (1989); Avron & Toledo, J. ACM 2011, for the variances.

    Args:
        loss_fn: builds a scalar loss from ``params`` (call it inside, so the graph is fresh).
        params: tensors with ``requires_grad=True``, on one device; the trace is over their concatenation.
        num_probes: K >= 1 (stderr is NaN for K = 1).
        seed: seeds a generator on the parameters' device; the caller's global RNG is untouched.
        distribution: ``"rademacher"`` or ``"gaussian"``.
    Returns:
        (mean, stderr) as floats.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if num_probes < 1:
        raise ValueError(f"num_probes={num_probes}; must be >= 1")
    params = list(params)
    if not params or not all(p.requires_grad for p in params):
        raise ValueError("hutchinson_trace needs a non-empty list of tensors with requires_grad=True")
    generator = torch.Generator(device=params[0].device).manual_seed(seed)
    with torch.enable_grad():
        loss = loss_fn()
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        samples = []
        for _ in range(num_probes):
            probes = [_probe(p, distribution, generator) for p in params]
            hvps = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=True)
            samples.append(sum((v.double() * hv.double()).sum() for v, hv in zip(probes, hvps, strict=True)))
    values = torch.stack(samples)  # (K,) float64
    mean = float(values.mean())
    stderr = float(values.std(correction=1)) / math.sqrt(num_probes) if num_probes > 1 else float("nan")
    return mean, stderr
