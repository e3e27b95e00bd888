"""``benchmarks/personalize.py --engine flower`` (Flower's Ray simulation) against ``--engine local``: identical.

One Flower run (one Ray start) for FedVPT, pFedPG, FedPerfix and FedPGP with partial participation (``--fraction
0.67``: 2 of 3 clients per round); the oracle is the in-process engine run as a separate script. Equal per-client
accuracies alone would be a weak check on a smoke run, so every per-client training loss (a float that any change in
data, batch order, initial state or aggregate would move) is compared too, exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "personalize.py"
METHODS = "FedVPT,pFedPG,FedPerfix,FedPGP"


def _run(tmp: Path, engine: str) -> dict:
    out = tmp / engine
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--methods", METHODS, "--fraction", "0.67", "--seeds", "1",
         "--engine", engine, "--out", str(out), "--cache", str(tmp / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "personalize_domain.json").read_text())


@pytest.mark.slow
def test_flower_simulation_gives_the_local_engines_per_client_results(tmp_path):
    local = _run(tmp_path, "local")  # also builds the cached backbone the Flower run reuses
    flower = _run(tmp_path, "flower")
    import flwr

    assert local["engine"] == {"name": "local"}
    assert flower["engine"] == {"name": "flower", "flwr": flwr.__version__}
    runs = {"local": {r["method"]: r for r in local["runs"]}, "flower": {r["method"]: r for r in flower["runs"]}}
    assert list(runs["flower"]) == METHODS.split(",")
    for name in METHODS.split(","):
        lm, fm = runs["local"][name], runs["flower"][name]
        assert fm["participants"] == lm["participants"]
        assert all(len(p) == 2 for p in fm["participants"])  # round(0.67 · 3) = 2 clients per round
        assert fm["deployed"] == lm["deployed"], name
        assert fm["local"] == lm["local"], name
        assert fm["train_loss"] == lm["train_loss"], name
        assert (fm["trainable"], fm["communicated"], fm["server_params"]) == (lm["trainable"], lm["communicated"],
                                                                             lm["server_params"])
    # the aggregate the table prints: every accuracy interval and verdict equal (costs, wall and CPU time, differ)
    assert flower["summary"]["exploratory"] == local["summary"]["exploratory"]
    assert flower["summary"]["primary"] == local["summary"]["primary"]
    for lm, fm in zip(local["summary"]["methods"], flower["summary"]["methods"]):
        assert {k: v for k, v in fm.items() if isinstance(v, dict)} == {k: v for k, v in lm.items() if isinstance(v, dict)}
