"""Every module on transformers ViT / DeiT / DINOv2 equals the same module on the timm model with the same weights.

Oracle (``hf_oracle.py``): a tiny random timm ViT copied one-to-one into a tiny random transformers config, the plain
models checked equal first. Then each wrapper is built on both, its own parameters copied from the timm side, and
tokens, outputs (the transformers class's pooling and classifier written by hand on the timm tokens) and the gradients
of every trainable parameter (backbone ones mapped back through the same copy) must agree in float64.
Run on transformers 5.x and on 4.x (``/tmp/hf4/bin/python -m pytest tests/test_hf_equivalence.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_oracle import (
    ALL_CLASSES,
    DEPTH,
    DIM,
    copy_timm_into_hf,
    head_oracle,
    hf_output,
    hf_tokens,
    images,
    num_prefix,
    pair,
)

from fedpeft import VPT, LowRankPrompt, ParallelPrefix, Prefix, PromptGenerator

TOL = dict(rtol=1e-10, atol=1e-12)

MODULES = {
    "vpt_shallow": lambda m: VPT(m, num_prompts=3),
    "vpt_deep": lambda m: VPT(m, num_prompts=3, deep=True),
    "vpt_original_pooling": lambda m: VPT(m, num_prompts=3, deep=True, pooling="original"),
    "vpt_lowrank": lambda m: VPT(m, num_prompts=3, deep=True, prompts=LowRankPrompt(
        num_prompts=3, embed_dim=DIM, rank=2, depth=DEPTH, dtype=torch.float64)),
    "parallel_prefix": lambda m: ParallelPrefix(m, bottleneck=4),
    "parallel_prefix_fedperfix": lambda m: ParallelPrefix(m, bottleneck=4, train_backbone=True),
    "prefix": lambda m: Prefix(m, length=2),
    "stack": lambda m: Prefix(ParallelPrefix(VPT(m, num_prompts=3, deep=True), bottleneck=4), length=2),
}


def _copy_own(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Copy the wrapper-own parameters (same names on both sides: prompts, adapters, keys / values)."""
    dst_sd = dict(dst.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name in dst_sd and dst_sd[name].shape == p.shape:
                dst_sd[name].copy_(p)
                n += 1
    return n


def _backbone_grads_as_hf(vit, hf, x_grads: dict) -> dict:
    """timm backbone gradients mapped onto the transformers names (qkv split), through the weight copy."""
    vit_g, hf_g = copy.deepcopy(vit), copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in vit_g.named_parameters():
            p.copy_(x_grads.get(name, torch.zeros_like(p)))
    copy_timm_into_hf(vit_g, hf_g)
    return dict(hf_g.named_parameters())


def test_plain_models_agree_after_the_copy():
    x = images()
    for family, cls in ALL_CLASSES:
        vit, hf = pair(family, cls)
        tokens = vit.forward_features(x)
        torch.testing.assert_close(hf_tokens(hf, x), tokens, **TOL)
        torch.testing.assert_close(hf_output(hf, x), head_oracle(hf, tokens, num_prefix(family)), **TOL)


@pytest.mark.parametrize("module", sorted(MODULES))
@pytest.mark.parametrize("family,cls", ALL_CLASSES)
def test_wrapped_transformers_model_equals_wrapped_timm_model(family, cls, module):
    vit, hf = pair(family, cls)
    hf_ref = copy.deepcopy(hf)  # the classifier the oracle applies on the timm side (its own grads)
    w_timm, w_hf = MODULES[module](vit), MODULES[module](hf)
    assert _copy_own(w_timm, w_hf) >= 1
    x = images()
    n_p = num_prefix(family)

    f_timm, f_hf = w_timm.forward_features(x), w_hf.forward_features(x)
    torch.testing.assert_close(f_hf, f_timm, **TOL)
    out_timm = head_oracle(hf_ref, f_timm, n_p)
    out_hf = w_hf(x)
    torch.testing.assert_close(out_hf, out_timm, **TOL)
    assert out_hf.shape == hf_output(hf, x).shape  # the plain model's tensor output shape

    weight = torch.randn(out_hf.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (out_timm * weight).sum().backward()
    (out_hf * weight).sum().backward()
    own_timm = {n: p for n, p in w_timm.named_parameters() if p.grad is not None}
    compared = 0
    for name, p in w_hf.named_parameters():
        if name in own_timm and own_timm[name].shape == p.shape:
            torch.testing.assert_close(p.grad, own_timm[name].grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
            compared += 1
    assert compared >= 1
    # the classifier(s): the timm side used hf_ref's, which got the oracle's gradient
    ref_params = dict(hf_ref.named_parameters())
    for name, p in hf.named_parameters():
        if "classifier" in name:
            assert p.requires_grad
            torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL)
    # the frozen / trainable split is the same: every trainable backbone parameter has a timm twin with its gradient
    trainable_backbone = [n for n, p in hf.named_parameters() if p.requires_grad and "classifier" not in n]
    if module == "parallel_prefix_fedperfix":
        mapped = _backbone_grads_as_hf(vit, hf, {n: p.grad for n, p in vit.named_parameters() if p.grad is not None})
        assert len(trainable_backbone) > 10
        for name in trainable_backbone:
            if "mask_token" in name or "pooler" in name:
                continue  # no timm twin (unused by the image forward / a Model's pooler, compared through out_hf)
            grad, want = hf.get_parameter(name).grad, mapped[name]
            if family == "dinov2_reg" and name.endswith("position_embeddings"):
                # timm's no_embed_class model has no class position; the copy put 0 there, whose gradient is
                # the class token's
                cls_token = next(n for n in mapped if n.endswith("cls_token"))
                want = torch.cat([hf.get_parameter(cls_token).grad, want[:, 1:]], dim=1)
            torch.testing.assert_close(grad, want, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    else:
        assert trainable_backbone == []


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("family,cls", [("vit", "ViTForImageClassification"), ("deit", "DeiTModel"),
                                        ("dinov2_reg", "Dinov2WithRegistersForImageClassification")])
def test_generator_prompts_through_vpt(family, cls, deep):
    """pFedPG's per-client prompts ``gen(ids)`` (B, L, K, D) as external prompts: same outputs and generator grads."""
    vit, hf = pair(family, cls)
    hf_ref = copy.deepcopy(hf)
    w_timm, w_hf = VPT(vit, num_prompts=3, deep=deep), VPT(hf, num_prompts=3, deep=deep)
    torch.manual_seed(5)
    gen = PromptGenerator(num_clients=4, num_prompts=3, embed_dim=DIM, depth=DEPTH if deep else 1, patch_size=4,
                          dtype=torch.float64)
    ids = torch.tensor([2, 0, 3])
    x = images()
    out_timm = head_oracle(hf_ref, w_timm.forward_features(x, prompts=gen(ids)), num_prefix(family))
    grads_timm = torch.autograd.grad(out_timm.square().sum(), list(gen.parameters()))
    out_hf = w_hf(x, prompts=gen(ids))
    grads_hf = torch.autograd.grad(out_hf.square().sum(), list(gen.parameters()))
    torch.testing.assert_close(out_hf, out_timm, **TOL)
    for a, b in zip(grads_hf, grads_timm):
        torch.testing.assert_close(a, b, **TOL)
    assert any(g.abs().sum() > 0 for g in grads_hf)


@pytest.mark.parametrize("family,cls", [("vit", "ViTForImageClassification"), ("dinov2", "Dinov2Model")])
def test_intermediates_equal(family, cls):
    vit, hf = pair(family, cls)
    w_timm, w_hf = VPT(vit, num_prompts=2, deep=True), VPT(hf, num_prompts=2, deep=True)
    _copy_own(w_timm, w_hf)
    x = images()
    final_t, inter_t = w_timm.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
    final_h, inter_h = w_hf.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
    torch.testing.assert_close(final_h, final_t, **TOL)
    for (a, pa), (b, pb) in zip(inter_h, inter_t):
        assert a.shape == (3, DIM, 4, 4)
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(pa, pb, **TOL)
