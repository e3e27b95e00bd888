"""The round log: one complete JSON line per finished round, on disk as the round ends, surviving ``kill -9``.

Oracles: the engine's own in-memory history (each line must equal ``RoundRecord.as_dict()`` of that round), a real
subprocess killed with SIGKILL (every line in the file must parse and be complete), and a fake TensorBoard writer
recording what it is given (scalars computed by hand from the record).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from protocol_models import client_data, model_for

from fedpeft.protocols import Federation, LocalTrainer, Rejection, RoundLog, RoundRecord, ServerReport
from fedpeft.protocols import roundlog as roundlog_module

TRAINER = LocalTrainer(batch_size=6, lr=1e-2)
ROOT = Path(__file__).resolve().parents[2]


def test_every_round_is_one_line_equal_to_the_record(tmp_path):
    path = tmp_path / "run" / "rounds.jsonl"
    fed = Federation("FedVPT", model_for("FedVPT"), client_data(3), test_data=client_data(3, seed=1),
                     trainer=TRAINER, round_log=RoundLog(path, tensorboard=False))
    fed.run(1)
    assert RoundLog.read(path) == [json.loads(json.dumps(fed.history[0].as_dict()))]
    fed.run(2)
    rows = RoundLog.read(path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row, rec in zip(rows, fed.history):
        assert row["deployed"] == rec.deployed and row["accepted"] == rec.server.accepted == [0, 1, 2]
        assert row["train_loss"] == {str(c): v for c, v in rec.train_loss.items()}
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind
    assert [RoundRecord.from_dict(r) for r in rows] == fed.history  # a resumed run can rebuild its history


def test_rejections_are_a_list_so_unattributed_ones_never_overwrite_each_other():
    rec = RoundRecord(round=0, participants=[0, 1], server=ServerReport(
        accepted=[0], rejected=[Rejection(1, "non-finite"), Rejection("node 77", "a"), Rejection("node 78", "b")]))
    assert rec.as_dict()["rejected"] == [{"client_id": 1, "reason": "non-finite"},
                                         {"client_id": "node 77", "reason": "a"},
                                         {"client_id": "node 78", "reason": "b"}]


def test_append_keeps_a_resumed_log_and_a_new_log_starts_empty(tmp_path):
    path = tmp_path / "r.jsonl"
    log = RoundLog(path, tensorboard=False)
    log.append({"round": 0})
    RoundLog(path, append=True, tensorboard=False).append({"round": 1})
    assert [r["round"] for r in RoundLog.read(path)] == [0, 1]
    RoundLog(path, tensorboard=False)
    assert RoundLog.read(path) == []


def test_tensorboard_gets_the_round_scalars_when_installed(tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("closed",))

    monkeypatch.setattr(roundlog_module, "_summary_writer", lambda logdir: Writer(logdir))
    log = RoundLog(tmp_path / "r.jsonl")
    log.append(RoundRecord(round=3, participants=[0, 1], train_loss={0: 1.0, 1: 2.0}, deployed=[0.5, 0.25],
                           server=ServerReport(accepted=[0], rejected=[Rejection(1, "x")]), wall_s=2.0))
    log.close()
    got = {c[0]: c[1] for c in calls if len(c) == 3}
    assert calls[0] == ("dir", tmp_path / "r.jsonl.tb") and calls[-1] == ("closed",)
    assert got == {"accuracy/mean": 0.375, "accuracy/worst": 0.25, "accuracy/client_0": 0.5,
                   "accuracy/client_1": 0.25, "train_loss/mean": 1.5, "replies/accepted": 1.0,
                   "replies/rejected": 1.0, "wall_s": 2.0}
    assert {c[2] for c in calls if len(c) == 3} == {3}


def test_tensorboard_true_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(roundlog_module, "_summary_writer", lambda logdir: None)
    with pytest.raises(ImportError, match=r"fedpeft\[tensorboard\]"):
        RoundLog(tmp_path / "r.jsonl", tensorboard=True)
    assert RoundLog(tmp_path / "q.jsonl").writer is None  # the default just goes without


RUN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from protocol_models import client_data, model_for
    from fedpeft.protocols import Federation, LocalTrainer
    fed = Federation("FedVPT", model_for("FedVPT"), client_data(3), test_data=client_data(3, seed=1),
                     trainer=LocalTrainer(batch_size=6, lr=1e-2), round_log={path!r})
    fed.run(1000)
""")


def test_a_run_killed_after_round_two_keeps_rounds_one_and_two_complete(tmp_path):
    """A real process, killed with SIGKILL as soon as its log shows two rounds (it may be mid-write then)."""
    path = tmp_path / "rounds.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RUN.format(tests=str(ROOT / "tests"), path=str(path))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    data = path.read_bytes()
    assert data.endswith(b"\n")  # never half a line
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert len(rows) >= 2 and [r["round"] for r in rows] == list(range(len(rows)))
    for r in rows[:2]:
        assert r["participants"] == r["accepted"] == [0, 1, 2]
        assert len(r["deployed"]) == 3 and all(0.0 <= a <= 1.0 for a in r["deployed"])
        assert set(r["train_loss"]) == {"0", "1", "2"} and r["wall_s"] > 0
