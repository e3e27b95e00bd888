"""ProtocolStrategy (and its 0.1 aliases PersonalizedFedAvg, PFedPGStrategy) on a one-thread Flower runtime (``LocalGrid``): no Ray.

Oracles: the in-process engine (``fedpeft.protocols.Federation``, one model reused in a plain loop), weighted averages
written out by hand from the replies on the wire, and the generator's own forward pass for pFedPG's per-node prompts.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flower_harness import flower_task  # noqa: F401  (autouse fixture)
from flower_worlds import NODE_IDS, SEED, build, client_data, oracle, world
from flwr.app import Array, RecordDict

from fedpeft import fed
from fedpeft.flower import PersonalizedFedAvg, PFedPGStrategy
from fedpeft.flower.wire import ARRAYS, METRICS


def _recorder(w):
    """Keep every reply as it crossed the wire (round by round)."""
    seen = []

    def tamper(node, reply):
        seen.append((w.partition_of(node), reply))
        return reply

    w.grid.tamper = tamper
    return seen


def _rejected(record):
    """``{client: reason}`` of a round record's rejections (each client at most once in these tests)."""
    assert len({r.client_id for r in record.server.rejected}) == len(record.server.rejected)
    return {r.client_id: r.reason for r in record.server.rejected}


def _hand_average(replies):
    """Σ n_k·u_k / Σ n_k in float64 from (partition, reply) pairs: FedAvg written out."""
    total = sum(r.content[METRICS]["num-examples"] for _, r in replies)
    keys = replies[0][1].content[ARRAYS].keys()
    return {k: sum(r.content[METRICS]["num-examples"] * r.content[ARRAYS][k].numpy().astype(np.float64)
                   for _, r in replies) / total for k in keys}


@pytest.mark.parametrize("method", ["FedVPT", "FedPGP", "FedPerfix", "pFedPG"])
def test_flower_equals_the_in_process_engine_bit_for_bit(method):
    w = world(method)
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    ref = oracle(method)
    ref.run(2)
    for got, want in zip(w.strategy.history, ref.history):
        assert got.deployed == want.deployed and got.participants == want.participants
        assert got.server.accepted == want.server.accepted == [0, 1, 2]
        assert got.server.diagnostics == want.server.diagnostics and got.train_loss == want.train_loss
    if method == "pFedPG":
        mine, theirs = w.strategy.server.generator.state_dict(), ref.server.generator.state_dict()
    else:
        mine, theirs = w.strategy.server.shared, ref.server.shared
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_shared_state_is_the_weighted_average_of_the_replies_and_personal_keys_never_travel():
    w = world("FedVPT")
    seen = _recorder(w)
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    train = [(p, r) for p, r in seen if r.has_content() and ARRAYS in r.content.array_records]
    assert sorted(p for p, _ in train) == [0, 1, 2]
    for _, r in train:
        assert list(r.content[ARRAYS].keys()) == ["prompts"]  # never the head
    avg = _hand_average(train)
    np.testing.assert_allclose(w.strategy.server.shared["prompts"].numpy(), avg["prompts"], rtol=1e-6, atol=1e-7)
    # upload bytes per client: exactly fed.num_bytes of the shared part
    shared_bytes = fed.num_bytes(w.strategy.server.shared)
    assert w.strategy.history[0].upload_bytes == {0: shared_bytes, 1: shared_bytes, 2: shared_bytes}


def _corrupt(w, partition, fn):
    seen = []

    def tamper(node, reply):
        if w.partition_of(node) == partition and ARRAYS in reply.content.array_records:
            fn(reply.content[ARRAYS])
        seen.append((w.partition_of(node), reply))
        return reply

    w.grid.tamper = tamper
    return seen


@pytest.mark.parametrize("bad, reason", [
    ("nan", "non-finite"),
    ("extra_key", "head.weight"),
    ("wrong_shape", "shape"),
    ("wrong_dtype", "dtype"),
])
def test_a_bad_reply_is_dropped_with_its_reason_and_the_rest_is_averaged(bad, reason):
    w = world("FedVPT")

    def corrupt(arrays):
        p = arrays["prompts"].numpy()
        if bad == "nan":
            p = p.copy()
            p[0, 0, 0] = np.nan
            arrays["prompts"] = Array(p)
        elif bad == "extra_key":
            arrays["head.weight"] = Array(np.zeros((3, 32), dtype=np.float32))  # a leaked personal key
        elif bad == "wrong_shape":
            arrays["prompts"] = Array(np.zeros((1, 3, 32), dtype=np.float32))
        else:
            arrays["prompts"] = Array(p.astype(np.int32))

    seen = _corrupt(w, 1, corrupt)
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    report = w.strategy.history[0]
    assert report.server.accepted == [0, 2]
    assert reason in _rejected(report)[1]
    good = [(p, r) for p, r in seen if p != 1 and ARRAYS in r.content.array_records]
    np.testing.assert_allclose(w.strategy.server.shared["prompts"].numpy(), _hand_average(good)["prompts"], rtol=1e-6,
                               atol=1e-7)
    assert torch.isfinite(w.strategy.server.shared["prompts"]).all()


