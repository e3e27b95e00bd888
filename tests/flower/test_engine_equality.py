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
        [sys.executable, str(SCRIPT), "--smoke", "--methods", METHODS, "--fraction", "0.67", "--seed", "1",
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
    assert [m["name"] for m in flower["methods"]] == METHODS.split(",")
    for lm, fm in zip(local["methods"], flower["methods"]):
        assert fm["participants"] == lm["participants"]
        assert all(len(p) == 2 for p in fm["participants"])  # round(0.67 · 3) = 2 clients per round
        assert fm["accuracy"] == lm["accuracy"], fm["name"]
        assert fm["curve_clients"] == lm["curve_clients"], fm["name"]
        assert fm["curve_after_local"] == lm["curve_after_local"], fm["name"]
        assert fm["train_loss"] == lm["train_loss"], fm["name"]
        assert (fm["trainable"], fm["communicated"], fm["server"]) == (lm["trainable"], lm["communicated"],
                                                                      lm["server"])
