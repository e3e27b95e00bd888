"""The ClientApp's handlers, called as Flower's runtime calls them (``LocalGrid``), no Ray, no strategy."""

from __future__ import annotations

import pytest
import torch
from flower_harness import flower_task  # noqa: F401  (autouse fixture)
from flower_worlds import NODE_IDS, build, client_data, trainer, world
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedpeft.flower import client_app, frozen_fingerprint, to_record
from fedpeft.flower.wire import ARRAYS, CONFIG, METHOD, METRICS, ROUND, SEED
from fedpeft.protocols import get


def _train_msg(node, shared, round_, method):
    cfg = ConfigRecord({ROUND: round_, SEED: 0, METHOD: method})
    return Message(RecordDict({ARRAYS: to_record(shared), CONFIG: cfg}), node, MessageType.TRAIN, group_id=str(round_))


def _ask(grid, msg):
    (reply,) = grid.send_and_receive([msg])
    return reply


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method, upload", [("FedVPT", {"prompts"}), ("pFedPG", {"prompts"}),
                                            ("FedPGP", {"prompts.global_prompt"})])
def test_reply_carries_exactly_the_upload_and_personal_state_stays_on_the_node(method, upload):
    w = world(method)
    node = NODE_IDS[0]
    model = build(method)
    trainable = _trainable_names(model)
    personal = trainable - upload  # the head (and U, V for FedPGP), by the method's definition
    assert personal and any(".head." in "." + n for n in personal)
    shared = {k: v.detach() for k, v in model.named_parameters() if k in upload}
    reply = _ask(w.grid, _train_msg(node, shared, 0, method))
    assert reply.has_content()
    assert set(reply.content[ARRAYS].keys()) == upload
    assert not personal & set(reply.content[ARRAYS].keys())
    m = reply.content[METRICS]
    assert m["partition-id"] == 0 and m["num-examples"] == len(w.data[0][0])
    assert m["upload-bytes"] == sum(shared[k].numel() * 4 for k in upload)
    stored = w.grid.contexts[node].state
    assert set(stored["fedpeft." + method + ".personal"].keys()) == personal
    assert stored["fedpeft." + method + ".meta"]["round"] == 0


def test_training_equals_the_protocol_called_directly():
    """The handler's upload and stored head are the protocol's own client step on the same inputs (the plumbing adds
    nothing and loses nothing)."""
    w = world("FedVPT")
    node = NODE_IDS[1]  # partition 1
    model = build("FedVPT")
    shared = {"prompts": torch.full_like(model.prompts, 0.01)}
    reply = _ask(w.grid, _train_msg(node, shared, 3, "FedVPT"))
    direct = get("FedVPT").client_update(build("FedVPT"), shared=shared, personal=None, data=w.data[1][0], round=3,
                                         client_id=1, seed=0, trainer=trainer())
    assert torch.equal(torch.from_numpy(reply.content[ARRAYS]["prompts"].numpy()), direct.upload["prompts"])
    rec = w.grid.contexts[node].state["fedpeft.FedVPT.personal"]
    for k, v in direct.personal.items():
        assert torch.equal(torch.from_numpy(rec[k].numpy()), v)


def test_a_late_message_never_rolls_personal_state_back():
    w = world("FedVPT")
    node = NODE_IDS[0]
    shared = {"prompts": build("FedVPT").prompts.detach()}
    assert _ask(w.grid, _train_msg(node, shared, 5, "FedVPT")).has_content()
    before = {k: v.numpy().copy() for k, v in w.grid.contexts[node].state["fedpeft.FedVPT.personal"].items()}
    for late in (5, 2):
        reply = _ask(w.grid, _train_msg(node, shared, late, "FedVPT"))
        assert reply.has_error() and f"round {late} is stale" in reply.error.reason
    after = w.grid.contexts[node].state
    assert after["fedpeft.FedVPT.meta"]["round"] == 5
    for k, v in before.items():
        assert (after["fedpeft.FedVPT.personal"][k].numpy() == v).all()


def test_a_raising_client_answers_with_an_error_and_keeps_its_state():
    data = client_data(3)

    def load_data(context):
        if context.node_config["partition-id"] == 1:
            raise OSError("disk on fire")
        return data[context.node_config["partition-id"]]

    w = world("FedVPT", load_data=load_data)
    node = NODE_IDS[1]
    state_before = dict(w.grid.contexts[node].state)
    reply = _ask(w.grid, _train_msg(node, {"prompts": build("FedVPT").prompts.detach()}, 0, "FedVPT"))
    assert reply.has_error() and "disk on fire" in reply.error.reason
    assert dict(w.grid.contexts[node].state) == state_before == {}


def test_a_message_for_another_method_is_refused():
    w = world("FedVPT")
    reply = _ask(w.grid, _train_msg(NODE_IDS[0], {"prompts": build("FedVPT").prompts.detach()}, 0, "FedPGP"))
    assert reply.has_error() and "FedPGP" in reply.error.reason


