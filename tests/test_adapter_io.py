"""save_adapter / load_adapter: adapter-only safetensors + JSON, atomic, validated, state untouched on error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_vit
from safetensors import safe_open

from fedpeft import VPT, load_adapter, save_adapter
from fedpeft.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME


def _trained_vpt(seed: int, **kwargs) -> VPT:
    vit, _ = make_vit("deit_distilled", seed=0)  # same backbone for every seed
    model = VPT(vit, num_prompts=3, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # deliberately non-identity, non-init weights
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_round_trip_restores_exact_trainable_weights_and_outputs(tmp_path):
    src, dst = _trained_vpt(1, deep=True), _trained_vpt(2, deep=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(src.eval()(x), dst.eval()(x))
    save_adapter(src, tmp_path / "a")
    load_adapter(dst, tmp_path / "a")
    for (n, p), (m, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert n == m and torch.equal(p, q), n
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))


def test_file_holds_only_trainable_parameters_and_a_config(tmp_path):
    model = _trained_vpt(1)
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        keys = sorted(f.keys())
    expected = sorted(["prompts", "model.head.weight", "model.head.bias", "model.head_dist.weight",
                       "model.head_dist.bias"])
    assert keys == expected  # never the backbone
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    import fedpeft

    assert config["fedpeft_version"] == fedpeft.__version__
    assert config["method"] == "VPT"
    assert config["wrappers"][0]["num_prompts"] == 3 and config["wrappers"][0]["deep"] is False
    assert config["parameters"]["prompts"] == [1, 3, 64]
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME])


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    now = model.state_dict()
    assert all(torch.equal(now[k], snap[k]) for k in snap)


def test_shape_mismatch_raises_and_leaves_model_untouched(tmp_path):
    save_adapter(_trained_vpt(1), tmp_path)
    vit, _ = make_vit("deit_distilled")
    other = VPT(vit, num_prompts=5)  # K differs
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"other hyper-parameters.*num_prompts: file 3, model 5"):
        load_adapter(other, tmp_path)
    _assert_unchanged(other, snap)


def test_key_mismatch_raises_and_leaves_model_untouched(tmp_path):
    save_adapter(_trained_vpt(1), tmp_path)
    vit, _ = make_vit("deit_distilled")
    other = VPT(vit, num_prompts=3, train_head=False)  # no head in the trainable set
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="train_head: file True, model False"):
        load_adapter(other, tmp_path)
    _assert_unchanged(other, snap)


def test_wrong_file_and_wrong_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_adapter(_trained_vpt(1), tmp_path / "nothing")
    vit, _ = make_vit("test_vit")
    with pytest.raises(TypeError, match="fedpeft model"):
        save_adapter(vit, tmp_path)
    from safetensors.torch import save_file

    (tmp_path / "x").mkdir()
    save_file({"prompts": torch.zeros(1)}, str(tmp_path / "x" / ADAPTER_WEIGHTS_NAME))
    with pytest.raises(ValueError, match="not a fedpeft adapter"):
        load_adapter(_trained_vpt(1), tmp_path / "x")


def test_failed_write_leaves_previous_files_intact(tmp_path, monkeypatch):
    good = _trained_vpt(1)
    save_adapter(good, tmp_path)
    before = (tmp_path / ADAPTER_WEIGHTS_NAME).read_bytes()

    import fedpeft.adapter_io as io

    def broken_save(tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_trained_vpt(2), tmp_path)
    assert (tmp_path / ADAPTER_WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME])
