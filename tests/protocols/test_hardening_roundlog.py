"""Issue 27, the round log against the checkpoint: after any interruption a resumed engine's log holds every round
exactly once (the checkpoint's history is the oracle), a torn last line written by someone else is dropped instead
of breaking every later read, and a bad line is named by file and line number."""

from __future__ import annotations

import json

import pytest
from test_hardening_checkpoint import fed

from fedpeft.protocols import RoundLog, load_checkpoint


def _rounds(path):
    return [row["round"] for row in RoundLog.read(path)]


def test_a_kill_between_the_log_line_and_the_checkpoint_never_duplicates_a_round(tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "rounds.jsonl"
    first = fed("FedVPT", ckpt, round_log=RoundLog(log, tensorboard=False))
    first.run(2)
    del first
    # what main's order (log line, then checkpoint) left when killed in between: round 2 logged, not checkpointed
    with open(log, "a") as f:
        f.write(json.dumps({"round": 2, "participants": [0, 1, 2]}) + "\n")
    again = fed("FedVPT", ckpt, round_log=RoundLog(log, append=True, tensorboard=False))
    assert _rounds(log) == [0, 1]  # the log is the checkpoint's history again
    again.run(1)
    assert _rounds(log) == [0, 1, 2]  # main: [0, 1, 2, 2]
    assert RoundLog.read(log) == load_checkpoint(ckpt).meta["history"]


def test_a_resumed_engine_with_a_fresh_log_object_keeps_the_earlier_rounds(tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "rounds.jsonl"
    first = fed("FedVPT", ckpt, round_log=log)
    first.run(2)
    del first
    again = fed("FedVPT", ckpt, round_log=log)  # main: RoundLog(path) emptied the log of the resumed run
    again.run(1)
    assert _rounds(log) == [0, 1, 2]


def test_a_torn_last_line_is_dropped_before_appending(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"round": 0}\n{"round": 1, "partici')
    log = RoundLog(path, append=True, tensorboard=False)
    log.append({"round": 1})
    assert RoundLog.read(path) == [{"round": 0}, {"round": 1}]  # main: JSONDecodeError from then on


def test_a_bad_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"round": 0}\nnot json\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON line"):
        RoundLog.read(path)
    path.write_text('{"round": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=f"{path}:2: expected a JSON object"):
        RoundLog.read(path)


class _BadNumbers:
    """A user's trainer that reports a NaN loss and an accuracy of 7.5 (and trains nothing: the upload is fine)."""

    def __call__(self, model, data, task):
        return float("nan")

    def evaluate(self, model, data):
        return 7.5


def test_non_finite_or_out_of_range_metrics_never_reach_the_in_process_record_or_log(tmp_path):
    from protocol_models import client_data, model_for

    from fedpeft.protocols import Federation

    log = tmp_path / "rounds.jsonl"
    f = Federation("FedVPT", model_for("FedVPT"), client_data(3, n=12, seed=1), test_data=client_data(3, n=12, seed=2),
                   trainer=_BadNumbers(), round_log=RoundLog(log, tensorboard=False))
    rec = f.run(1)[0]
    assert rec.server.accepted == [0, 1, 2]
    assert rec.train_loss == {} and rec.after_local == {} and rec.deployed == [None, None, None]  # main: nan, 7.5
    (row,) = RoundLog.read(log)
    assert row["train_loss"] == {} and row["after_local"] == {} and row["deployed"] == [None, None, None]
