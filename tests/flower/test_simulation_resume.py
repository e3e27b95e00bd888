"""Flower's simulation killed mid-run (SIGKILL to the whole process group: the driver, Ray and its actors) and started
again with the same checkpoint and node-state folders resumes and ends bit-identical to the in-process engine run
without any interruption (per-round deployed accuracies and training losses, the server's final tensors), with a round
log holding every round exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flower_worlds import oracle

from fedpeft.protocols import RoundLog, load_checkpoint

pytest.importorskip("ray")

CHILD = Path(__file__).with_name("sim_child.py")
ROOT = Path(__file__).resolve().parents[2]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}


def _group_alive(pgid: int):
    import psutil

    left = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return left


@pytest.mark.slow
def test_simulation_killed_after_round_2_of_4_resumes_bit_identically(tmp_path):
    pytest.importorskip("psutil")
    method = "pFedPG"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, str(CHILD), method, str(tmp_path), "4"], env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    reached = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reached = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())["round"]
            except (OSError, ValueError, KeyError):
                pass
            if reached >= 2:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver, the ServerApp thread, Ray and its actors
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(0.5)
    assert _group_alive(proc.pid) == []
    first = load_checkpoint(tmp_path / "ckpt")
    assert 2 <= first.round < 4

    again = subprocess.run([sys.executable, str(CHILD), method, str(tmp_path), "4"], env=_env(), capture_output=True,
                           text=True, timeout=300, start_new_session=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2, 3]
    fed = oracle(method)
    fed.run(4)
    assert [r["deployed"] for r in report["rounds"]] == [r.deployed for r in fed.history]
    assert [r["train_loss"] for r in report["rounds"]] == [r.as_dict()["train_loss"] for r in fed.history]
    logged = RoundLog.read(tmp_path / "rounds.jsonl")  # every round exactly once (kept on resume, not rewritten)
    assert [r["round"] for r in logged] == [0, 1, 2, 3]
    assert [r["deployed"] for r in logged] == [r.deployed for r in fed.history]
    ckpt = load_checkpoint(tmp_path / "ckpt")
    want = fed.server.state_dict()[0]
    got = {k[len("server."):]: v for k, v in ckpt.tensors.items() if k.startswith("server.")}
    assert ckpt.run == first.run  # resumed (a fresh start would have filed everything under a new run id)
    assert ckpt.round == 4 and set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
