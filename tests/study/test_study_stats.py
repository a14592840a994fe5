"""Seed statistics against values worked out by hand."""

import math

import pytest

from logitsam.study.stats import mean_interval, paired_difference, t_quantile


def test_t_quantiles_match_the_table():
    """Student-t table, 0.975 quantile: df 1: 12.706, 2: 4.303, 4: 2.776, 10: 2.228, 30: 2.042."""
    for df, expected in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    # df = 2 has a closed form: P(|T| < t) = t / sqrt(t^2 + 2) = 0.95  ->  t = sqrt(2 * 0.9025 / 0.0975)
    assert t_quantile(0.975, 2) == pytest.approx(math.sqrt(2 * 0.9025 / 0.0975), rel=1e-12)


def test_mean_interval_by_hand():
    """Values -1, -2, -4 (three seeds): mean -7/3; deviations 4/3, 1/3, -5/3, squares 16/9 + 1/9 + 25/9 = 42/9,
    s^2 = (42/9) / 2 = 7/3, s = 1.52753; s / sqrt(3) = 0.881917; half width 4.30265 x 0.881917 = 3.79458:
    interval [-6.12792, 1.46125]."""
    iv = mean_interval([-1.0, -2.0, -4.0])
    assert iv.n == 3
    assert iv.mean == pytest.approx(-7 / 3)
    assert iv.low == pytest.approx(-6.12792, abs=1e-4)
    assert iv.high == pytest.approx(1.46125, abs=1e-4)


def test_paired_difference_by_hand_is_far_narrower_than_either_interval():
    """Treatment -0.9, -1.8, -3.7 against control -1, -2, -4 (same seeds 1, 2, 3): differences 0.1, 0.2, 0.3,
    mean 0.2, s = 0.1, s / sqrt(3) = 0.0577350; half width 4.30265 x 0.0577350 = 0.248414: [-0.048414, 0.448414].
    Unpaired, each group's interval is +-3.8 wide (above): pairing is what makes a small effect visible."""
    control = {1: -1.0, 2: -2.0, 3: -4.0}
    treatment = {1: -0.9, 2: -1.8, 3: -3.7, 4: 9.0}  # seed 4 has no control: left out
    iv = paired_difference(treatment, control)
    assert iv.n == 3
    assert iv.mean == pytest.approx(0.2)
    assert (iv.low, iv.high) == (pytest.approx(-0.048414, abs=1e-5), pytest.approx(0.448414, abs=1e-5))
    # a sign flip in the difference would move the mean to -0.2
    assert paired_difference(control, treatment).mean == pytest.approx(-0.2)


def test_one_and_no_values():
    one = mean_interval([0.5])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    assert mean_interval([]) is None
    assert paired_difference({1: 1.0}, {2: 1.0}) is None
