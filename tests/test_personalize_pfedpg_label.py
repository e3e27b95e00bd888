"""The benchmark's pFedPG line and labels (``benchmarks/_personalize/report.py``) against hand-computed retention:
while pFedPG's server keeps less than a tenth of each round, its claims read "not testable at this budget"."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _personalize.report import Summary, format_pfedpg, format_verdicts, summary_json

SEEDS, ROUNDS, CLIENTS = [0, 1, 2, 3, 4], 3, 2


def _records(after: float):
    """pFedPG 5 points below FedVPT on every seed; every round the fit takes ‖gen(n) − P̃ₙ‖ from 4 to ``after`` (client
    0) and from 2 to 2·``after``/4 (client 1): retention 1 − after/4 for both."""
    records = {}
    for s in SEEDS:
        for m, acc in (("pFedPG", 0.60 + 0.01 * s), ("FedVPT", 0.65 + 0.01 * s)):
            curve = [[acc] * CLIENTS for _ in range(ROUNDS)]
            diag = {"dist_before": [4.0, 2.0], "dist_after": [after, after / 2], "trained_norm": [5.0, 5.0],
                    "spread": 0.1, "steps": 7}
            records[(s, m)] = {"deployed": curve, "local": curve, "train_loss": [], "wall_s": 1.0, "cpu_s": 1.0,
                               "flops": {"total": 1e9}, "trainable": 1, "communicated": 1, "server_params": 0,
                               "server": [{"diagnostics": diag if m == "pFedPG" else {}} for _ in range(ROUNDS)]}
    return records


@pytest.mark.parametrize("after,testable", [(3.96, False), (2.0, True)])
def test_pfedpg_claims_are_not_testable_while_retention_is_low(after, testable):
    s = Summary(_records(after), SEEDS, ["pFedPG", "FedVPT"], last_rounds=3)
    retention = 1 - after / 4  # 1 % or 50 %
    assert s.pfedpg["retention"] == pytest.approx(retention)
    assert s.pfedpg["retention_at"] == pytest.approx([retention] * 3)
    assert s.pfedpg["residual"] == pytest.approx((after / 5 + after / 2 / 5) / 2)
    text = format_verdicts(s)
    line = next(ln for ln in text.splitlines() if "pFedPG > FedVPT" in ln)
    claim = next(c for c in summary_json(s)["primary"] if c["a"] == "pFedPG")
    if testable:
        assert "does not hold" in line and claim["verdict"] == "does not hold"
    else:
        assert "not testable at this budget (retention 1%)" in line
        assert claim["verdict"] == "not testable at this budget (retention 1%)"
    server_line = format_pfedpg(s.pfedpg, "default", 0.0)
    assert f"retention {100 * retention:.3g}%" in server_line and "7 steps per round" in server_line
