"""The statistics of the main job (``benchmarks/_personalize/stats.py``) against hand-computed values.

Oracle: Student-t quantiles from printed tables (t_{0.975, 1} = 12.7062, t_{0.975, 2} = 4.3027, t_{0.975, 4} = 2.7764)
and means / standard deviations worked out by hand.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _personalize.stats import (
    comparisons,
    holm,
    holm_claims,
    mdd,
    p_value,
    paired,
    primary,
    t_interval,
    t_quantile,
)

TABLE = {1: 12.7062, 2: 4.3027, 4: 2.7764}


@pytest.mark.parametrize("df", sorted(TABLE))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(df) == pytest.approx(TABLE[df], abs=1e-4)


def test_interval_of_three_values():
    # values 0.60, 0.70, 0.80: mean 0.70, sample sd 0.10, half = 4.3027 * 0.10 / sqrt(3)
    iv = t_interval([0.6, 0.7, 0.8])
    assert iv.mean == pytest.approx(0.7)
    assert iv.half == pytest.approx(4.3027 * 0.1 / math.sqrt(3), abs=1e-5)
    assert (iv.low, iv.high) == pytest.approx((0.7 - iv.half, 0.7 + iv.half))


def test_single_value_has_no_interval_and_empty_is_refused():
    iv = t_interval([0.5])
    assert iv.mean == 0.5 and math.isnan(iv.half)
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0)


def test_paired_hints():
    base = [0.50, 0.60, 0.70]
    # A is B + (0.10, 0.11, 0.12): differences mean 0.11, sd 0.01 -> interval 0.11 ± 0.0248 > 0
    better = {"A": [b + d for b, d in zip(base, (0.10, 0.11, 0.12))], "B": base}
    q = paired("A", "B", "A beats B", better)
    assert q.diff.mean == pytest.approx(0.11)
    assert q.diff.half == pytest.approx(4.3027 * 0.01 / math.sqrt(3), abs=1e-5)
    assert q.hint == "hint: A ahead"  # exploratory words are hints, never the primary claims' verdicts
    assert paired("B", "A", "B beats A", better).hint == "hint: B ahead"
    # differences +0.05, -0.05, +0.01: the interval contains 0
    mixed = {"A": [b + d for b, d in zip(base, (0.05, -0.05, 0.01))], "B": base}
    assert paired("A", "B", "", mixed).hint == "no hint"
    one = {"A": [0.9], "B": [0.1]}
    assert paired("A", "B", "", one).hint == "no hint"  # one seed hints nothing
    two = {"A": [0.8, 0.9], "B": [0.7, 0.8]}  # equal differences: a zero-width interval from two seeds
    q = paired("A", "B", "", two)
    assert q.diff.half == pytest.approx(0.0) and q.hint == "no hint"
    with pytest.raises(ValueError, match="same seeds"):
        paired("A", "B", "", {"A": [0.1, 0.2], "B": [0.1]})


def test_comparisons_only_between_methods_that_ran():
    methods = ["FedAvg", "FedVPT", "pFedPG", "Local"]
    assert {(a, b) for a, b, _ in primary(methods)} == {("pFedPG", "FedVPT"), ("FedVPT", "Local"),
                                                        ("pFedPG", "FedAvg")}
    # exploratory: never a primary pair again
    assert {(a, b) for a, b, _ in comparisons(methods)} == {("FedVPT", "FedAvg")}
    assert comparisons(["Local"]) == [] and primary(["Local"]) == []


def test_p_value_against_the_closed_form_for_two_degrees_of_freedom():
    # d = 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3); with 2 df, P(|T| > t) = 1 - t / sqrt(t^2 + 2)
    t = 2 * math.sqrt(3)
    assert p_value([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)
    assert p_value([-1.0, -2.0, -3.0]) == pytest.approx(p_value([1.0, 2.0, 3.0]))
    assert p_value([0.0, 0.0, 0.0]) == 1.0 and p_value([0.5, 0.5, 0.5]) == 0.0  # no spread
    assert math.isnan(p_value([0.3]))


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, float("nan")])
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1])  # a nan still counts in k


def test_minimal_detectable_difference_has_the_stated_power_by_simulation():
    """Oracle: simulate the paired t-test at the MDD (normal differences, true mean = MDD, sd = the sample sd) and
    count rejections at α / k; it must reject 80 % of the time. The normal-style formula falls short at n = 5."""
    d = [0.01, 0.03, -0.02, 0.05, 0.0]
    n, k = len(d), 7
    sd = statistics.stdev(d)
    delta = mdd(d, k)
    crit = t_quantile(n - 1, 1 - 0.05 / k)  # two-sided at alpha / k
    g = torch.Generator().manual_seed(0)
    x = delta + sd * torch.randn(400_000, n, generator=g, dtype=torch.float64)
    tstat = x.mean(1) / (x.std(1) / math.sqrt(n))
    power = float((tstat.abs() > crit).double().mean())
    assert power == pytest.approx(0.80, abs=0.005)
    normal_style = (crit + t_quantile(n - 1, 0.60)) * sd / math.sqrt(n)  # t_{0.80} = two-sided 0.60 quantile
    assert 1.05 < delta / normal_style < 1.09  # the old formula was about 7 % optimistic here
    assert math.isnan(mdd([0.3], 1)) and mdd([0.2, 0.2, 0.2], 1) == pytest.approx(0.0, abs=1e-12)


def test_holm_claims_decide_by_the_adjusted_p_value():
    # pFedPG beats FedVPT by 1..5 points over 5 seeds (p ~ 0.0046) and SingleSet-VPT by a wobble; 2 claims
    base = [0.5, 0.6, 0.7, 0.6, 0.5]
    values = {"FedVPT": base, "SingleSet-VPT": [b + w for b, w in zip(base, (0.02, -0.03, 0.01, 0.0, -0.01))],
              "pFedPG": [b + d for b, d in zip(base, (0.01, 0.02, 0.03, 0.04, 0.05))]}
    claims = holm_claims(values, ["FedVPT", "SingleSet-VPT", "pFedPG"])
    assert [(c.pair.a, c.pair.b) for c in claims] == [("pFedPG", "FedVPT"), ("pFedPG", "SingleSet-VPT")]
    first, second = claims
    # d = .01..05: mean .03, sd .0158, t = 4.2426, df 4 -> two-sided p = 0.01324 (scipy-independent table value)
    assert first.p == pytest.approx(0.01324, abs=2e-4)
    assert first.p_holm == pytest.approx(2 * first.p) and first.verdict == "holds"
    assert second.p_holm == pytest.approx(max(first.p_holm, second.p)) and second.verdict == "not resolved at this budget"
