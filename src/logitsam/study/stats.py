"""Seed statistics of a study: mean with a Student-t interval, and the paired difference to a baseline.

Pure math (standard library only). With n values x_1..x_n (one per seed):

    mean = sum x_i / n,   s^2 = sum (x_i - mean)^2 / (n - 1),   interval = mean -+ t_{(1+level)/2, n-1} s / sqrt(n)

The paired difference of a treatment to the baseline uses the seeds both have, d_i = x_i - b_i, and the
same interval on the d_i: pairing by seed removes the seed-to-seed variation both runs share (the data
order, the held-out samples), which is most of it when the effect is small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple


class Interval(NamedTuple):
    """Mean and the two ends of its confidence interval over ``n`` values (ends NaN for n = 1)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` (integer >= 1) degrees of freedom.

    Closed form (Abramowitz & Stegun 26.7.3-4) with theta = atan(t / sqrt(df)):
    odd df: (2/pi) (theta + sin(theta) [cos(theta) + 2/3 cos^3(theta) + ... + (2*4*..*(df-3))/(1*3*..*(df-2))
    cos^(df-2)(theta)]) (just 2 theta / pi for df = 1); even df: sin(theta) [1 + 1/2 cos^2(theta) + 1*3/(2*4)
    cos^4(theta) + ... + (1*3*..*(df-3))/(2*4*..*(df-2)) cos^(df-2)(theta)].
    """
    if df < 1 or df != int(df):
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term = total = math.cos(theta)
        for k in range(1, (df - 3) // 2 + 1):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p in (0.5, 1)) of Student's t: t_{0.975, 2} = 4.303, t_{0.975, 4} = 2.776."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p!r}")
    mass = 2 * p - 1  # P(|T| < t) = 2p - 1
    low, high = 0.0, 1.0
    while t_two_sided_mass(high, df) < mass:
        high *= 2
    for _ in range(200):  # bisection to machine precision
        mid = (low + high) / 2
        if t_two_sided_mass(mid, df) < mass:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def mean_interval(values: Iterable[float], level: float = 0.95) -> Interval | None:
    """Mean and ``level`` t-interval of the values; None for no values, NaN ends for one."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return None
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(treatment: Mapping[int, float], baseline: Mapping[int, float],
                      level: float = 0.95) -> Interval | None:
    """Mean and t-interval of ``treatment[seed] - baseline[seed]`` over the seeds both hold (None if none)."""
    seeds = sorted(set(treatment) & set(baseline))
    return mean_interval([treatment[s] - baseline[s] for s in seeds], level)