def test_a_nan_training_client_is_dropped():
    """Client 2 trains on NaN images: its prompts come back NaN; the aggregate is the others' average."""
    w = world("FedVPT", nan_client=2)
    seen = _recorder(w)
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    assert w.strategy.history[0].server.accepted == [0, 1]
    assert "non-finite" in _rejected(w.strategy.history[0])[2]
    good = [(p, r) for p, r in seen if p in (0, 1) and ARRAYS in r.content.array_records]
    np.testing.assert_allclose(w.strategy.server.shared["prompts"].numpy(), _hand_average(good)["prompts"], rtol=1e-6,
                               atol=1e-7)


def test_a_raising_client_is_dropped_and_when_every_reply_is_bad_the_state_is_untouched():
    data = client_data(3)

    def load_data(context):
        raise RuntimeError(f"no data on partition {context.node_config['partition-id']}")

    w = world("FedVPT", load_data=load_data)
    w.strategy.registry.add = _register_all(w)  # registration needs load_data too; register by node config
    before = {k: v.clone() for k, v in w.strategy.server.shared.items()}
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    report = w.strategy.history[0]
    assert report.server.accepted == [] and set(_rejected(report)) == {0, 1, 2}
    assert all("no data on partition" in why for why in _rejected(report).values())
    assert {r.client_id for r in report.eval_dropped} == {0, 1, 2} and report.deployed == [None, None, None]
    for k in before:
        assert torch.equal(w.strategy.server.shared[k], before[k])
    assert data  # the data exist; only loading fails


def _register_all(w):
    reg = w.strategy.registry

    def add(replies):
        for node, ctx in w.grid.contexts.items():
            pid = int(ctx.node_config["partition-id"])
            reg.partition_of[node], reg.node_of[pid], reg.num_examples[pid] = pid, node, 1
    return add


def test_partial_participation_is_seeded_and_reports_clients_without_personal_state():
    w = world("FedVPT", fraction=0.34)  # k = max(1, floor(0.34·3 + 0.5)) = 1 client per round
    w.strategy.start(w.grid, num_rounds=3, timeout=10)
    trained_so_far = set()
    for r, report in enumerate(w.strategy.history):
        sent = [m for m in w.grid.log if m.metadata.message_type == "train" and m.metadata.group_id == str(r + 1)]
        assert len(sent) == 1 == len(report.participants)
        trained_so_far |= set(report.participants)
        assert report.without_personal == sorted({0, 1, 2} - trained_so_far)
        accs = report.deployed
        assert None not in accs  # everyone is evaluated
        assert report.mean == pytest.approx(sum(accs) / 3)
    ref = oracle("FedVPT", fraction=0.34)
    ref.run(3)
    assert [h.participants for h in w.strategy.history] == [rec.participants for rec in ref.history]
    assert [h.deployed for h in w.strategy.history] == [rec.deployed for rec in ref.history]


def test_a_late_reply_is_dropped_and_the_node_keeps_its_newest_state():
    w = world("FedVPT")
    late_node = NODE_IDS[1]
    w.strategy.registry.register(w.grid, min_nodes=3, timeout=2.0)
    w.grid.late = {late_node}  # from now on its replies arrive after the round's timeout
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    for report in w.strategy.history:
        assert report.server.accepted == [0, 2]
        assert "no reply" in _rejected(report)[1]
    # the node did train both rounds and kept the newest personal state
    assert w.grid.contexts[late_node].state["fedpeft.FedVPT.meta"]["round"] == 1


