"""Issue 27, server checkpoints trusted too far: every damaged, edited or foreign checkpoint is refused with a one-line
``CheckpointError`` naming the file or field, before anything in the engine changes; a second writer is refused with
the first one's pid and host; files get the umask's modes and what a killed writer left is removed.

The hostile checkpoints are built with the public ``load_checkpoint``/``save_checkpoint`` (a consistent file whose
content is wrong) or by editing ``checkpoint.json`` by hand (an inconsistent one).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from protocol_models import client_data, model_for

from fedpeft.protocols import CheckpointError, Federation, LocalTrainer, load_checkpoint, save_checkpoint
from fedpeft.protocols import get as get_protocol

TRAINER = LocalTrainer(epochs=1, batch_size=6, lr=1e-2, lr_backbone=1e-3)


def fed(method="FedVPT", ckpt=None, backbone_seed=0, **kw):
    protocol = get_protocol(method, server_optimizer="Adam") if method == "pFedPG" else method
    torch.manual_seed(0)
    return Federation(protocol, model_for(method, seed=backbone_seed), client_data(3, n=12, seed=1),
                      test_data=client_data(3, n=12, seed=2), trainer=TRAINER, seed=5, checkpoint_dir=ckpt, **kw)


def _edit(ckpt, change):
    """Load, change (a function of the Checkpoint), save again: a consistent checkpoint whose content is wrong."""
    c = load_checkpoint(ckpt)
    change(c)
    save_checkpoint(ckpt, c)


def _ran(tmp_path, method="FedVPT", rounds=1):
    ckpt = tmp_path / "ckpt"
    f = fed(method, ckpt)
    f.run(rounds)
    del f  # the writer is gone (a process that ended)
    return ckpt


def test_a_checkpoint_of_another_backbone_with_the_same_shapes_is_refused(tmp_path):
    ckpt = _ran(tmp_path)
    with pytest.raises(CheckpointError, match="frozen-sha256"):
        fed("FedVPT", ckpt, backbone_seed=1)  # main: resumed the prompts on a different backbone
    fed("FedVPT", ckpt)  # the same backbone resumes


def test_nan_personal_state_in_a_checkpoint_is_refused(tmp_path):
    ckpt = _ran(tmp_path)

    def poison(c):
        key = next(k for k in c.tensors if k.startswith("personal.1.") and c.tensors[k].is_floating_point())
        c.tensors[key] = c.tensors[key].clone().fill_(float("nan"))

    _edit(ckpt, poison)
    with pytest.raises(CheckpointError, match=r"client 1's personal state .* NaN"):
        fed("FedVPT", ckpt)


def test_a_server_round_that_differs_from_the_checkpoints_round_is_refused(tmp_path):
    ckpt = _ran(tmp_path, rounds=2)
    _edit(ckpt, lambda c: c.meta["server"].update(round=5))
    with pytest.raises(CheckpointError, match=r"meta\['server'\]\['round'\] is 5"):
        fed("FedVPT", ckpt)  # main: resumed, then refused every reply as "from another round"


@pytest.mark.parametrize("damage, match", [
    ("moment shape", "expected"), ("moment nan", "NaN"), ("generator float64", "dtype"),
])
def test_a_pfedpg_optimizer_or_generator_that_does_not_fit_is_refused(tmp_path, damage, match):
    ckpt = _ran(tmp_path, "pFedPG")

    def change(c):
        moment = next(k for k in c.tensors if k.endswith(".exp_avg"))
        if damage == "moment shape":
            c.tensors[moment] = torch.zeros(*c.tensors[moment].shape[:-1], c.tensors[moment].shape[-1] + 1)
        elif damage == "moment nan":
            c.tensors[moment] = c.tensors[moment].clone().fill_(float("nan"))
        else:
            gen = next(k for k in c.tensors if k.startswith("server.generator."))
            c.tensors[gen] = c.tensors[gen].double()

    _edit(ckpt, change)
    with pytest.raises(CheckpointError, match=match):
        fed("pFedPG", ckpt)


@pytest.mark.parametrize("field, value", [("meta.history.0.mean", 0.99), ("meta.server.round", 7),
                                          ("meta.seed", 6), ("meta.server.kind", "x")])
def test_a_hand_edited_checkpoint_json_is_refused_by_its_checksum(tmp_path, field, value):
    ckpt = _ran(tmp_path)
    path = ckpt / "checkpoint.json"
    doc = json.loads(path.read_text())
    *parents, last = field.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="meta-sha256"):
        fed("FedVPT", ckpt)


def test_a_checkpoint_json_that_is_a_dangling_link_or_a_folder_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "checkpoint.json").symlink_to(tmp_path / "gone.json")
    (b / "checkpoint.json").mkdir(parents=True)
    for d in (a, b):
        with pytest.raises(CheckpointError, match="not a regular file"):
            fed("FedVPT", d)  # main: silently started from round 0


def test_a_checkpoint_dir_that_is_a_file_is_refused_at_once(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        fed("FedVPT", f)  # main: failed only after a full round


def test_another_run_name_is_refused_not_silently_resumed(tmp_path):
    ckpt = _ran(tmp_path)
    with pytest.raises(CheckpointError, match=r"run 'inprocess', this run is 'B'"):
        fed("FedVPT", ckpt, run="B")


@pytest.mark.parametrize("history", [[{"round": 0}], [{"participants": [0]}], ["x"], [{"round": 3, "participants": []}]])
def test_a_malformed_history_is_a_checkpoint_error(tmp_path, history):
    ckpt = _ran(tmp_path)
    _edit(ckpt, lambda c: c.meta.update(history=history))
    with pytest.raises(CheckpointError, match=r"history\[0\]"):
        fed("FedVPT", ckpt)


def test_a_second_writer_is_refused_with_the_first_ones_pid_and_host(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = fed("FedVPT", ckpt)
    first.run(1)  # first is the folder's writer from now on
    second = fed("FedVPT", ckpt)  # reading is fine
    with pytest.raises(RuntimeError, match=f"locked by pid {os.getpid()} on {socket.gethostname()}"):
        second.run(1)
    assert load_checkpoint(ckpt).round == 1  # untouched
    first.run(1)
    assert load_checkpoint(ckpt).round == 2


def test_checkpoint_files_follow_the_umask_and_a_killed_writers_leftovers_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt = tmp_path / "ckpt"
        f = fed("FedVPT", ckpt)
        f.run(1)
        del f
        for p in ckpt.iterdir():
            if not p.name.startswith("."):
                assert oct(p.stat().st_mode & 0o777) == oct(0o644), p  # main: 0600 (safetensors' own temp file)
        # what a kill -9 leaves: safetensors' temp file, fedpeft's, and the next round's orphaned tensor file
        for name in (".tmpAb12Cd", ".tensors-r000002.safetensors.0123456789abcdef.tmp", "tensors-r000007.safetensors"):
            (ckpt / name).write_bytes(b"\0" * 64)
        again = fed("FedVPT", ckpt)
        again.run(1)
        names = sorted(p.name for p in ckpt.iterdir() if p.name != ".fedpeft.lock")
        assert names == ["checkpoint.json", "tensors-r000002.safetensors"]
        assert load_checkpoint(ckpt).round == 2
    finally:
        os.umask(old)
