"""Issue 27, what a hostile node can send the server: registrations that crashed the strategy or let one node become
the whole aggregate, a ``num-partitions`` that killed the ServerApp, reply metrics that went unscreened into the
record, the log and the report.

Oracles: the partitions the tamper hook leaves alone must run as if the hostile node were absent (explicit lists),
and the numbers that reach a record are the ones a well-behaved node sends.
"""

from __future__ import annotations

import math

import pytest
import torch
from flower_harness import flower_task, node_context  # noqa: F401  (autouse fixture)
from flower_worlds import NODE_IDS, SEED, build, world
from flwr.app import MessageType

from fedpeft.flower import ProtocolStrategy
from fedpeft.flower.registry import discover_partitions
from fedpeft.protocols import RoundLog

HOSTILE = 1  # the partition whose node misbehaves


def _registration(w, value, *, key="num-examples", also_train=None):
    """Tamper the query replies of partition HOSTILE: ``key`` set to ``value`` (``...``: removed); with
    ``also_train``, its train replies then claim ``also_train`` examples."""
    def tamper(node, reply):
        if w.partition_of(node) != HOSTILE:
            return reply
        metrics = reply.content.metric_records["metrics"]
        if reply.metadata.message_type == MessageType.QUERY:
            if value is ...:
                del metrics[key]
            else:
                metrics[key] = value
        elif reply.metadata.message_type == MessageType.TRAIN and also_train is not None:
            metrics["num-examples"] = also_train
        return reply

    w.grid.tamper = tamper


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), [1, 2], 0, -5, ..., 2.5])
def test_a_bad_num_examples_at_registration_refuses_that_node_and_the_run_goes_on(value):
    w = world("FedVPT")
    _registration(w, value)
    w.strategy.start(w.grid, num_rounds=1, timeout=10)  # main: int(nan) raised out of start()
    hostile = next(n for n in NODE_IDS[:3] if w.partition_of(n) == HOSTILE)
    assert "num-examples" in w.strategy.registry.refused[hostile]
    assert w.strategy.history[0].server.accepted == [0, 2]


@pytest.mark.parametrize("registered", [0, -5, ...])
def test_the_weight_cap_cannot_be_bypassed_by_registering_no_examples(registered):
    w = world("FedVPT")
    _registration(w, registered, also_train=1e300)  # main: registered, then its 1e300 reply was the whole aggregate
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    assert all(r.server.accepted == [0, 2] for r in w.strategy.history)


def test_a_node_joining_mid_run_with_nan_examples_does_not_kill_the_federation():
    w = world("FedVPT")
    late = NODE_IDS[2]
    late_ctx = w.grid.contexts.pop(late)  # partition 2's node comes after round 1
    part = int(late_ctx.node_config["partition-id"])

    def join(rec):
        if rec.round == 0:
            w.grid.contexts[late] = late_ctx

    def tamper(node, reply):
        if node == late and reply.metadata.message_type == MessageType.QUERY:
            reply.content.metric_records["metrics"]["num-examples"] = float("nan")
        return reply

    w.strategy.book.on_round, w.grid.tamper = join, tamper
    w.strategy.one_message = False  # on_round runs between two rounds' exchanges
    w.strategy.start(w.grid, num_rounds=3, timeout=10)  # main: ValueError at round 2
    assert [len(r.server.accepted) for r in w.strategy.history] == [2, 2, 2]
    assert part not in w.strategy.history[2].server.accepted and "num-examples" in w.strategy.registry.refused[late]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -3, 2.5])
def test_discover_partitions_ignores_a_node_reporting_a_bad_num_partitions(value):
    w = world("FedVPT")

    def tamper(node, reply):
        if w.partition_of(node) == HOSTILE:
            reply.content.metric_records["metrics"]["num-partitions"] = value
        return reply

    w.grid.tamper = tamper
    assert discover_partitions(w.grid, timeout=5, poll=0.01) == 3  # main: int(nan) killed the ServerApp


@pytest.mark.parametrize("loss, accuracy", [(float("nan"), 0.5), (float("inf"), 7.5), (1.0, -0.1),
                                            (1.0, float("nan"))])
def test_non_finite_or_out_of_range_reply_metrics_never_reach_the_record_or_the_log(tmp_path, loss, accuracy):
    w = world("FedVPT")
    torch.manual_seed(SEED)
    w.strategy = ProtocolStrategy("FedVPT", build("FedVPT"), num_partitions=3, seed=SEED, registration_timeout=1.0,
                                  round_log=RoundLog(tmp_path / "rounds.jsonl", tensorboard=False))

    def tamper(node, reply):
        if w.partition_of(node) == HOSTILE and reply.metadata.message_type == MessageType.TRAIN:
            reply.content.metric_records["metrics"]["loss"] = loss
            reply.content.metric_records["metrics"]["accuracy"] = accuracy
        return reply

    w.grid.tamper = tamper
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    rec = w.strategy.history[0]
    assert rec.server.accepted == [0, 1, 2]  # the upload itself is fine
    good_loss, good_acc = math.isfinite(loss), math.isfinite(accuracy) and 0 <= accuracy <= 1
    assert (HOSTILE in rec.train_loss) == good_loss and (HOSTILE in rec.after_local) == good_acc
    assert (rec.train_loss.get(HOSTILE), rec.after_local.get(HOSTILE)) == (loss if good_loss else None,
                                                                           accuracy if good_acc else None)
    (row,) = RoundLog.read(tmp_path / "rounds.jsonl")
    numbers = list(row["train_loss"].values()) + list(row["after_local"].values())
    assert all(isinstance(v, float) and math.isfinite(v) for v in numbers)
    assert all(0 <= v <= 1 for v in row["after_local"].values())
