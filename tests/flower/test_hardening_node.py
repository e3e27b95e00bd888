"""Issue 27, the node side: personal-state files carry a checksum over header and tensors (a flipped bit or an edited
header is refused, naming the file), the cached frozen hash follows ``build_model``'s weights, ``state-dir`` is parsed
in one place (``~`` expanded for the personal state and the cache alike), partitions sharing a state folder keep
their cache entries, the cache is optional in fact, a huge round trains, two writers of one file wait for each other,
and files get the umask's modes.

Runtime: ``LocalGrid`` (flower_harness), the ClientApp of ``flower_worlds``; hostile files are made by editing the
files a real round wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

import torch
from flower_harness import flower_task, node_context  # noqa: F401  (autouse fixture)
from flower_worlds import NODE_IDS, SEED, build, world
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from safetensors import safe_open
from safetensors.torch import save_file

from fedpeft.flower import to_record
from fedpeft.flower.wire import ARRAYS, CONFIG, METHOD, ROUND
from fedpeft.flower.wire import SEED as SEED_KEY


def _durable(w, root, shared=False):
    for i, node in enumerate(list(w.grid.contexts)):
        w.grid.contexts[node].node_config["state-dir"] = str(root if shared else root / f"node{i}")


def _train(w, node, round_):
    shared = {k: v.detach() for k, v in build("FedVPT").named_parameters() if k == "prompts"}
    cfg = ConfigRecord({ROUND: round_, SEED_KEY: 0, METHOD: "FedVPT"})
    msg = Message(RecordDict({ARRAYS: to_record(shared), CONFIG: cfg}), node, MessageType.TRAIN, group_id="x")
    (reply,) = w.grid.send_and_receive([msg])
    return reply


def _digest(meta, tensors):
    """The state file's checksum as docs/flower.md states it: SHA-256 of the header as canonical JSON, a zero byte,
    then per key in sorted order ``name|dtype|shape|`` and the tensor's bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _state_file(root):
    (path,) = [p for p in root.rglob("partition-*.safetensors")]
    return path


def _trained_once(tmp_path):
    """A world whose partition-0 node trained round 0 with a state folder: ``(world, its state file)``."""
    w = world("FedVPT")
    _durable(w, tmp_path)
    assert not _train(w, NODE_IDS[0], 0).has_error()
    return w, _state_file(tmp_path / "node0")


