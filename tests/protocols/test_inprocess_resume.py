"""The in-process engine killed mid-run (SIGKILL to its process) and resumed from its checkpoint is bit-identical to a
run that was never interrupted: every round record, every client's personal state, the server's tensors (pFedPG with
Adam: generator and optimizer moments)."""

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
from resume_child import federation

from fedpeft.protocols import CheckpointError, RoundLog, load_checkpoint

CHILD = Path(__file__).with_name("resume_child.py")
ROOT = Path(__file__).resolve().parents[2]


def _records(fed):
    return [{k: v for k, v in r.as_dict().items() if k != "wall_s"} for r in fed.history]


def _kill_after(ckpt: Path, method: str, rounds: int, after: int) -> int:
    """Start the child, SIGKILL it as soon as its checkpoint reaches round ``after``; the round it had reached."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(CHILD), method, str(ckpt), str(rounds)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = json.loads((ckpt / "checkpoint.json").read_text())["round"]
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= after:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return load_checkpoint(ckpt).round


@pytest.mark.parametrize("method", ["pFedPG", "FedPGP"])
def test_killed_after_round_2_of_4_and_resumed_is_bit_identical(tmp_path, method):
    ckpt = tmp_path / "ckpt"
    reached = _kill_after(ckpt, method, rounds=4, after=2)
    assert 2 <= reached < 4  # really interrupted
    resumed = federation(method, ckpt, round_log=tmp_path / "rounds.jsonl")  # a new engine, from the folders
    assert len(resumed.history) == reached
    resumed.run(4 - reached)
    resumed.round_log.close()

    oracle = federation(method)  # never interrupted, no checkpoint
    oracle.run(4)
    assert _records(resumed) == _records(oracle)
    got, want = resumed.server.state_dict(), oracle.server.state_dict()
    assert got[1] == want[1] and set(got[0]) == set(want[0])
    assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    if method == "pFedPG":
        assert any(".exp_avg" in k for k in want[0])  # Adam's moments were part of it
    for a, b in zip(resumed.personal, oracle.personal):
        assert all(torch.equal(a[k], b[k]) for k in b)
    again = load_checkpoint(ckpt)
    assert again.round == 4 and again.meta["history"] == [r.as_dict() for r in resumed.history]
    logged = RoundLog.read(tmp_path / "rounds.jsonl")  # every round exactly once, as the oracle ran it
    assert [r["round"] for r in logged] == [0, 1, 2, 3]
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in logged] == _records(oracle)


def test_resume_refuses_another_configuration(tmp_path):
    fed = federation("FedVPT", tmp_path)
    fed.run(1)
    from protocol_models import client_data, model_for
    from resume_child import TRAINER

    from fedpeft.protocols import Federation

    with pytest.raises(CheckpointError, match="has seed = 5, this run 6"):
        Federation("FedVPT", model_for("FedVPT"), client_data(3, n=12, seed=1), trainer=TRAINER, seed=6,
                   fraction=0.67, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="has method = 'FedVPT', this run 'FedPerfix'"):
        Federation("FedPerfix", model_for("FedPerfix"), client_data(3, n=12, seed=1), trainer=TRAINER, seed=5,
                   fraction=0.67, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="round must be the next round, 1, got 3"):
        fed.run_round(3)
