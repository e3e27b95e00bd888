"""The statistics of the main job (``benchmarks/_personalize/stats.py``) against hand-computed values.

Oracle: Student-t quantiles from printed tables (t_{0.975, 1} = 12.7062, t_{0.975, 2} = 4.3027, t_{0.975, 4} = 2.7764)
and means / standard deviations worked out by hand.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _personalize.stats import comparisons, paired, t_interval, t_quantile

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


def test_paired_verdicts():
    base = [0.50, 0.60, 0.70]
    # A is B + (0.10, 0.11, 0.12): differences mean 0.11, sd 0.01 -> interval 0.11 ± 0.0248 > 0
    better = {"A": [b + d for b, d in zip(base, (0.10, 0.11, 0.12))], "B": base}
    q = paired("A", "B", "A beats B", better)
    assert q.diff.mean == pytest.approx(0.11)
    assert q.diff.half == pytest.approx(4.3027 * 0.01 / math.sqrt(3), abs=1e-5)
    assert q.verdict == "holds"
    assert paired("B", "A", "B beats A", better).verdict == "does not hold"
    # differences +0.05, -0.05, +0.01: the interval contains 0
    mixed = {"A": [b + d for b, d in zip(base, (0.05, -0.05, 0.01))], "B": base}
    assert paired("A", "B", "", mixed).verdict == "not resolved at this budget"
    one = {"A": [0.9], "B": [0.1]}
    assert paired("A", "B", "", one).verdict == "not resolved at this budget"  # one seed decides nothing
    two = {"A": [0.8, 0.9], "B": [0.7, 0.8]}  # equal differences: a zero-width interval from two seeds
    q = paired("A", "B", "", two)
    assert q.diff.half == pytest.approx(0.0) and q.verdict == "not resolved at this budget"
    with pytest.raises(ValueError, match="same seeds"):
        paired("A", "B", "", {"A": [0.1, 0.2], "B": [0.1]})


def test_comparisons_only_between_methods_that_ran():
    pairs = {(a, b) for a, b, _ in comparisons(["FedAvg", "FedVPT", "pFedPG", "Local"])}
    assert pairs == {("pFedPG", "FedVPT"), ("pFedPG", "FedAvg"), ("FedVPT", "FedAvg")}
    assert comparisons(["Local"]) == []
