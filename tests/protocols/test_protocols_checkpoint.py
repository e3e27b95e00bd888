"""The typed ``Server`` and its checkpoint: ``state_dict`` → safetensors + JSON → ``load_state_dict`` resumes exactly.

Oracle: the same server run without interruption (a continuation from a restored checkpoint must give bit-identical
tensors), and the server's own state before a refused load (a bad checkpoint must leave it untouched).
"""

from __future__ import annotations

import json

import pytest
import torch
from protocol_models import model_for
from safetensors.torch import load_file, save_file

from fedpeft import protocols
from fedpeft.protocols import AveragingServer, PFedPGServer, Server


def _replies(server, ids, r):
    """Deterministic uploads near what the server sent (a stand-in for local training), weights 3, 4, 5..."""
    g = torch.Generator().manual_seed(100 + r)
    payloads = server.payloads(ids)
    return [(n, {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in payloads[n].items()}, 3 + n)
            for n in ids]


def _roundtrip(server, tmp_path):
    """Through the files a checkpoint would use: safetensors for the tensors, JSON for the rest."""
    tensors, meta = server.state_dict()
    save_file(tensors, str(tmp_path / "server.safetensors"))
    (tmp_path / "server.json").write_text(json.dumps(meta))
    return load_file(str(tmp_path / "server.safetensors")), json.loads((tmp_path / "server.json").read_text())


def _server(method, optimizer="Adam"):
    options = {"server_optimizer": optimizer, "server_lr": 1e-2} if method == "pFedPG" else {}
    torch.manual_seed(7)
    return protocols.get(method, **options).make_server(model_for(method), num_clients=3, seed=11)


def _state(server):
    tensors, meta = server.state_dict()
    return {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))


@pytest.mark.parametrize("method", ["FedVPT", "FedPerfix", "Local", "pFedPG"])
def test_every_server_is_a_Server_with_one_make_server_signature(method):
    server = protocols.get(method).make_server(model_for(method), num_clients=3, seed=0)
    assert isinstance(server, Server)
    assert isinstance(server, PFedPGServer if method == "pFedPG" else AveragingServer)


@pytest.mark.parametrize("method,optimizer", [("FedVPT", None), ("FedPGP", None), ("pFedPG", "Adam"),
                                              ("pFedPG", "SGD")])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(method, optimizer, tmp_path):
    straight = _server(method, optimizer)
    for r in range(4):
        straight.update(_replies(straight, [0, 1, 2], r))

    first = _server(method, optimizer)
    for r in range(2):
        first.update(_replies(first, [0, 1, 2], r))
    tensors, meta = _roundtrip(first, tmp_path)
    assert meta["round"] == 2
    if method == "pFedPG" and optimizer == "Adam":  # the optimizer's moments travel too
        assert any(k.startswith("optimizer.") and k.endswith(".exp_avg") for k in tensors)
    resumed = _server(method, optimizer)  # a fresh process would build it the same way
    resumed.load_state_dict(tensors, meta)
    for r in range(2, 4):
        resumed.update(_replies(resumed, [0, 1, 2], r))

    want, got = straight.state_dict(), resumed.state_dict()
    assert want[1] == got[1] and got[1]["round"] == 4
    assert want[0].keys() == got[0].keys()
    for k in want[0]:
        assert torch.equal(want[0][k], got[0][k]), k


def test_server_tensors_are_the_live_state():
    """Oracle: the state the server uses (shared state / generator weights), read directly."""
    avg = _server("FedVPT")
    tensors, meta = avg.state_dict()
    assert meta == {"kind": "averaging", "round": 0}
    assert tensors.keys() == {f"shared.{k}" for k in avg.shared}
    pg = _server("pFedPG")
    tensors, meta = pg.state_dict()
    for k, v in pg.generator.state_dict().items():
        assert torch.equal(tensors[f"generator.{k}"], v)
    assert meta["optimizer"]["class"] == "Adam" and meta["optimizer"]["param_groups"][0]["lr"] == 1e-2


@pytest.mark.parametrize("method", ["FedVPT", "pFedPG"])
def test_a_bad_checkpoint_is_refused_and_leaves_the_server_untouched(method):
    server = _server(method)
    server.update(_replies(server, [0, 1, 2], 0))
    before = _state(server)
    tensors, meta = _state(server)
    key = next(k for k in tensors if not k.startswith("optimizer."))
    bad = [
        ({**tensors, key: torch.zeros(999, 999)}, meta, "shape"),
        ({k: v for k, v in tensors.items() if k != key}, meta, "missing"),
        ({**tensors, key: torch.full_like(tensors[key], float("nan"))}, meta, "finite"),
        (tensors, {**meta, "round": -1}, "round"),
        (tensors, {**meta, "kind": "other"}, "kind"),
    ]
    if method == "pFedPG":
        bad.append((tensors, {**meta, "optimizer": {**meta["optimizer"], "class": "SGD"}}, "SGD"))
    for t, m, word in bad:
        with pytest.raises(ValueError, match=word):
            server.load_state_dict(t, m)
        after = _state(server)
        assert after[1] == before[1]
        for k in before[0]:
            assert torch.equal(after[0][k], before[0][k]), (word, k)
