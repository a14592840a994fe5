"""Win rate and its intervals against known values."""

import math

import pytest
import torch

from logitsam.eval import bootstrap_interval, wilson_interval, win_rate
from logitsam.eval.stats import judged_win_rate, length_adjusted_win_rate, paired_bootstrap_difference


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (50, 100, 0.4038, 0.5962),  # z = 1.95996: center 0.5, half-width 0.0962
        (8, 10, 0.4902, 0.9433),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_known_values(successes, n, low, high):
    got = wilson_interval(successes, n, 0.95)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_wider_at_higher_confidence():
    low95, high95 = wilson_interval(30, 50, 0.95)
    low99, high99 = wilson_interval(30, 50, 0.99)
    assert low99 < low95 and high99 > high95
    # z = 2.5758: denom 1.1327, center 0.58829, half-width 2.27404 * sqrt(0.0048 + 0.00066349) = 0.16809
    assert (low99, high99) == pytest.approx((0.4202, 0.7564), abs=1e-4)


def test_win_rate_counts_and_ties():
    a = [1.0] * 40 + [0.0] * 20 + [-1.0] * 40
    b = [0.0] * 100
    half = win_rate(a, b)
    assert (half["wins"], half["ties"], half["losses"], half["n"]) == (40, 20, 40, 100)
    assert half["win_rate"] == 0.5
    assert (half["ci_low"], half["ci_high"]) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    excluded = win_rate(a, b, ties="exclude")
    assert excluded["n"] == 80 and excluded["win_rate"] == 0.5
    assert (excluded["ci_low"], excluded["ci_high"]) == pytest.approx(wilson_interval(40, 80), abs=1e-12)
    lopsided = win_rate([2, 2, 2, 0], [1, 1, 1, 1])
    assert lopsided["win_rate"] == 0.75 and lopsided["wins"] == 3 and lopsided["losses"] == 1


def test_bootstrap_is_seeded_and_close_to_wilson():
    a = [1.0] * 50 + [-1.0] * 50
    b = [0.0] * 100
    boot = win_rate(a, b, method="bootstrap", seed=3)
    assert boot == win_rate(a, b, method="bootstrap", seed=3)
    assert boot["win_rate"] == 0.5
    # binomial sd sqrt(.25 / 100) = 0.05, so the 95% percentile interval is about 0.5 -+ 0.098
    assert boot["ci_low"] == pytest.approx(0.40, abs=0.015)
    assert boot["ci_high"] == pytest.approx(0.60, abs=0.015)
    outcomes = torch.tensor([1.0] * 9 + [0.0])
    low, high = bootstrap_interval(outcomes, 0.9, num_resamples=4000, seed=0)
    assert low <= 0.9 <= high and high == 1.0


