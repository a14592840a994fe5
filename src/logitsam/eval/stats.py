"""Paired win rate with a confidence interval (Wilson score, or a seeded percentile bootstrap)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

TIES = ("half", "exclude")
METHODS = ("wilson", "bootstrap")


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson, JASA 1927).

        p = successes / n,  z = Phi^-1((1 + confidence) / 2)
        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    Example: 50 of 100 at 95% gives z = 1.95996 and [0.4038, 0.5962]. ``successes`` may be fractional
    (a tie counted as half a win).
    """
    if n <= 0:
        raise ValueError(f"n={n}; the Wilson interval needs at least one trial")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_interval(
    outcomes: torch.Tensor, confidence: float = 0.95, *, num_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-pair outcomes (n,), resampling pairs."""
    generator = torch.Generator().manual_seed(seed)
    n = outcomes.numel()
    means = []
    chunk = max(1, 2**22 // n)  # bound the (chunk, n) index tensor to ~32 MB
    for start in range(0, num_resamples, chunk):
        rows = min(chunk, num_resamples - start)
        idx = torch.randint(0, n, (rows, n), generator=generator)
        means.append(outcomes[idx].mean(1))
    means = torch.cat(means)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=means.dtype)).tolist()
    return low, high


def win_rate(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    *,
    ties: str = "half",
    confidence: float = 0.95,
    method: str = "wilson",
    num_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float | int]:
    """How often A beats B on paired scores (higher is better), with a confidence interval.

    Pair i is a win if ``scores_a[i] > scores_b[i]``, a loss if ``<``, a tie if equal.

        ties="half":    win_rate = (wins + ties / 2) / (wins + ties + losses)
        ties="exclude": win_rate = wins / (wins + losses)

    Args:
        scores_a, scores_b: per-pair scores, e.g. a judge's scores of two models' responses.
        ties: ``"half"`` or ``"exclude"``.
        confidence: interval level in (0, 1).
        method: ``"wilson"`` (score interval with ``wins + ties/2`` successes out of n) or
            ``"bootstrap"`` (percentile interval over ``num_resamples`` pair resamples, seeded).
    Returns:
        ``win_rate``, ``ci_low``, ``ci_high`` (floats), and ``n`` (pairs in the denominator), ``wins``,
        ``ties``, ``losses`` (ints; ``wins + ties + losses`` is always the number of pairs given).
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}; allowed: {', '.join(TIES)}")
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; must be in (0, 1)")
    a = torch.as_tensor(scores_a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(scores_b, dtype=torch.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"scores_a has {a.numel()} values but scores_b has {b.numel()}; they must be paired")
    bad = (a.isnan() | b.isnan()).nonzero()
    if bad.numel():
        raise ValueError(f"pair {int(bad[0])} has a NaN score ({a[bad[0]].item()}, {b[bad[0]].item()})")
    outcome = (a > b).double() + 0.5 * (a == b).double()  # 1 win, 0.5 tie, 0 loss
    counts = {"wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum())}
    if ties == "exclude":
        outcome = outcome[a != b]
    n = outcome.numel()
    if n == 0:
        raise ValueError(f"no pair to compute a win rate from ({counts}, ties={ties!r})")
    rate = float(outcome.mean())
    if method == "wilson":
        low, high = wilson_interval(float(outcome.sum()), n, confidence)
    else:
        low, high = bootstrap_interval(outcome, confidence, num_resamples=num_resamples, seed=seed)
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "n": n, **counts}
