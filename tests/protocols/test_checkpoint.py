"""``fedpeft.protocols.checkpoint``: the files on disk read back by hand (json + safetensors), crash points, refusals."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

import fedpeft.protocols.checkpoint as ck
from fedpeft.protocols.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_matches,
    load_checkpoint,
    save_checkpoint,
)


def _ckpt(round_=2, v=1.0):
    return Checkpoint(
        round=round_, run="r-7",
        tensors={"generator.w": torch.full((2, 3), v), "optimizer.0.exp_avg": torch.arange(4, dtype=torch.float64),
                 "half": torch.tensor([1.5], dtype=torch.bfloat16), "step": torch.tensor(3)},
        meta={"method": "pFedPG", "seed": 0, "history": [{"round": 1, "mean": 0.1 + 0.2, "nan": float("nan"),
                                                         "rejected": [[1, "why"]]}],
              "registry": {"0": {"num-examples": 12}}, "inf": float("-inf")},
    )


def test_files_on_disk_are_what_a_reader_without_fedpeft_expects(tmp_path):
    path = save_checkpoint(tmp_path, _ckpt())
    assert path == tmp_path / "checkpoint.json"
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["version"], doc["round"], doc["run"]) == ("fedpeft.server-checkpoint", 2, 2, "r-7")
    assert doc["tensors"] == "tensors-r000002.safetensors"
    raw = (tmp_path / doc["tensors"]).read_bytes()
    assert doc["sha256"] == hashlib.sha256(raw).hexdigest()
    assert doc["meta"]["history"][0]["mean"] == 0.1 + 0.2  # exact float round trip
    assert doc["meta"]["history"][0]["nan"] == {"float": "nan"} and doc["meta"]["inf"] == {"float": "-inf"}
    with safe_open(str(tmp_path / doc["tensors"]), framework="pt") as f:
        meta = f.metadata()
        assert meta.pop("sha256") and meta == {"format": "fedpeft.server-checkpoint", "version": "2", "round": "2",
                                               "run": "r-7"}
        assert torch.equal(f.get_tensor("generator.w"), torch.full((2, 3), 1.0))
        assert f.get_tensor("half").dtype == torch.bfloat16
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "tensors-r000002.safetensors"]


def test_round_trip_is_exact():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        c = _ckpt()
        save_checkpoint(d, c)
        back = load_checkpoint(d)
    assert (back.round, back.run) == (2, "r-7")
    assert set(back.tensors) == set(c.tensors)
    for k, v in c.tensors.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k], v)
    h = back.meta["history"][0]
    assert h["mean"] == 0.1 + 0.2 and h["nan"] != h["nan"] and back.meta["inf"] == float("-inf")
    assert back.meta["registry"] == {"0": {"num-examples": 12}} and h["rejected"] == [[1, "why"]]


def test_next_round_replaces_the_pair_and_deletes_the_old_tensors(tmp_path):
    save_checkpoint(tmp_path, _ckpt(2, 1.0))
    save_checkpoint(tmp_path, _ckpt(3, 2.0))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "tensors-r000003.safetensors"]
    assert torch.equal(load_checkpoint(tmp_path).tensors["generator.w"], torch.full((2, 3), 2.0))


@pytest.mark.parametrize("crash_at", ["tensor_write", "json_write", "tensor_rename"])
def test_a_process_killed_at_any_step_leaves_the_previous_complete_checkpoint(tmp_path, monkeypatch, crash_at):
    save_checkpoint(tmp_path, _ckpt(2, 1.0))
    real_write_temp, real_replace = ck._atomic.write_temp, ck._atomic.replace

    def write_temp(final, write):
        if (crash_at == "tensor_write" and final.suffix == ".safetensors") or (
                crash_at == "json_write" and final.name == "checkpoint.json"):
            raise KeyboardInterrupt
        return real_write_temp(final, write)

    def replace(tmp, final):
        if crash_at == "tensor_rename":
            raise KeyboardInterrupt
        return real_replace(tmp, final)

    monkeypatch.setattr(ck._atomic, "write_temp", write_temp)
    monkeypatch.setattr(ck._atomic, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _ckpt(3, 2.0))
    monkeypatch.undo()
    back = load_checkpoint(tmp_path)
    assert back.round == 2 and torch.equal(back.tensors["generator.w"], torch.full((2, 3), 1.0))
    save_checkpoint(tmp_path, _ckpt(3, 2.0))  # the next save cleans up whatever the killed one left
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".")) == [
        "checkpoint.json", "tensors-r000003.safetensors"]


def test_no_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path) is None and load_checkpoint(tmp_path / "missing") is None


def test_damaged_or_foreign_files_are_refused(tmp_path):
    save_checkpoint(tmp_path, _ckpt())
    tensors = tmp_path / "tensors-r000002.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, _ckpt(3))
    doc = json.loads((tmp_path / "checkpoint.json").read_text())
    for change, match in [({"version": 3}, "version 3 is unknown"), ({"format": "x"}, "format 'x'"),
                          ({"round": -1}, "'round' must be an int"), ({"tensors": "../x"}, "file name in the same"),
                          ({"tensors": "nope.safetensors"}, "is missing"), ({"round": 4}, "stamped round is '3'")]:
        (tmp_path / "checkpoint.json").write_text(json.dumps({**doc, **change}))
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        load_checkpoint(tmp_path)


def test_unwritable_meta_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint.meta\['x'\]: object cannot be written"):
        save_checkpoint(tmp_path, Checkpoint(round=1, run="r", meta={"x": object()}))
    with pytest.raises(TypeError, match="dict keys must be str"):
        save_checkpoint(tmp_path, Checkpoint(round=1, run="r", meta={"x": {1: 2}}))
    with pytest.raises(ValueError, match="round must be an int >= 0"):
        save_checkpoint(tmp_path, Checkpoint(round=-1, run="r"))
    assert not (tmp_path / "checkpoint.json").exists()


def test_check_matches_names_the_field():
    c = _ckpt()
    check_matches(c, method="pFedPG", seed=0)
    with pytest.raises(CheckpointError, match="has seed = 0, this run 1"):
        check_matches(c, method="pFedPG", seed=1)
