"""fed.num_params / fed.num_bytes against hand counts, and the package's public surface."""

from __future__ import annotations

import importlib

import pytest
import timm
import torch

from fedpeft import fed


def test_hand_counted_state():
    state = {
        "a": torch.zeros(2, 3),  # 6 float32: 24 bytes
        "b": torch.zeros(5, dtype=torch.float16),  # 5 float16: 10 bytes
        "c": torch.tensor(1),  # 1 int64: 8 bytes
        "d": torch.zeros(0, 4),  # empty
    }
    assert fed.num_params(state) == 12
    assert fed.num_bytes(state) == 42
    assert fed.num_params({}) == fed.num_bytes({}) == 0


def test_communication_of_a_fedrep_round_on_test_vit():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=10)
    state = vit.state_dict()
    total = sum(p.numel() for p in vit.parameters())  # test_vit has no buffers
    assert fed.num_params(state) == total and fed.num_bytes(state) == 4 * total
    shared, personal = fed.split(state, fed.personal_keys(state, "fedrep"))
    assert fed.num_params(personal) == 64 * 10 + 10  # the head: Linear(64 -> 10)
    assert fed.num_params(shared) == total - 650


def test_a_module_is_refused():
    with pytest.raises(TypeError, match=r"Mapping\[str, Tensor\].*Linear"):
        fed.num_bytes(torch.nn.Linear(2, 2))


def test_public_names():
    expected = {"Averager", "PRESETS", "WORDS", "average", "delta", "delta_backward", "from_ndarrays",
                "frozen_fingerprint", "merge", "num_bytes", "num_params", "personal_keys", "split", "to_ndarrays", "trainable_keys",
                "trainable_state"}
    assert set(fed.__all__) == expected and len(fed.__all__) == len(expected)
    delta_module = importlib.import_module("fedpeft.fed.prompt_update")
    assert fed.delta is delta_module.delta and fed.delta_backward is delta_module.delta_backward
    for name in expected - {"PRESETS", "WORDS"}:
        assert getattr(fed, name).__doc__, name