def test_registration_refuses_duplicate_out_of_range_and_foreign_backbone_nodes():
    configs = [{"partition-id": 0, "num-partitions": 3}, {"partition-id": 0, "num-partitions": 3},
               {"partition-id": 7, "num-partitions": 10}, {"partition-id": 2, "num-partitions": 3}]
    w = world("pFedPG", node_configs=configs, backbone_seed={2: 99})
    with pytest.raises(RuntimeError, match="no node could be registered"):
        w.strategy.start(w.grid, num_rounds=1, timeout=1)
    reg = w.strategy.registry
    assert reg.node_of == {} and len(reg.refused) == 4
    assert "claimed by 2 nodes" in reg.refused[NODE_IDS[0]] and "claimed by 2 nodes" in reg.refused[NODE_IDS[1]]
    assert "outside [0, 3)" in reg.refused[NODE_IDS[2]]
    assert "frozen parameters" in reg.refused[NODE_IDS[3]]
    assert not [m for m in w.grid.log if m.metadata.message_type == "train"]  # nobody was trained


def test_registration_keeps_the_good_nodes():
    configs = [{"partition-id": 0, "num-partitions": 3}, {"partition-id": 1, "num-partitions": 3},
               {"partition-id": 2, "num-partitions": 3}]
    w = world("pFedPG", node_configs=configs, backbone_seed={1: 99})
    w.strategy.registry.register(w.grid, min_nodes=3, timeout=0.5, poll=0.05)
    assert w.strategy.registry.node_of == {0: NODE_IDS[0], 2: NODE_IDS[2]}
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    assert w.strategy.history[0].server.accepted == [0, 2]


def test_a_late_node_cannot_take_a_registered_partition():
    configs = [{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2}]
    w = world("FedVPT", num_clients=2, node_configs=configs)
    w.strategy.registry.register(w.grid, min_nodes=2, timeout=2.0)
    from flower_harness import node_context

    intruder = 9_000_000_099
    w.grid.contexts[intruder] = node_context(intruder, 1, 2)
    w.strategy.registry.register(w.grid, min_nodes=3, timeout=0.5, poll=0.01)
    assert w.strategy.registry.node_of == {0: NODE_IDS[0], 1: NODE_IDS[1]}
    assert "already registered" in w.strategy.registry.refused[intruder]


def test_pfedpg_sends_every_node_its_own_generated_prompts():
    w = world("pFedPG")
    gen0 = copy.deepcopy(w.strategy.server.generator)
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    sent = {w.partition_of(m.metadata.dst_node_id): torch.from_numpy(m.content[ARRAYS]["prompts"].numpy())
            for m in w.grid.log if m.metadata.message_type == "train"}
    assert sorted(sent) == [0, 1, 2]
    with torch.no_grad():
        for n, prompts in sent.items():
            torch.testing.assert_close(prompts, gen0(torch.tensor([n]))[0], rtol=1e-6, atol=1e-6)
    assert not torch.equal(sent[0], sent[1]) and not torch.equal(sent[1], sent[2])


def test_pfedpg_drops_a_nan_client_and_steps_on_the_others_only():
    """Oracle: SGD by hand on a copy of the generator, with only the finite replies: φ ← φ − α ∂/∂φ Σ_n ⟨gen(n),
    gen(n) − P̃_n⟩ (the pseudo-gradient P − P̃), the absent client's descriptor row unchanged."""
    w = world("pFedPG", nan_client=1)
    # the paper's plain SGD step (the default server is Adam; its oracle is tests/protocols/test_pfedpg_personalizes)
    w.strategy.server.optimizer = torch.optim.SGD(w.strategy.server.generator.parameters(), lr=1e-3)
    w.strategy.server.server_steps = 1
    seen = _recorder(w)
    gen = copy.deepcopy(w.strategy.server.generator)
    descriptors_before = gen.descriptors.detach().clone()
    lr = w.strategy.server.optimizer.param_groups[0]["lr"]
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    report = w.strategy.history[0]
    assert report.server.accepted == [0, 2] and "non-finite" in _rejected(report)[1]
    trained = {p: torch.from_numpy(r.content[ARRAYS]["prompts"].numpy()) for p, r in seen
               if ARRAYS in r.content.array_records and p in (0, 2)}
    ids = torch.tensor([0, 1, 2])
    generated = gen(ids)
    target = (generated[[0, 2]] - torch.stack([trained[0], trained[2]])).detach()
    (generated[[0, 2]] * target).sum().backward()
    with torch.no_grad():
        for p in gen.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    for (name, mine), theirs in zip(w.strategy.server.generator.named_parameters(), gen.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=name)
    after = w.strategy.server.generator.descriptors.detach()
    assert torch.equal(after[1], descriptors_before[1])  # the dropped client's row did not move (plain SGD)
    assert not torch.equal(after[0], descriptors_before[0])
    assert torch.isfinite(after).all()


