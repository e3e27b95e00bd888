"""Issue 27, a Flower server resuming from its checkpoint: another backbone, a malformed registry (refused before
anything changes), a second server on the folder (refused with the first one's pid and host), and the round log
holding every round exactly once after a kill between the checkpoint and the log line, or a ServerApp restart."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from flower_harness import flower_task  # noqa: F401  (autouse fixture)
from flower_worlds import SEED, build, world

from fedpeft.flower import ProtocolStrategy
from fedpeft.protocols import CheckpointError, RoundLog, load_checkpoint, save_checkpoint


def _strategy(ckpt, backbone_seed=SEED, **kw):
    torch.manual_seed(SEED)
    return ProtocolStrategy("FedVPT", build("FedVPT", backbone_seed), num_partitions=3, seed=SEED,
                            registration_timeout=1.0, checkpoint_dir=ckpt, **kw)


def _first(tmp_path, rounds=1, **kw):
    ckpt = tmp_path / "ckpt"
    w = world("FedVPT")
    w.strategy = _strategy(ckpt, **kw)
    w.strategy.start(w.grid, num_rounds=rounds, timeout=10)
    return w, ckpt


def test_a_checkpoint_of_another_backbone_with_the_same_shapes_is_refused(tmp_path):
    w, ckpt = _first(tmp_path)
    with pytest.raises(CheckpointError, match="frozen-sha256"):
        _strategy(ckpt, backbone_seed=SEED + 1, check_frozen=False).start(w.grid, num_rounds=2, timeout=10)


@pytest.mark.parametrize("registry", [{"x": {"last-trained": 0}}, {"7": {"last-trained": 0}},
                                      {"0": {"last-trained": "0"}}, {"0": {"last-trained": 5}}, []])
def test_a_malformed_registry_is_refused_before_anything_changes(tmp_path, registry):
    w, ckpt = _first(tmp_path)
    c = load_checkpoint(ckpt)
    c.meta["registry"] = registry
    save_checkpoint(ckpt, c)
    s = _strategy(ckpt)
    before = {k: v.clone() for k, v in s.server.state_dict()[0].items()}
    with pytest.raises(CheckpointError, match="registry"):  # main: a raw int() error, the server already loaded
        s.start(w.grid, num_rounds=2, timeout=10)
    after = s.server.state_dict()[0]
    assert s.history == [] and s.registry.last_trained == {}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_second_server_on_the_checkpoint_folder_is_refused_with_the_first_ones_pid(tmp_path):
    ckpt = tmp_path / "ckpt"
    w = world("FedVPT")
    w.strategy = _strategy(ckpt)
    refused = []

    def second_server(rec):
        if rec.round == 0:
            try:
                _strategy(ckpt).start(world("FedVPT").grid, num_rounds=3, timeout=10)
            except RuntimeError as e:
                refused.append(str(e))

    w.strategy.book.on_round = second_server  # called after round 1's checkpoint, while the first server runs
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    assert len(refused) == 1 and f"locked by pid {os.getpid()} on {socket.gethostname()}" in refused[0]
    assert load_checkpoint(ckpt).round == 2


def test_a_kill_between_the_checkpoint_and_the_log_line_never_loses_a_round(tmp_path):
    log = tmp_path / "rounds.jsonl"
    _, ckpt = _first(tmp_path, rounds=2, round_log=RoundLog(log, tensorboard=False))
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]))  # what main's order (checkpoint, then log) left when killed in between
    s = _strategy(ckpt, round_log=RoundLog(log, append=True, tensorboard=False))
    s.start(world("FedVPT").grid, num_rounds=3, timeout=10)
    assert [r["round"] for r in RoundLog.read(log)] == [0, 1, 2]  # main: [0, 2]
    assert RoundLog.read(log) == load_checkpoint(ckpt).meta["history"]


def test_a_restarted_server_with_a_fresh_log_object_keeps_the_earlier_rounds(tmp_path):
    log = tmp_path / "rounds.jsonl"
    _, ckpt = _first(tmp_path, rounds=2, round_log=log)
    _strategy(ckpt, round_log=log).start(world("FedVPT").grid, num_rounds=3, timeout=10)
    assert [r["round"] for r in RoundLog.read(log)] == [0, 1, 2]  # main: [2], the restart emptied the log
