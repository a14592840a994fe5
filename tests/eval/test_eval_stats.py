"""Win rate and its intervals against known values."""

import pytest
import torch

from logitsam.eval import bootstrap_interval, wilson_interval, win_rate


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
