"""One message per node per round: round r's evaluation travels with round r+1's train message.

Oracles: the in-process engine (``Federation``: train, update, evaluate every round in a plain loop) and the same
strategy with ``one_message=False`` (a train exchange and an evaluate exchange per round, as Flower's strategies do);
message counts are read off the one-thread runtime's log.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from flower_harness import flower_task  # noqa: F401  (autouse fixture)
from flower_worlds import oracle, world

from fedpeft.flower.wire import DEPLOY, EVALUATION


def _same_records(a, b, flower_only=False):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.round == y.round and x.participants == y.participants
        assert x.deployed == y.deployed, (x.round, x.deployed, y.deployed)
        assert x.train_loss == y.train_loss and x.after_local == y.after_local
        if flower_only:  # the in-process engine does not track clients without personal state
            assert x.without_personal == y.without_personal and x.eval_dropped == y.eval_dropped
        assert x.server.accepted == y.server.accepted and x.server.diagnostics == y.server.diagnostics


def _per_round(log):
    """Counter of (group id, message type, carries a deployment) over the messages sent."""
    return Counter((m.metadata.group_id, m.metadata.message_type, DEPLOY in m.content.array_records) for m in log
                   if m.metadata.message_type in ("train", "evaluate"))


@pytest.mark.parametrize("method", ["FedVPT", "pFedPG", "FedAvg-FT"])
def test_one_message_per_round_gives_the_in_process_numbers(method):
    rounds = 3
    one = world(method)
    one.strategy.one_message = True
    one.strategy.start(one.grid, num_rounds=rounds, timeout=10)
    two = world(method)
    two.strategy.one_message = False  # two exchanges per round, as Flower's own strategies do
    two.strategy.start(two.grid, num_rounds=rounds, timeout=10)
    ref = oracle(method)
    ref.run(rounds)
    _same_records(one.strategy.history, ref.history)
    _same_records(two.strategy.history, ref.history)
    _same_records(one.strategy.history, two.strategy.history, flower_only=True)
    if method == "pFedPG":
        mine, theirs = one.strategy.server.generator.state_dict(), ref.server.generator.state_dict()
    else:
        mine, theirs = one.strategy.server.shared, ref.server.shared
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    # 3 nodes: one train message each per round, the earlier rounds' deployments inside them, and one evaluate
    # exchange after the last round; two exchanges per round without it
    assert _per_round(one.grid.log) == Counter({("1", "train", False): 3, ("2", "train", True): 3,
                                                ("3", "train", True): 3, ("3", "evaluate", False): 3})
    assert _per_round(two.grid.log) == Counter({(str(r), kind, False): 3 for r in (1, 2, 3)
                                                for kind in ("train", "evaluate")})


def test_partial_participation_sends_evaluate_only_to_nodes_not_training():
    rounds = 3
    w = world("FedVPT", fraction=0.34)  # one client trains per round, every client is evaluated
    w.strategy.one_message = True
    w.strategy.start(w.grid, num_rounds=rounds, timeout=10)
    ref = oracle("FedVPT", fraction=0.34)
    ref.run(rounds)
    _same_records(w.strategy.history, ref.history)
    two = world("FedVPT", fraction=0.34)
    two.strategy.one_message = False
    two.strategy.start(two.grid, num_rounds=rounds, timeout=10)
    _same_records(w.strategy.history, two.strategy.history, flower_only=True)
    assert len(w.strategy.history[0].without_personal) == 2  # one client trained in round 1
    sent = _per_round(w.grid.log)
    for r in (2, 3):  # round r carries round r-1's evaluation: 1 train message with it, 2 evaluate messages
        assert sent[(str(r), "train", True)] == 1
        assert sent[(str(r - 1), "evaluate", False)] == 2  # an evaluate message keeps its own round's group id
    assert sent[("3", "evaluate", False)] == 3 and sum(sent.values()) == 3 + 2 * 2 + 3


def test_a_node_failing_in_the_merged_message_loses_its_evaluation_with_a_reason():
    w = world("FedVPT")
    w.strategy.one_message = False
    w.strategy.start(w.grid, num_rounds=1, timeout=10)  # round 1 closes normally
    w2 = world("FedVPT")
    w2.strategy.one_message = True
    calls = {"n": 0}
    handlers = w2.grid.app._registered_funcs

    def failing_train(msg, context):  # partition 1 fails in round 2 (whose message carries round 1's evaluation)
        if int(context.node_config["partition-id"]) == 1 and DEPLOY in msg.content.array_records:
            calls["n"] += 1
            raise RuntimeError("disk full")
        return train(msg, context)

    train = handlers["train.default"]
    handlers["train.default"] = failing_train
    w2.strategy.start(w2.grid, num_rounds=2, timeout=10)
    assert calls["n"] == 1
    first, second = w2.strategy.history
    assert first.deployed[1] is None and [r.client_id for r in first.eval_dropped] == [1]
    assert "disk full" in first.eval_dropped[0].reason
    assert first.deployed[0] == w.strategy.history[0].deployed[0]  # the others' evaluation is unchanged
    assert 1 not in second.server.accepted


def test_the_train_reply_carries_the_evaluation_of_the_previous_round():
    w = world("FedVPT")
    replies = []

    def keep(node, reply):
        replies.append(reply)
        return reply

    w.grid.tamper = keep
    w.strategy.one_message = True
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    carrying = [r for r in replies if EVALUATION in r.content.metric_records]
    assert len(carrying) == 3
    accs = {int(r.content[EVALUATION]["partition-id"]): r.content[EVALUATION]["accuracy"] for r in carrying}
    assert [accs[p] for p in range(3)] == w.strategy.history[0].deployed


def test_discovery_replies_register_the_nodes_without_a_second_query():
    from fedpeft.flower.registry import discover_partitions

    w = world("FedVPT")
    answered = []
    assert discover_partitions(w.grid, timeout=5, replies=answered) == 3
    w.strategy.registry.add(answered)
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    queries = [m for m in w.grid.log if m.metadata.message_type == "query"]
    assert len(queries) == 3 and {m.metadata.group_id for m in queries} == {"discover"}
    assert sorted(w.strategy.registry.node_of) == [0, 1, 2] and w.strategy.history[0].server.accepted == [0, 1, 2]