def test_bf16_model_round_trip():
    """A bf16 client model: float32 on the wire holding exactly the bf16 values; personal state stored and loaded
    back as bf16 with the same bits."""
    w = world("FedVPT", dtype=torch.bfloat16)
    node = NODE_IDS[0]
    model = build("FedVPT", dtype=torch.bfloat16)
    assert model.prompts.dtype == torch.bfloat16
    shared = {"prompts": model.prompts.detach()}
    reply = _ask(w.grid, _train_msg(node, shared, 0, "FedVPT"))
    wire = reply.content[ARRAYS]["prompts"]
    assert wire.dtype == "float32"
    values = torch.from_numpy(wire.numpy())
    assert torch.equal(values.bfloat16().float(), values)  # exactly representable in bf16: nothing was lost
    direct = get("FedVPT").client_update(build("FedVPT", dtype=torch.bfloat16), shared=shared, personal=None,
                                         data=w.data[0][0], round=0, client_id=0, seed=0, trainer=trainer())
    assert torch.equal(values.bfloat16(), direct.upload["prompts"])
    from fedpeft.flower.node_store import MemoryStore

    stored, written = MemoryStore(w.grid.contexts[node], "FedVPT").deployed_state(direct.personal)
    assert written == 0
    for k, v in direct.personal.items():
        assert stored[k].dtype == torch.bfloat16 and torch.equal(stored[k], v)


def test_query_reports_partition_examples_and_frozen_fingerprint():
    w = world("pFedPG")
    reply = _ask(w.grid, Message(RecordDict({CONFIG: ConfigRecord({METHOD: "pFedPG"})}), NODE_IDS[2], MessageType.QUERY))
    m, info = reply.content[METRICS], reply.content["info"]
    assert (m["partition-id"], m["num-partitions"], m["num-examples"]) == (2, 3, len(w.data[2][0]))
    assert info["frozen-sha256"] == frozen_fingerprint(build("pFedPG"))
    assert frozen_fingerprint(build("pFedPG", backbone_seed=1)) != info["frozen-sha256"]
    # the fingerprint ignores trainable parameters: training the prompts does not change it
    m2 = build("pFedPG")
    with torch.no_grad():
        m2.prompts.add_(1.0)
    assert frozen_fingerprint(m2) == info["frozen-sha256"]


def test_client_app_argument_errors():
    with pytest.raises(TypeError, match="Protocol"):
        client_app(3, lambda c: None, lambda c: None)
    with pytest.raises(ValueError, match="unknown method"):
        client_app("FedNope", lambda c: None, lambda c: None)
    with pytest.raises(TypeError, match="load_data"):
        client_app(get("FedVPT"), lambda c: None, None)
    with pytest.raises(ValueError, match="threads"):
        client_app(get("FedVPT"), lambda c: None, lambda c: None, threads=0)


def test_a_train_message_with_a_deployment_hashes_the_backbone_once_and_reads_the_state_file_once(tmp_path,
                                                                                                    monkeypatch):
    """One message per round with a state folder (and no node cache): the frozen backbone is hashed once and the
    client's state file read once per message (0.2 hashed twice and read it three times)."""
    import fedpeft.fed as fed_module
    from fedpeft.flower.wire import DEPLOY, EVAL_ROUND, EVALUATION
    from fedpeft.protocols import ClientStateFile

    calls = {"hash": 0, "read": 0}
    real_hash, real_read = fed_module.frozen_fingerprint, ClientStateFile._read

    def counted_hash(model):
        calls["hash"] += 1
        return real_hash(model)

    def counted_read(self, tensors):
        calls["read"] += int(tensors)
        return real_read(self, tensors)

    monkeypatch.setattr(fed_module, "frozen_fingerprint", counted_hash)
    monkeypatch.setattr(ClientStateFile, "_read", counted_read)
    from flower_harness import LocalGrid, node_context

    data = client_data(1)
    app = client_app("FedVPT", lambda c: build("FedVPT"), lambda c: data[0], trainer=trainer(),
                     state_dir=str(tmp_path), cache=False)
    node = NODE_IDS[0]
    grid = LocalGrid(app, {node: node_context(node, 0, 1)})
    shared = {"prompts": build("FedVPT").prompts.detach()}
    assert not _ask(grid, _train_msg(node, shared, 0, "FedVPT")).has_error()  # round 0 writes the state file
    calls.update(hash=0, read=0)
    msg = _train_msg(node, shared, 1, "FedVPT")
    msg.content[DEPLOY] = to_record(shared)  # round 0's deployment, evaluated before round 1 trains
    msg.content[CONFIG] = ConfigRecord({**dict(msg.content[CONFIG]), EVAL_ROUND: 0})
    reply = _ask(grid, msg)
    assert not reply.has_error() and reply.content[EVALUATION]["personal-round"] == 0
    assert calls == {"hash": 1, "read": 1}