def test_pfedpg_partial_participation_leaves_absent_descriptors_in_place():
    w = world("pFedPG", fraction=0.34)
    before = w.strategy.server.generator.descriptors.detach().clone()
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    (trained,) = w.strategy.history[0].participants
    after = w.strategy.server.generator.descriptors.detach()
    for n in range(3):
        assert torch.equal(after[n], before[n]) == (n != trained)


def test_strategy_argument_errors():
    model = build("FedVPT")
    with pytest.raises(ValueError, match="num_partitions"):
        PersonalizedFedAvg("FedVPT", model, num_partitions=0)
    with pytest.raises(ValueError, match="fraction_train"):
        PersonalizedFedAvg("FedVPT", model, num_partitions=2, fraction_train=0.0)
    with pytest.raises(TypeError, match="PFedPGStrategy"):
        PersonalizedFedAvg("pFedPG", build("pFedPG"), num_partitions=2)
    with pytest.raises(TypeError, match="PersonalizedFedAvg"):
        PFedPGStrategy("FedVPT", model, num_partitions=2)
    w = world("FedVPT")
    with pytest.raises(ValueError, match="evaluate_fn"):
        w.strategy.start(w.grid, num_rounds=1, evaluate_fn=lambda r, a: None)
    assert SEED == 0


def test_a_bf16_federation_equals_the_in_process_engine():
    """bf16 models: float32 on the wire, bf16 on both ends; the server's shared state stays bf16 and equals the
    in-process engine's bit for bit."""
    w = world("FedVPT", dtype=torch.bfloat16)
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    ref = oracle("FedVPT", dtype=torch.bfloat16)
    ref.run(2)
    assert w.strategy.server.shared["prompts"].dtype == torch.bfloat16
    assert torch.equal(w.strategy.server.shared["prompts"], ref.server.shared["prompts"])
    assert [h.deployed for h in w.strategy.history] == [r.deployed for r in ref.history]
    assert w.strategy.history[0].upload_bytes[0] == 2 * fed.num_bytes(ref.server.shared)  # float32 on the wire


def test_replies_are_matched_to_the_messages_sent_not_to_the_sender_node():
    """Flower's own error replies (e.g. "node unavailable") come from the SuperLink's node id: the reply is still
    attributed to the partition its message went to (by reply_to_message_id), and a reply to no message this round
    is a rejection of its own, not an overwrite of another's."""
    from flwr.app import Error, Message

    w = world("FedVPT")

    def tamper(node, reply):
        if w.partition_of(node) == 1 and ARRAYS in reply.content.array_records:  # partition 1's train reply
            failed = Message(Error(code=1, reason="node unavailable"), reply_to=reply)
            failed.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
            failed.metadata.__dict__["_src_node_id"] = 1  # the SuperLink, not the node
            return failed
        return reply

    w.grid.tamper = tamper
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    rec = w.strategy.history[0]
    assert rec.server.accepted == [0, 2]
    assert [(r.client_id, r.reason) for r in rec.server.rejected] == [(1, "the client failed: node unavailable")]

    # a reply that answers no message of this round: rejected under the sender's node id, the others untouched
    from fedpeft.flower import parse_reply

    stray = w.grid.log[-1]  # any message object: its id was not sent in this (new) round map
    got = parse_reply(Message(RecordDict(), reply_to=stray), {}, like={})
    assert got.client_id.startswith("node ") and "no message sent this round" in got.reason


def test_registration_names_the_missing_partitions_while_it_waits(monkeypatch, caplog):
    """A node that never starts: every WAIT_LOG_S the registry logs which partitions it still waits for."""
    import logging

    from fedpeft.flower import registry as registry_module

    class NoNodes:
        def get_node_ids(self):
            return []

    monkeypatch.setattr(registry_module, "WAIT_LOG_S", 0.05)
    reg = registry_module.Registry(2, "FedVPT", None)
    with caplog.at_level(logging.WARNING, logger="fedpeft.flower"), pytest.raises(RuntimeError, match="no node"):
        reg.register(NoNodes(), min_nodes=2, timeout=0.4, poll=0.02)
    waits = [r.getMessage() for r in caplog.records if "waiting for nodes" in r.getMessage()]
    assert len(waits) >= 3 and all("partitions still missing: [0, 1]" in m for m in waits)


def test_on_round_set_after_construction_receives_every_closed_round():
    """``strategy.on_round = fn`` reaches the round book: fn sees rounds 0 and 1, the records of ``history``."""
    w = world("FedVPT")
    seen = []

    def collect(record):
        seen.append(record)

    w.strategy.on_round = collect
    assert w.strategy.on_round is collect and w.strategy.book.on_round is collect
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    assert [r.round for r in seen] == [0, 1]
    assert seen == w.strategy.history