def test_win_rate_validation():
    with pytest.raises(ValueError, match="paired"):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        win_rate([1, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="ties"):
        win_rate([1], [0], ties="drop")
    with pytest.raises(ValueError, match="no pair"):
        win_rate([1, 1], [1, 1], ties="exclude")


# ---------------------------------------------------------------------------------------------------
# Per-pair outcomes from a pairwise judge (1 win, 0.5 tie, 0 loss, None invalid)


def test_judged_win_rate_wilson_closed_form():
    """7 wins of 10 at 95 %: p = 0.7, z = Phi^-1(0.975) = 1.959964, z^2 = 3.841459,
    center = (p + z^2/2n) / (1 + z^2/n) = 0.892073 / 1.384146 = 0.644493,
    half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2) = 1.416009 * sqrt(0.021 + 0.009604) = 0.247715,
    so [0.3968, 0.8922]. Six wins and two ties count 6 + 2/2 = 7 successes: the same interval."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.975)
    p, n = 0.7, 10
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    wins = judged_win_rate([1.0] * 7 + [0.0] * 3)
    assert wins["win_rate"] == pytest.approx(0.7)
    assert (wins["ci_low"], wins["ci_high"]) == pytest.approx((center - half, center + half), abs=1e-12)
    assert (wins["ci_low"], wins["ci_high"]) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    ties = judged_win_rate([1.0] * 6 + [0.5] * 2 + [0.0] * 2 + [None] * 3)
    assert (ties["wins"], ties["ties"], ties["losses"], ties["invalid"], ties["n"]) == (6, 2, 2, 3, 10)
    assert (ties["win_rate"], ties["ci_low"], ties["ci_high"]) == pytest.approx(
        (wins["win_rate"], wins["ci_low"], wins["ci_high"]), abs=1e-12)


def test_judged_win_rate_validation():
    with pytest.raises(ValueError, match=r"outcomes\[1\] = 1.5"):
        judged_win_rate([1.0, 1.5])
    with pytest.raises(ValueError, match="no valid outcome"):
        judged_win_rate([None, None])


def test_paired_bootstrap_identical_policies_and_known_differences():
    mixed = [1.0] * 30 + [0.5] * 20 + [0.0] * 50
    same = paired_bootstrap_difference(mixed, mixed, seed=1)
    assert (same["difference"], same["ci_low"], same["ci_high"], same["n"]) == (0.0, 0.0, 0.0, 100)
    assert paired_bootstrap_difference([1.0] * 5, [0.0] * 5)["ci_low"] == 1.0
    # o1 - o2 is 1 on 10 of 100 prompts, else 0: mean 0.1, bootstrap sd sqrt(0.1 * 0.9 / 100) = 0.03, so about
    # [0.04, 0.16]; the shared per-prompt outcomes cancel (unpaired, the sd would be about 0.07 and cover 0)
    base = [1.0] * 50 + [0.0] * 50
    better = [1.0] * 60 + [0.0] * 40
    diff = paired_bootstrap_difference(better, base, seed=0)
    assert diff["difference"] == pytest.approx(0.1)
    assert diff["ci_low"] == pytest.approx(0.04, abs=0.015) and diff["ci_high"] == pytest.approx(0.16, abs=0.015)
    assert diff == paired_bootstrap_difference(better, base, seed=0)
    soft = [i / 99 for i in range(100)]  # fractional outcomes: the interval moves with the seed
    runs = [paired_bootstrap_difference(soft, [0.5] * 100, seed=seed) for seed in (0, 1)]
    assert runs[0]["ci_low"] != runs[1]["ci_low"]
    dropped = paired_bootstrap_difference([1.0, None, 0.0], [0.0, 1.0, None])
    assert (dropped["n"], dropped["dropped"], dropped["difference"]) == (1, 2, 1.0)
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_difference([1.0], [1.0, 0.0])


def test_length_adjusted_equals_raw_rate_when_length_is_uninformative():
    """Each length difference carries the same outcomes (1, 1, 0.5, 0), so cov(y, d) = 0: the score equations
    sum(y - p) = 0 and sum z (y - p) = 0 hold at slope 0, p = mean(y) = 0.625. The Wald variance of b0 is then
    [H^-1]_00 = 1 / (n p (1 - p) (1 - mean(z)^2)), since mean(z^2) = 1 by the scaling."""
    y = [1.0, 1.0, 0.5, 0.0] * 3
    d = [-30] * 4 + [10] * 4 + [50] * 4
    fit = length_adjusted_win_rate(y, d, ridge=0.0)
    assert fit["length_adjusted_win_rate"] == pytest.approx(0.625, abs=1e-12)
    assert fit["slope"] == pytest.approx(0.0, abs=1e-12)
    zbar = sum(d) / len(d) / fit["length_scale"]
    se = math.sqrt(1 / (12 * 0.625 * 0.375 * (1 - zbar**2)))
    b0 = math.log(0.625 / 0.375)
    expected = (1 / (1 + math.exp(-(b0 - 1.959964 * se))), 1 / (1 + math.exp(-(b0 + 1.959964 * se))))
    assert (fit["ci_low"], fit["ci_high"]) == pytest.approx(expected, abs=1e-6)
    assert length_adjusted_win_rate(y, d)["length_adjusted_win_rate"] == pytest.approx(0.625, abs=1e-6)  # ridge
    flat = length_adjusted_win_rate([1.0, 0.0, 0.5, 1.0, None], [0, 0, 0, 0, 7])  # no length difference at all
    assert flat["length_adjusted_win_rate"] == pytest.approx(0.625, abs=1e-6) and flat["invalid"] == 1


def test_length_adjusted_removes_a_pure_length_effect():
    """Outcomes y = sigmoid(0.05 d) depend on length alone, and the policy is usually longer (raw rate 0.69):
    the fit recovers b0 = 0, b1 = 0.05 s exactly, so the rate at equal length is 0.5."""
    d = [5, 10, 20, 40, -10, 60]
    y = [1 / (1 + math.exp(-0.05 * x)) for x in d]
    fit = length_adjusted_win_rate(y, d, ridge=0.0)
    assert sum(y) / len(y) == pytest.approx(0.6878, abs=1e-4)
    assert fit["length_adjusted_win_rate"] == pytest.approx(0.5, abs=1e-9)
    assert fit["slope"] == pytest.approx(0.05 * fit["length_scale"], rel=1e-9)
    # wins exactly when longer, symmetric lengths: separable, the ridge keeps it finite, and the answer is 0.5
    d = [-3, -2, -1, 1, 2, 3] * 3
    separated = length_adjusted_win_rate([float(x > 0) for x in d], d)
    assert separated["length_adjusted_win_rate"] == pytest.approx(0.5, abs=1e-6) and separated["slope"] > 5
    assert 0.99 < length_adjusted_win_rate([1.0] * 5, [1, 2, 3, 4, 5])["length_adjusted_win_rate"] < 1.0
