"""Paired win rate with a confidence interval (Wilson score, or a seeded percentile bootstrap).

Two kinds of input: paired scores (``win_rate``: a judge scored each response alone), and per-pair outcomes in
[0, 1] from a pairwise judge (``judged_win_rate``, ``paired_bootstrap_difference``, ``length_adjusted_win_rate``:
1 the policy won, 0.5 a tie, 0 it lost, None an answer that could not be read).
"""

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


def _valid_outcomes(outcomes: Sequence[float | None], name: str = "outcomes") -> list[float]:
    """The outcomes that are not None, each checked to lie in [0, 1]."""
    valid = [float(o) for o in outcomes if o is not None]
    for i, o in enumerate(outcomes):
        if o is not None and not 0.0 <= float(o) <= 1.0:  # NaN fails this too
            raise ValueError(f"{name}[{i}] = {o}; an outcome must be in [0, 1] (1 win, 0.5 tie, 0 loss) or None")
    return valid


def judged_win_rate(outcomes: Sequence[float | None], confidence: float = 0.95) -> dict[str, float | int]:
    """Win rate of per-pair outcomes from a pairwise judge, with a Wilson score interval.

        win_rate = sum(outcomes) / n,   n = number of valid (not None) outcomes

    A tie (0.5) counts as half a win and half a loss: the interval is ``wilson_interval(wins + ties / 2, n)``,
    the binomial interval with the ties split evenly (a fractional outcome, such as AlpacaEval's probability of
    a preference, enters the same way). Invalid outcomes (None) are left out of n and counted in ``invalid``,
    never as losses.

    Example: 7 wins of 10 gives 0.7 and [0.3968, 0.8922]; 6 wins, 2 ties, 2 losses give the same.

    Returns:
        ``win_rate``, ``ci_low``, ``ci_high`` (floats), ``n``, and the pair counts ``wins`` (outcome > 0.5),
        ``ties`` (= 0.5), ``losses`` (< 0.5) and ``invalid`` (None).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; must be in (0, 1)")
    valid = _valid_outcomes(outcomes)
    counts = {"wins": sum(o > 0.5 for o in valid), "ties": sum(o == 0.5 for o in valid),
              "losses": sum(o < 0.5 for o in valid), "invalid": len(outcomes) - len(valid)}
    if not valid:
        raise ValueError(f"no valid outcome to compute a win rate from ({counts})")
    low, high = wilson_interval(sum(valid), len(valid), confidence)
    return {"win_rate": sum(valid) / len(valid), "ci_low": low, "ci_high": high, "n": len(valid), **counts}


def paired_bootstrap_difference(
    outcomes_1: Sequence[float | None],
    outcomes_2: Sequence[float | None],
    confidence: float = 0.95,
    *,
    num_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float | int]:
    """Difference of two policies' win rates against the same opponent on the same prompts, with a paired bootstrap.

        difference = mean_i (o1_i - o2_i)

    Each resample draws n prompts with replacement and takes both policies' outcomes on those same prompts, so the
    per-prompt difficulty the two share cancels (the interval is that of the mean of ``o1 - o2``; seeded, percentile).
    A prompt where either outcome is None is left out and counted in ``dropped``.

    Returns:
        ``difference``, ``ci_low``, ``ci_high`` (floats), ``n`` (prompts used) and ``dropped``.
    """
    if len(outcomes_1) != len(outcomes_2):
        raise ValueError(f"outcomes_1 has {len(outcomes_1)} values but outcomes_2 has {len(outcomes_2)}; "
                         "they must be paired by prompt")
    _valid_outcomes(outcomes_1, "outcomes_1")
    _valid_outcomes(outcomes_2, "outcomes_2")
    pairs = [(a, b) for a, b in zip(outcomes_1, outcomes_2, strict=True) if a is not None and b is not None]
    if not pairs:
        raise ValueError("no prompt has a valid outcome for both policies")
    diff = torch.tensor([a - b for a, b in pairs], dtype=torch.float64)  # (n,)
    low, high = bootstrap_interval(diff, confidence, num_resamples=num_resamples, seed=seed)
    return {"difference": float(diff.mean()), "ci_low": low, "ci_high": high, "n": len(pairs),
            "dropped": len(outcomes_1) - len(pairs)}


def length_adjusted_win_rate(
    outcomes: Sequence[float | None],
    length_differences: Sequence[float],
    confidence: float = 0.95,
    *,
    ridge: float = 1e-6,
    max_steps: int = 100,
) -> dict[str, float | int]:
    """Win rate at equal lengths: a logistic regression of the outcome on the length difference, read at zero.

        z_i = d_i / s,   s = sqrt(mean_i d_i^2)        d_i = len(policy_i) - len(opponent_i); z = 0 <=> d = 0
        p_i = sigmoid(b0 + b1 z_i)
        (b0, b1) = argmax  sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - ridge / 2 (b0^2 + b1^2)
        length_adjusted_win_rate = sigmoid(b0)

    y_i is the outcome in [0, 1]: a tie (0.5) enters as half a win and half a loss. The fit runs Newton steps in
    float64, beta <- beta + H^-1 g with g = X^T (y - p) - ridge beta and H = X^T diag(p (1 - p)) X + ridge I,
    until the step is below 1e-10. The tiny ridge keeps the fit finite when length separates wins from losses
    or every pair is won; ``ridge=0`` is the plain maximum-likelihood fit. The interval is Wald on the logit
    scale, sigmoid(b0 -+ z sqrt([H^-1]_00)) (approximate: ties are not binomial draws).

    When lengths carry no information (outcomes uncorrelated with d) this equals the raw win rate; when the
    policy wins only by being longer, it is what is left at equal length. This is our own adjustment, NOT
    AlpacaEval's length-controlled win rate (Dubois et al. 2024), which fits a GLM per model with instruction
    and tanh-length terms on the judge's preferences and is not comparable with this number.

    Args:
        outcomes: per-pair outcomes in [0, 1], or None (left out, counted in ``invalid``).
        length_differences: d_i, policy minus opponent, in characters or tokens (same length as ``outcomes``).
    Returns:
        ``length_adjusted_win_rate``, ``ci_low``, ``ci_high``, ``intercept`` (b0), ``slope`` (b1, per unit of z),
        ``length_scale`` (s), ``n`` and ``invalid``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; must be in (0, 1)")
    if len(outcomes) != len(length_differences):
        raise ValueError(f"got {len(outcomes)} outcomes but {len(length_differences)} length differences")
    valid = _valid_outcomes(outcomes)
    if not valid:
        raise ValueError("no valid outcome to fit a length-adjusted win rate to")
    y = torch.tensor(valid, dtype=torch.float64)  # (n,)
    d = torch.tensor([float(x) for o, x in zip(outcomes, length_differences, strict=True) if o is not None],
                     dtype=torch.float64)  # (n,)
    scale = float(d.square().mean().sqrt())
    # with every length difference 0 the slope has nothing to fit: the intercept alone
    X = torch.stack([torch.ones_like(d), d / scale], dim=1) if scale > 0 else torch.ones_like(d)[:, None]  # (n, k)
    beta, hess = _fit_logistic(X, y, ridge, max_steps)
    se = float(torch.linalg.inv(hess)[0, 0].sqrt())
    q = NormalDist().inv_cdf((1 + confidence) / 2)
    b0 = float(beta[0])
    return {"length_adjusted_win_rate": _sigmoid(b0), "ci_low": _sigmoid(b0 - q * se), "ci_high": _sigmoid(b0 + q * se),
            "intercept": b0, "slope": float(beta[1]) if scale > 0 else 0.0,
            "length_scale": scale, "n": len(valid), "invalid": len(outcomes) - len(valid)}


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow for large |x|


def _fit_logistic(X: torch.Tensor, y: torch.Tensor, ridge: float, max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton's method for the ridge-penalised logistic log-likelihood with targets y in [0, 1].

    X (n, k) float64, y (n,) float64. Returns beta (k,) and the penalised Hessian of the negative log-likelihood
    at beta (k, k), whose inverse is the Wald covariance.
    """
    eye = torch.eye(X.shape[1], dtype=X.dtype)
    beta = torch.zeros(X.shape[1], dtype=X.dtype)
    for _ in range(max_steps):
        p = torch.sigmoid(X @ beta)  # (n,)
        grad = X.T @ (y - p) - ridge * beta
        hess = X.T @ (X * (p * (1 - p))[:, None]) + ridge * eye
        step = torch.linalg.solve(hess, grad)
        beta = beta + step
        if float(step.abs().max()) < 1e-10:
            break
    p = torch.sigmoid(X @ beta)
    return beta, X.T @ (X * (p * (1 - p))[:, None]) + ridge * eye
