"""VPT's two poolings on globally pooled backbones, against the plain timm stages run by hand (VPT's
``VIT_POOL_TYPE``: ``img_pool`` averages the image tokens only, ``original`` the prompts too)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from fedpeft import VPT, load_adapter, save_adapter


def _avg_vit(class_token: bool = True):
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=4, global_pool="avg", img_size=32,
                             patch_size=8, depth=2, class_token=class_token).double().eval()


def _pooled_by_hand(vit, x, prompts, *, with_prompts: bool):
    """Blocks by hand; then the mean over the tokens after the prefix (image tokens, plus the K prompts if
    ``with_prompts``), ``fc_norm`` and the head."""
    tokens = vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))
    n_p, K = vit.num_prefix_tokens, prompts.shape[1]
    seq = torch.cat([tokens[:, :n_p], prompts[0].expand(x.shape[0], -1, -1), tokens[:, n_p:]], dim=1)
    seq = vit.norm_pre(seq)
    for i, block in enumerate(vit.blocks):
        if i:
            seq = torch.cat([seq[:, :n_p], prompts[i].expand(x.shape[0], -1, -1), seq[:, n_p + K:]], dim=1)
        seq = block(seq)
    seq = vit.norm(seq)
    pooled = seq[:, n_p:].mean(1) if with_prompts else seq[:, n_p + K:].mean(1)
    return F.linear(vit.fc_norm(pooled), vit.head.weight, vit.head.bias)


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("pooling", ["img_pool", "original"])
def test_pooling_modes_against_the_stages_by_hand(pooling, class_token):
    vit = _avg_vit(class_token)
    model = VPT(copy.deepcopy(vit), num_prompts=3, deep=True, pooling=pooling)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = _pooled_by_hand(vit, x, model.prompts.detach(), with_prompts=pooling == "original")
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-12)
    other = _pooled_by_hand(vit, x, model.prompts.detach(), with_prompts=pooling != "original")
    assert not torch.allclose(model(x), other)  # the two modes differ on an avg-pooled backbone
    n_p = vit.num_prefix_tokens
    assert model.forward_features(x).shape[1] == n_p + 16 + (3 if pooling == "original" else 0)


def test_img_pool_is_the_default_and_class_token_pooling_is_unaffected():
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32, patch_size=8,
                            depth=2).double().eval()
    assert VPT(copy.deepcopy(vit), num_prompts=2).pooling == "img_pool"
    a = VPT(copy.deepcopy(vit), num_prompts=2, deep=True)
    b = VPT(copy.deepcopy(vit), num_prompts=2, deep=True, pooling="original")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)


def test_pooling_is_checked_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="img_pool"):
        VPT(_avg_vit(), num_prompts=2, pooling="prompt_pool")
    model = VPT(_avg_vit(), num_prompts=2, pooling="original")
    assert "pooling='original'" in repr(model)
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="pooling"):
        load_adapter(VPT(_avg_vit(), num_prompts=2), tmp_path)
    load_adapter(VPT(_avg_vit(), num_prompts=2, pooling="original"), tmp_path)
