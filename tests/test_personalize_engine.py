"""The benchmark's in-process engine on the library protocols: new baselines, ``--fraction``, the new JSON fields.

Expected parameter counts come from the run's configuration by explicit arithmetic; participation from the documented
sampling rule (k = max(1, round(fraction · C)) clients per round).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "personalize.py"
METHODS = ["SingleSet-VPT", "FedRep", "FedAvg-FT", "pFedPG", "FedVPT"]


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--cache", str(out / "cache"), "--seeds", "2",
         "--methods", ",".join(METHODS), "--fraction", "0.67"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads((out / "personalize_domain.json").read_text())
    # one record per (seed, method) run: name the fields as this test reads them
    payload["methods"] = [{**r, "name": r["method"], "curve_after_local": r["local"], "server_log": r["server"],
                           "curve_clients": r["deployed"]} for r in payload["runs"]]
    return payload


def test_partial_participation_and_the_per_round_fields(payload):
    rounds = payload["config"]["budget"]["rounds"]
    C = len(payload["clients"])
    assert payload["config"]["budget"]["fraction"] == 0.67
    for m in payload["methods"]:
        assert len(m["participants"]) == rounds
        for r in range(rounds):
            ids = m["participants"][r]
            assert len(ids) == round(0.67 * C) and ids == sorted(set(ids))
            after = m["curve_after_local"][r]
            assert [c for c in range(C) if after[c] is not None] == ids
            assert all(0.0 <= after[c] <= 1.0 for c in ids)
            assert [c for c in range(C) if m["train_loss"][r][c] is not None] == ids
            assert m["server_log"][r]["accepted"] == ids and m["server_log"][r]["rejected"] == []
        assert len(m["curve_clients"]) == rounds and all(len(row) == C for row in m["curve_clients"])
        # every method sees the same sample of clients in the same round
        assert m["participants"] == payload["methods"][0]["participants"]


def test_pfedpg_logs_its_server_step(payload):
    (m,) = [m for m in payload["methods"] if m["name"] == "pFedPG"]
    for r, log in enumerate(m["server_log"]):
        d = log["diagnostics"]
        assert d["clients"] == m["participants"][r]
        for key in ("dist_before", "dist_after", "trained_norm", "generated_norm"):
            assert len(d[key]) == len(d["clients"]) and all(v >= 0 for v in d[key])
        assert d["spread"] >= 0


def test_communication_of_the_new_baselines(payload):
    cfg = payload["config"]
    K, D, classes = cfg["budget"]["num_prompts"], cfg["backbone"]["embed_dim"], 10
    rows = {m["name"]: m for m in payload["methods"]}
    head = D * classes + classes
    assert rows["SingleSet-VPT"]["communicated"] == 0 and rows["SingleSet-VPT"]["trainable"] == K * D + head
    total = rows["FedAvg-FT"]["trainable"]
    assert rows["FedAvg-FT"]["communicated"] == total
    assert rows["FedRep"]["communicated"] == total - head and rows["FedRep"]["personal_keys"] == ["head.bias",
                                                                                                   "head.weight"]
    assert rows["pFedPG"]["communicated"] == K * D
