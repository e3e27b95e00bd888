"""``fedpeft.protocols.client_state``: one client's personal state on the node's disk, checked against the raw file.

The oracle is the file itself, read with ``safetensors`` directly (tensors by name, the metadata stamp), and
hand-written expectations of which version (``current`` / ``previous``) a round must start from.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedpeft._integrity import content_digest
from fedpeft.protocols import ClientStateError as NodeStateError
from fedpeft.protocols import ClientStateFile as NodeState
from fedpeft.protocols import StaleMessage
from fedpeft.protocols.client_state import run_folder_name

LIKE = {"head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}


def _state(v: float, dtype=torch.float32):
    return {"head.weight": torch.full((3, 4), v, dtype=dtype), "head.bias": torch.arange(3, dtype=dtype) + v}


def _store(tmp_path, **kw):
    args = dict(run="run-1", partition=2, method="FedVPT", fingerprint="abc123")
    args.update(kw)
    return NodeState(tmp_path, **args)


def _raw(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, tensors, meta):
    """A hand-made state file with a valid checksum (what the checks after it must catch)."""
    save_file(tensors, str(path), metadata={**meta, "sha256": content_digest(meta, tensors)})


def test_layout_stamp_and_tensors_as_written(tmp_path):
    s = _store(tmp_path)
    assert s.path == tmp_path / "fedpeft" / "personal" / "run-1" / "partition-2.safetensors"
    assert s.load(LIKE) is None and s.start_state(0, LIKE) == (None, False)
    s.save(0, _state(1.0), LIKE)
    meta, tensors = _raw(s.path)
    digest = meta.pop("sha256")
    assert meta == {"format": "fedpeft.node-state", "version": "2", "run": "run-1", "partition": "2",
                    "method": "FedVPT", "frozen-sha256": "abc123", "round": "0", "previous-round": ""}
    assert digest == content_digest(meta, tensors)
    assert set(tensors) == {"current/head.weight", "current/head.bias"}
    assert torch.equal(tensors["current/head.bias"], torch.tensor([1.0, 2.0, 3.0]))
    s.save(3, _state(2.0), LIKE)
    meta, tensors = _raw(s.path)
    assert meta["round"] == "3" and meta["previous-round"] == "0"
    assert torch.equal(tensors["previous/head.weight"], torch.full((3, 4), 1.0))
    assert torch.equal(tensors["current/head.weight"], torch.full((3, 4), 2.0))
    assert [p.name for p in s.path.parent.iterdir()] == ["partition-2.safetensors"]  # no temporary file left


def test_which_state_a_round_starts_from(tmp_path):
    s = _store(tmp_path)
    s.save(1, _state(1.0), LIKE)
    s.save(2, _state(2.0), LIKE)
    state, redo = s.start_state(5, LIKE)  # a later round: the latest state
    assert not redo and torch.equal(state["head.weight"], torch.full((3, 4), 2.0))
    state, redo = s.start_state(2, LIKE)  # round 2 again (server resumed from round 1): what round 2 started from
    assert redo and torch.equal(state["head.weight"], torch.full((3, 4), 1.0))
    with pytest.raises(StaleMessage, match=r"round 1 is stale.*from round 2"):
        s.start_state(1, LIKE)
    # a redo rewrites current, keeps previous
    s.save(2, _state(7.0), LIKE)
    meta, tensors = _raw(s.path)
    assert (meta["round"], meta["previous-round"]) == ("2", "1")
    assert torch.equal(tensors["previous/head.weight"], torch.full((3, 4), 1.0))
    assert torch.equal(tensors["current/head.weight"], torch.full((3, 4), 7.0))
    with pytest.raises(StaleMessage):
        s.save(1, _state(9.0), LIKE)
    assert _raw(s.path)[0]["round"] == "2"


def test_first_round_redo_starts_from_the_initial_values(tmp_path):
    s = _store(tmp_path)
    s.save(0, _state(1.0), LIKE)
    assert s.start_state(0, LIKE) == (None, True)  # None: the model's initial personal values


def test_a_restarted_process_continues_from_the_file(tmp_path):
    _store(tmp_path).save(4, _state(3.0, torch.bfloat16), {k: v.bfloat16() for k, v in LIKE.items()})
    again = _store(tmp_path)  # a new object, as a restarted SuperNode builds it
    stored = again.load({k: v.bfloat16() for k, v in LIKE.items()})
    assert stored.round == 4 and stored.current["head.weight"].dtype == torch.bfloat16
    assert torch.equal(stored.current["head.bias"], torch.tensor([3.0, 4.0, 5.0], dtype=torch.bfloat16))
    assert again.deployed_state(LIKE)[1] == 4 and again.stored_round() == 4


@pytest.mark.parametrize("field, value, match", [
    ("run", "run-0", "run is 'run-0'"),
    ("method", "pFedPG", "method is 'pFedPG'"),
    ("frozen-sha256", "fff", "frozen backbone is 'fff'"),
    ("partition", "1", "partition is '1'"),
    ("format", "something", "format 'something'"),
    ("version", "99", "version '99' is unknown"),
])
def test_another_runs_method_or_backbone_file_is_refused_and_left_alone(tmp_path, field, value, match):
    s = _store(tmp_path)
    s.path.parent.mkdir(parents=True)
    meta = {"format": "fedpeft.node-state", "version": "2", "run": "run-1", "partition": "2", "method": "FedVPT",
            "frozen-sha256": "abc123", "round": "0", "previous-round": ""}
    meta[field] = value
    _write(s.path, {"current/" + k: v for k, v in _state(1.0).items()}, meta)
    before = s.path.read_bytes()
    for call in (lambda: s.load(LIKE), lambda: s.start_state(3, LIKE), lambda: s.save(3, _state(2.0), LIKE)):
        with pytest.raises(NodeStateError, match=match):
            call()
    assert s.path.read_bytes() == before  # never reinitialised or overwritten


@pytest.mark.parametrize("bad, match", [
    ({"current/head.weight": torch.zeros(3, 4)}, "missing"),
    ({"current/head.weight": torch.zeros(3, 5), "current/head.bias": torch.zeros(3)}, "shape"),
    ({"current/head.weight": torch.full((3, 4), float("nan")), "current/head.bias": torch.zeros(3)}, "finite"),
    ({"current/head.weight": torch.zeros(3, 4), "current/head.bias": torch.zeros(3), "x": torch.zeros(1)},
     "unexpected tensors"),
])
def test_tensors_that_do_not_fit_the_model_are_refused(tmp_path, bad, match):
    s = _store(tmp_path)
    s.path.parent.mkdir(parents=True)
    meta = {"format": "fedpeft.node-state", "version": "2", "run": "run-1", "partition": "2", "method": "FedVPT",
            "frozen-sha256": "abc123", "round": "0", "previous-round": ""}
    _write(s.path, bad, meta)
    with pytest.raises(NodeStateError, match=match):
        s.load(LIKE)


def test_garbage_file_is_refused(tmp_path):
    s = _store(tmp_path)
    s.path.parent.mkdir(parents=True)
    s.path.write_bytes(b"\x00" * 40)
    with pytest.raises(NodeStateError, match="not a readable safetensors file"):
        s.load(LIKE)


def test_non_finite_personal_state_is_not_written(tmp_path):
    s = _store(tmp_path)
    s.save(0, _state(1.0), LIKE)
    before = s.path.read_bytes()
    bad = _state(1.0)
    bad["head.bias"][0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        s.save(1, bad, LIKE)
    assert s.path.read_bytes() == before


def test_a_write_killed_midway_leaves_the_old_file(tmp_path, monkeypatch):
    import fedpeft._atomic as ns_atomic

    s = _store(tmp_path)
    s.save(0, _state(1.0), LIKE)
    before = s.path.read_bytes()
    real = ns_atomic.write_temp

    def dies(final, write):
        def half(path):
            with open(path, "wb") as f:
                f.write(b"half a fi")
            raise KeyboardInterrupt  # the process is interrupted mid-write

        return real(final, half)

    monkeypatch.setattr(ns_atomic, "write_temp", dies)
    with pytest.raises(KeyboardInterrupt):
        s.save(1, _state(2.0), LIKE)
    assert s.path.read_bytes() == before and os.listdir(s.path.parent) == ["partition-2.safetensors"]


def test_run_folder_names_and_state_dir():
    assert run_folder_name("1234") == "1234"
    name = run_folder_name("../etc/passwd")
    assert name.startswith("run-") and "/" not in name and len(name) == 20
    with pytest.raises(TypeError, match="run must be a non-empty str"):
        run_folder_name("")
    with pytest.raises(ValueError, match="partition must be an int >= 0"):
        NodeState("/tmp", run="r", partition=-1, method="m", fingerprint="f")
