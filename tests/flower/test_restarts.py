"""Nodes that restart, leave, rejoin; a server that resumes from its checkpoint; hostile messages to the ClientApp.

Flower's runtime is ``LocalGrid`` (one thread, a Context per node id). A "restarted SuperNode" is what Flower makes of
one: a new node id with an empty ``context.state`` and the same ``node_config`` (its ``state-dir`` included). The
oracle is the in-process engine (``Federation``) run without any interruption: per-round deployed accuracies, training
losses and the server's tensors must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from flower_harness import flower_task, node_context  # noqa: F401  (autouse fixture)
from flower_worlds import NODE_IDS, SEED, build, oracle, world
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedpeft.flower import ProtocolStrategy, to_record
from fedpeft.flower.wire import ARRAYS, CONFIG, METHOD, ROUND
from fedpeft.flower.wire import SEED as SEED_KEY
from fedpeft.protocols import get as get_protocol

NEW_ID = 9_000_000_099


def _durable(w, tmp_path):
    for i, node in enumerate(list(w.grid.contexts)):
        w.grid.contexts[node].node_config["state-dir"] = str(tmp_path / f"node{i}")


def _restart(w, old, new=NEW_ID, keep_state_dir=True):
    """The SuperNode ``old`` is killed and started again: a new node id, an empty context.state."""
    cfg = dict(w.grid.contexts.pop(old).node_config)
    if not keep_state_dir:
        cfg.pop("state-dir", None)
    ctx = node_context(new, 0, 3)
    ctx.node_config = cfg
    w.grid.contexts[new] = ctx


def _same_as_oracle(records, fed, rounds):
    assert [r.deployed for r in records] == [r.deployed for r in fed.history[:rounds]]
    assert [r.train_loss for r in records] == [r.train_loss for r in fed.history[:rounds]]


@pytest.mark.parametrize("method", ["FedVPT", "pFedPG"])
def test_a_restarted_node_with_a_state_dir_rejoins_and_continues_bit_identically(tmp_path, method):
    w = world(method)
    _durable(w, tmp_path)
    killed = NODE_IDS[1]
    part = w.partition_of(killed)

    def after(rec):
        if rec.round == 1:  # killed after round 2 (0-based 1), restarted before round 3
            _restart(w, killed)

    w.strategy.book.on_round = after
    w.strategy.one_message = False  # on_round runs between two rounds' exchanges
    w.strategy.start(w.grid, num_rounds=4, timeout=10)
    h = w.strategy.history
    assert h[2].rejoined == [part] and h[2].restarted_without_state == [] and h[2].absent == []
    assert all(r.rejoined == [] for r in (h[0], h[1], h[3]))
    assert w.strategy.registry.node_of[part] == NEW_ID
    fed = oracle(method)
    fed.run(4)
    _same_as_oracle(h, fed, 4)
    assert all(r.server.accepted == [0, 1, 2] for r in h)


def test_a_restarted_node_without_state_is_flagged_and_starts_from_the_initial_values(tmp_path):
    w = world("FedVPT")
    killed = NODE_IDS[1]
    part = w.partition_of(killed)
    w.strategy.book.on_round = lambda rec: _restart(w, killed) if rec.round == 0 else None
    w.strategy.one_message = False  # on_round runs between two rounds' exchanges
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    rec = w.strategy.history[1]
    assert rec.rejoined == [part] and rec.restarted_without_state == [part]
    assert rec.as_dict()["restarted_without_state"] == [part]


def test_a_node_that_leaves_is_absent_in_every_later_round():
    w = world("FedVPT")
    gone = NODE_IDS[2]
    part = w.partition_of(gone)
    w.strategy.book.on_round = lambda rec: w.grid.contexts.pop(gone) if rec.round == 0 else None
    w.strategy.one_message = False  # on_round runs between two rounds' exchanges
    w.strategy.start(w.grid, num_rounds=3, timeout=10)
    h = w.strategy.history
    assert h[0].absent == [] and h[1].absent == [part] and h[2].absent == [part]
    assert all(part not in r.server.accepted and r.deployed[part] is None for r in h[1:])


def test_two_live_nodes_claiming_one_partition_the_newcomer_is_refused():
    w = world("FedVPT")
    holder = NODE_IDS[0]
    part = w.partition_of(holder)

    def twin(rec):
        if rec.round == 0:
            ctx = node_context(NEW_ID, 0, 3)
            ctx.node_config = dict(w.grid.contexts[holder].node_config)
            w.grid.contexts[NEW_ID] = ctx

    w.strategy.book.on_round = twin
    w.strategy.one_message = False  # on_round runs between two rounds' exchanges
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    assert w.strategy.registry.node_of[part] == holder  # the holder answered the probe
    assert f"partition-id {part} is already registered by node {holder}" in w.strategy.registry.refused[NEW_ID]
    assert w.strategy.history[1].rejoined == [] and w.strategy.history[1].server.accepted == [0, 1, 2]


def test_a_silent_holder_is_replaced_by_the_node_that_claims_its_partition():
    w = world("FedVPT")
    holder = NODE_IDS[0]
    part = w.partition_of(holder)

    def silent_twin(rec):
        if rec.round == 0:
            w.grid.late.add(holder)  # still listed by Flower, but its replies never come (a killed SuperNode)
            ctx = node_context(NEW_ID, 0, 3)
            ctx.node_config = dict(w.grid.contexts[holder].node_config)
            w.grid.contexts[NEW_ID] = ctx

    w.strategy.book.on_round = silent_twin
    w.strategy.one_message = False  # on_round runs between two rounds' exchanges
    w.strategy.probe_timeout = 0.1
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    assert w.strategy.registry.node_of[part] == NEW_ID and w.strategy.history[1].rejoined == [part]
    assert w.strategy.history[1].server.accepted == [0, 1, 2]


@pytest.mark.parametrize("method", ["FedPGP", "pFedPG"])
def test_server_resumed_from_its_checkpoint_is_bit_identical(tmp_path, method):
    ckpt = tmp_path / "ckpt"
    first = world(method)
    _durable(first, tmp_path)
    first.strategy.book.checkpoint_dir = ckpt
    first.strategy.start(first.grid, num_rounds=2, timeout=10)  # "killed" after round 2: only the files survive

    second = world(method)  # a new ServerApp process; the SuperNodes restarted too (new contexts, same folders)
    _durable(second, tmp_path)
    torch.manual_seed(SEED)
    second.strategy = ProtocolStrategy(get_protocol(method), build(method), num_partitions=3, seed=SEED,
                                       registration_timeout=1.0, checkpoint_dir=ckpt)
    second.strategy.start(second.grid, num_rounds=4, timeout=10)
    h = second.strategy.history
    assert [r.round for r in h] == [0, 1, 2, 3] and h[2].restarted_without_state == []
    assert second.strategy.run_id() == first.strategy.run_id()
    fed = oracle(method)
    fed.run(4)
    _same_as_oracle(h, fed, 4)
    got, want = second.strategy.server.state_dict()[0], fed.server.state_dict()[0]
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_node_that_lost_its_state_while_the_server_was_down_is_flagged_after_the_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = world("FedVPT")
    _durable(first, tmp_path)
    first.strategy.book.checkpoint_dir = ckpt
    first.strategy.start(first.grid, num_rounds=1, timeout=10)
    for f in (tmp_path / "node1").rglob("*.safetensors"):
        f.unlink()  # node 1's disk was wiped
    second = world("FedVPT")
    _durable(second, tmp_path)
    second.strategy = ProtocolStrategy("FedVPT", build("FedVPT"), num_partitions=3, seed=SEED,
                                       registration_timeout=1.0, checkpoint_dir=ckpt)
    second.strategy.start(second.grid, num_rounds=2, timeout=10)
    assert second.strategy.history[1].restarted_without_state == [second.partition_of(NODE_IDS[1])]
    assert second.strategy.history[1].rejoined == []


def test_resume_refuses_another_configuration(tmp_path):
    from fedpeft.protocols import CheckpointError

    w = world("FedVPT")
    w.strategy.book.checkpoint_dir = tmp_path
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    other = ProtocolStrategy("FedVPT", build("FedVPT"), num_partitions=3, seed=SEED + 1, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="has seed = 0, this run 1"):
        other.start(w.grid, num_rounds=2)


# ---- hostile messages to the ClientApp ------------------------------------------------------------------------------
def _msg(node, arrays, cfg):
    content = {ARRAYS: arrays}
    if cfg is not None:
        content[CONFIG] = ConfigRecord(cfg)
    return Message(RecordDict(content), node, MessageType.TRAIN, group_id="x")


def _good_shared():
    model = build("FedVPT")
    return {k: v.detach() for k, v in model.named_parameters() if k == "prompts"}


@pytest.mark.parametrize("case, match", [
    ("nan download", "non-finite values"),
    ("int64 download", "sent 'prompts' as torch.int64"),
    ("no config", "no config record"),
    ("negative round", "must be an integer >= 0, got -5"),
    ("float round", "must be an integer >= 0, got 1.5"),
])
def test_the_client_app_refuses_bad_messages_and_keeps_its_state(tmp_path, case, match):
    w = world("FedVPT")
    _durable(w, tmp_path)
    node = NODE_IDS[0]
    cfg = {ROUND: 0, SEED_KEY: 0, METHOD: "FedVPT"}
    (ok,) = w.grid.send_and_receive([_msg(node, to_record(_good_shared()), cfg)])
    assert not ok.has_error()
    state_file = next((tmp_path / "node0").rglob("*.safetensors"))
    before = state_file.read_bytes()
    shared = _good_shared()
    arrays = to_record(shared)
    cfg = {ROUND: 1, SEED_KEY: 0, METHOD: "FedVPT"}
    if case == "nan download":
        shared["prompts"] = shared["prompts"].clone()
        shared["prompts"][0, 0] = float("nan")
        arrays = to_record(shared)
    elif case == "int64 download":
        arrays = ArrayRecord({"prompts": Array(shared["prompts"].numpy().astype("int64"))})
    elif case == "no config":
        cfg = None
    elif case == "negative round":
        cfg[ROUND] = -5
    elif case == "float round":
        cfg[ROUND] = 1.5
    (reply,) = w.grid.send_and_receive([_msg(node, arrays, cfg)])
    assert reply.has_error() and match in reply.error.reason
    assert state_file.read_bytes() == before


def test_a_diverging_client_keeps_its_previous_state_and_is_flagged(tmp_path):
    w = world("FedVPT", nan_client=2)
    _durable(w, tmp_path)
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    for rec in w.strategy.history:
        assert rec.diverged == [2] and 2 not in rec.train_loss and rec.server.accepted == [0, 1]
        assert rec.deployed[2] == rec.deployed[2]  # a number: evaluated with its (initial) finite personal state
    assert not list((tmp_path / "node2").rglob("*.safetensors"))  # nothing NaN was ever stored
    fed = oracle("FedVPT", nan_client=2)
    fed.run(2)
    _same_as_oracle(w.strategy.history, fed, 2)
    assert [r.diverged for r in fed.history] == [[2], [2]]


def test_a_reply_claiming_more_examples_than_registered_is_refused():
    w = world("FedVPT")

    def inflate(node, reply):
        if w.partition_of(node) == 1 and reply.metadata.message_type == MessageType.TRAIN:
            reply.content.metric_records["metrics"]["num-examples"] = 10 ** 12
        return reply

    w.grid.tamper = inflate
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    rec = w.strategy.history[0]
    assert rec.server.accepted == [0, 2] and 1 not in rec.train_loss
    (why,) = [r.reason for r in rec.server.rejected if r.client_id == 1]
    assert "more than the 13 training examples the node registered with" in why
