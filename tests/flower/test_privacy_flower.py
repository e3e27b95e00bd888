"""User-level DP on Flower: the same seeded noise, clipping and ε as the in-process engine, on a one-thread runtime
(``LocalGrid``) and on Flower's simulation (Ray), a resumed simulation continuing ε; the run-config keys.

Oracle: the in-process engine (``fedpeft.protocols.Federation``) run without interruption.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_harness import flower_task  # noqa: F401  (autouse fixture)
from flower_worlds import oracle, world
from flwr.app import Array

from fedpeft.flower.server import _privacy
from fedpeft.flower.wire import ARRAYS, CLIP_NORM, CONFIG
from fedpeft.protocols import Privacy, RoundLog, load_checkpoint

pytest.importorskip("dp_accounting")

DP = Privacy(clip_norm=0.05, noise_multiplier=0.8)
ROOT = Path(__file__).resolve().parents[2]


def _server_state(server):
    return server.generator.state_dict() if hasattr(server, "generator") else server.shared


@pytest.mark.parametrize("method", ["FedVPT", "pFedPG"])
def test_private_flower_round_equals_the_in_process_engine_bit_for_bit(method):
    w = world(method, fraction=0.67, privacy=DP)
    w.strategy.start(w.grid, num_rounds=3, timeout=10)
    ref = oracle(method, fraction=0.67, privacy=DP)
    ref.run(3)
    for got, want in zip(w.strategy.history, ref.history, strict=True):
        assert got.participants == want.participants and got.deployed == want.deployed
        assert got.train_loss == want.train_loss and got.server.privacy == want.server.privacy
    assert [r.server.privacy["rounds"] for r in w.strategy.history] == [1, 2, 3]
    mine, theirs = _server_state(w.strategy.server), _server_state(ref.server)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    trains = [m for m in w.grid.log if m.metadata.message_type == "train"]
    want_clip = DP.clip_norm if method == "FedVPT" else None  # pFedPG clips gradients on the server
    assert trains and all(m.content[CONFIG].get(CLIP_NORM) == want_clip for m in trains)


def test_a_node_that_skips_the_clipping_is_refused_by_the_server():
    w = world("FedVPT", privacy=DP)

    def tamper(node, reply):
        if w.partition_of(node) == 1 and ARRAYS in reply.content:
            arrays = reply.content[ARRAYS]
            for k in list(arrays.keys()):
                arrays[k] = Array(arrays[k].numpy() * 0 + 1e3)  # an update of norm far above C
        return reply

    w.grid.tamper = tamper
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    record = w.strategy.history[0]
    assert record.server.accepted == [0, 2]
    assert [r.client_id for r in record.server.rejected] == [1] and "clip_norm" in record.server.rejected[0].reason


def test_run_config_keys_turn_privacy_on_and_bad_ones_name_the_key():
    opt = {"dp_clip_norm": 0.5, "dp_noise_multiplier": 1.2, "dp_delta": 1e-6}
    _privacy(opt)
    assert opt == {"privacy": Privacy(0.5, 1.2, delta=1e-6)}
    opt = {"dp_clip_norm": None, "dp_noise_multiplier": None, "dp_delta": None}
    _privacy(opt)
    assert opt == {}
    for bad, name in (({"dp_clip_norm": 0.5}, "dp-noise-multiplier"), ({"dp_noise_multiplier": 1.0}, "dp-clip-norm"),
                      ({"dp_delta": 1e-5}, "dp-delta"), ({"dp_clip_norm": -1.0, "dp_noise_multiplier": 1.0},
                                                          "clip_norm")):
        with pytest.raises(ValueError, match=f"^{name}"):
            _privacy(dict(bad))


@pytest.mark.slow
def test_a_resumed_private_simulation_continues_epsilon_and_noise_of_the_in_process_run(tmp_path):
    pytest.importorskip("ray")
    child = Path(__file__).with_name("sim_child.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    dp = f"{DP.clip_norm},{DP.noise_multiplier}"
    for rounds in (2, 3):  # 2 rounds, then the same folders with 3: resumes after round 2
        run = subprocess.run([sys.executable, str(child), "FedVPT", str(tmp_path), str(rounds), dp], env=env,
                             capture_output=True, text=True, timeout=420, start_new_session=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ref = oracle("FedVPT", privacy=DP)
    ref.run(3)
    logged = RoundLog.read(tmp_path / "rounds.jsonl")
    assert [r["round"] for r in logged] == [0, 1, 2]
    assert [r["privacy"] for r in logged] == [r.server.privacy for r in ref.history]
    assert [r["deployed"] for r in logged] == [r.deployed for r in ref.history]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["privacy"]["epsilon"] == ref.history[-1].server.privacy["epsilon"]
    ckpt = load_checkpoint(tmp_path / "ckpt")
    got = {k[len("server.shared."):]: v for k, v in ckpt.tensors.items() if k.startswith("server.shared.")}
    want = ref.server.shared
    assert got.keys() == want.keys() and all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want)