def _contents(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_a_flipped_bit_in_a_personal_state_file_is_refused_and_the_file_kept(tmp_path):
    w, path = _trained_once(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-4] ^= 0x01  # the lowest mantissa bit of the last float: still finite, still the right shape
    path.write_bytes(bytes(raw))
    reply = _train(w, NODE_IDS[0], 1)
    assert reply.has_error() and str(path) in reply.error.reason and "sha256" in reply.error.reason  # main: trained
    assert path.read_bytes() == bytes(raw)


def test_an_edited_header_round_is_refused(tmp_path):
    w, path = _trained_once(tmp_path)
    meta, tensors = _contents(path)
    save_file(tensors, str(path), metadata={**meta, "round": "7"})  # "this client is already at round 7"
    reply = _train(w, NODE_IDS[0], 1)
    assert reply.has_error() and "sha256" in reply.error.reason  # main: "message for round 1 is stale"


def test_an_integer_tensor_for_a_floating_parameter_is_refused(tmp_path):
    w, path = _trained_once(tmp_path)
    meta, tensors = _contents(path)
    key = next(k for k in tensors if k.endswith("head.weight"))
    tensors[key] = tensors[key].to(torch.int64)
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    save_file(tensors, str(path), metadata={**meta, "sha256": _digest(meta, tensors)})  # a valid checksum
    reply = _train(w, NODE_IDS[0], 1)
    assert reply.has_error() and "torch.int64" in reply.error.reason  # main: loaded the int64 head


def test_the_cached_frozen_hash_follows_build_models_weights(tmp_path):
    first = world("FedVPT")
    _durable(first, tmp_path)
    first.strategy.start(first.grid, num_rounds=1, timeout=10)  # every node cached its frozen hash
    part = 1
    # the node's backbone checkpoint is replaced (same code, same configs), and a new run starts
    second = world("FedVPT", backbone_seed={part: SEED + 1})
    _durable(second, tmp_path)
    second.strategy.run_name = "B"
    second.strategy.start(second.grid, num_rounds=1, timeout=10)
    node = next(n for n in second.grid.contexts if second.partition_of(n) == part)
    assert "frozen parameters" in second.strategy.registry.refused[node]  # main: the stale cached hash passed
    assert second.strategy.history[0].server.accepted == [0, 2]


def test_a_tilde_state_dir_puts_personal_state_and_cache_in_the_home_folder(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    w = world("FedVPT")
    for i, node in enumerate(w.grid.contexts):
        w.grid.contexts[node].node_config["state-dir"] = f"~/node{i}"
    w.strategy.start(w.grid, num_rounds=1, timeout=10)
    assert list((home / "node0" / "fedpeft" / "personal").rglob("partition-*.safetensors"))
    assert list((home / "node0" / "cache").glob("data-*.pt"))
    assert not (cwd / "~").exists()  # main: the personal state went to <cwd>/~/node0


def test_partitions_sharing_a_state_dir_keep_their_cache_entries(tmp_path):
    calls = []
    base = world("FedVPT")

    def load(context):
        calls.append(int(context.node_config["partition-id"]))
        return base.data[int(context.node_config["partition-id"])]

    w = world("FedVPT", load_data=load)
    _durable(w, tmp_path / "shared", shared=True)
    w.strategy.start(w.grid, num_rounds=3, timeout=10)
    assert sorted(calls) == [0, 1, 2]  # main: every message reloaded, each partition deleting the others' entry


def test_a_cache_that_cannot_be_written_is_skipped_and_the_round_goes_on(tmp_path):
    w = world("FedVPT")
    _durable(w, tmp_path)
    for i in range(3):
        (tmp_path / f"node{i}").mkdir()
        (tmp_path / f"node{i}" / "cache").write_text("a file where the cache folder would go")
    w.strategy.start(w.grid, num_rounds=2, timeout=10)
    assert all(r.server.accepted == [0, 1, 2] for r in w.strategy.history)  # main: every message failed
    assert len(list(tmp_path.rglob("partition-*.safetensors"))) == 3


def test_a_round_of_two_to_the_62_trains(tmp_path):
    w = world("FedVPT")
    _durable(w, tmp_path)
    reply = _train(w, NODE_IDS[0], 2 ** 62)
    assert not reply.has_error(), reply.error.reason  # main: "Overflow when unpacking long long"
    assert reply.content.metric_records["metrics"]["round"] == 2 ** 62


def test_two_writers_of_one_clients_file_wait_for_each_other(tmp_path):
    from fedpeft.protocols import ClientStateFile as NodeState
    from fedpeft.protocols import StaleMessage

    like = {"head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}
    errors = []

    def writer(offset):
        store = NodeState(tmp_path, run="r", partition=0, method="FedVPT", fingerprint="f")
        for r in range(offset, 120, 2):
            try:
                store.save(r, {k: v + r for k, v in like.items()}, like)
            except StaleMessage:
                pass  # the other writer is ahead: refusing is right
            except Exception as e:  # main: FileNotFoundError when the other's remove_stale took its temp file
                errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = NodeState(tmp_path, run="r", partition=0, method="FedVPT", fingerprint="f").load(like)
    assert stored.round == 119 and torch.equal(stored.current["head.bias"], torch.full((3,), 119.0))
    assert [p.name for p in stored_folder(tmp_path).iterdir()] == ["partition-0.safetensors"]


def stored_folder(root):
    return root / "fedpeft" / "personal" / "r"


def test_node_state_and_cache_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        w = world("FedVPT")
        _durable(w, tmp_path)
        w.strategy.start(w.grid, num_rounds=1, timeout=10)
    finally:
        os.umask(old)
    files = list(tmp_path.rglob("partition-*.safetensors")) + list(tmp_path.rglob("*.pt"))
    assert len(files) >= 6
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}  # main: 0600
