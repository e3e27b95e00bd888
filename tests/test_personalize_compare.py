"""``benchmarks/compare_runs.py``: two runs' JSON compared by hand-built payloads whose answer is known."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_runs.py"


def _payload():
    runs = [{"seed": s, "method": m, "deployed": [[0.5, 0.6], [0.7, 0.8]], "local": [[None, None], [0.7, 0.9]],
             "train_loss": [[1.0, 0.9], [0.5, 0.4]]} for s in (0, 1) for m in ("Local", "FedVPT")]
    methods = [{"name": m, "deployed": {"mean": 0.75, "ci95": 0.02}, "local": {"mean": 0.8, "ci95": 0.01}}
               for m in ("Local", "FedVPT")]
    primary = [{"a": "FedVPT", "b": "Local", "verdict": "holds", "p_holm": 0.01}]
    return {"clients": ["c0", "c1"], "runs": runs,
            "summary": {"methods": methods, "primary": primary, "regime": {"go": False}}}


def _compare(tmp_path, a, b):
    for name, payload in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "personalize_domain.json").write_text(json.dumps(payload))
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=60)


def test_identical_runs_exit_0_and_count_the_rows(tmp_path):
    proc = _compare(tmp_path, _payload(), _payload())
    assert proc.returncode == 0, proc.stderr
    # 4 runs x (2 deployed rows + 1 measured local row); the all-None local row is an unmeasured round
    assert "4 of 4 (seed, method) runs bit-identical" in proc.stdout and "12 round-rows" in proc.stdout
    assert "primary verdicts that differ: 0 of 1" in proc.stdout


def test_one_changed_accuracy_a_moved_mean_and_a_flipped_verdict_are_reported(tmp_path):
    b = _payload()
    b["runs"][3]["deployed"][1][0] = 0.71  # seed 1, FedVPT, round 2, client 0
    b["summary"]["methods"][1]["deployed"]["mean"] = 0.78  # 3 points: outside A's ± 2
    b["summary"]["primary"][0].update(verdict="not resolved at this budget", p_holm=0.2)
    proc = _compare(tmp_path, _payload(), b)
    assert proc.returncode == 1, proc.stderr
    assert "3 of 4 (seed, method) runs bit-identical" in proc.stdout and "differ: 1 runs, of FedVPT" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("FedVPT") and "deployed" in line)
    assert row.split()[-2:] == ["+3.00", "NO"]
    assert "FedVPT > Local: holds (Holm p 0.01) -> not resolved at this budget (Holm p 0.2)" in proc.stdout


def test_a_round_measured_by_one_run_only_is_skipped_not_a_difference(tmp_path):
    b = _payload()
    for r in b["runs"]:
        r["deployed"][0] = [None, None]  # --eval-every: round 1 not measured
    proc = _compare(tmp_path, _payload(), b)
    assert proc.returncode == 0 and "(4 rows measured by one run only, skipped)" in proc.stdout


def test_other_jobs_are_not_comparable(tmp_path):
    b = copy.deepcopy(_payload())
    b["runs"] = b["runs"][:3]
    proc = _compare(tmp_path, _payload(), b)
    assert proc.returncode == 2 and "not comparable" in proc.stderr


def test_a_missing_or_broken_run_file_exits_2_not_1(tmp_path):
    """1 means "the runs differ"; a run that cannot be read is a failure of its own, named on stderr."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "personalize_domain.json").write_text("{not json")
    for a in (tmp_path / "a", tmp_path / "missing"):
        proc = subprocess.run([sys.executable, str(SCRIPT), str(a), str(a)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "compare_runs:" in proc.stderr and proc.stdout == ""
