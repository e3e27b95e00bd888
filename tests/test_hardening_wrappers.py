"""Issue 11: boolean flags are bools, prompts are finite in the dtype they are stored in, and a ViT is not silently
shared by two wrappers (the second would change the first one's trainable set)."""

from __future__ import annotations

import copy
import gc

import pytest
import timm
import torch

from fedpeft import VPT, LowRankPrompt, ParallelPrefix, Prefix


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=3)


def _flags(module):
    return {n: p.requires_grad for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(deep="False"), "deep"), (dict(deep=0), "deep"), (dict(train_head="no"), "train_head"),
     (dict(train_head=None), "train_head")],
)
def test_vpt_flags_must_be_bools(kwargs, name):
    vit = _vit()
    flags = _flags(vit)
    with pytest.raises(TypeError, match=rf"{name} must be a bool, got"):
        VPT(vit, num_prompts=4, **kwargs)
    assert _flags(vit) == flags  # untouched
    VPT(vit, num_prompts=4)  # and still free to wrap


@pytest.mark.parametrize(
    "wrapper, kwargs",
    [(ParallelPrefix, dict(train_backbone="yes")), (ParallelPrefix, dict(train_head=1)), (Prefix, dict(length=2,
     train_backbone="False"))],
)
def test_attention_wrapper_flags_use_the_same_checker(wrapper, kwargs):
    kwargs = {"length": 2, **kwargs} if wrapper is Prefix else kwargs
    with pytest.raises(TypeError, match=r"must be (None or )?a bool"):
        wrapper(_vit(), **kwargs)


# ---- set_prompts: finite in the prompts' dtype -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, dtype, match",
    [(1e300, torch.float64, r"overflows torch.float32"), (float("nan"), torch.float32, "non-finite"),
     (float("-inf"), torch.float32, "non-finite"), (1e5, torch.float32, None)],
)
def test_set_prompts_checks_finiteness_in_the_stored_dtype(value, dtype, match):
    model = VPT(_vit(), num_prompts=2)
    before = model.prompts.detach().clone()
    new = torch.full(model.prompts.shape, value, dtype=dtype)
    if match is None:  # representable: stored
        model.set_prompts(new)
        assert torch.equal(model.prompts.detach(), new.float())
        return
    with pytest.raises(ValueError, match=match):
        model.set_prompts(new)
    assert torch.equal(model.prompts.detach(), before)


def test_set_prompts_on_fp16_prompts_refuses_what_fp16_cannot_hold():
    vit = _vit().half()
    model = VPT(vit, num_prompts=2)
    before = model.prompts.detach().clone()
    with pytest.raises(ValueError, match=r"overflows torch.float16"):
        model.set_prompts(torch.full(model.prompts.shape, 1e5))
    assert torch.equal(model.prompts.detach(), before)
    with pytest.raises(TypeError, match="floating-point"):
        model.set_prompts(torch.ones(model.prompts.shape, dtype=torch.int64))


# ---- double wrapping -------------------------------------------------------------------------------------------


def test_a_second_vpt_on_a_wrapped_vit_is_refused_and_changes_nothing():
    vit = _vit()
    first = VPT(vit, num_prompts=4)  # trains prompts and head
    flags = _flags(first)
    with pytest.raises(ValueError, match=r"already wrapped by a VPT.*Wrap the wrapper.*copy.deepcopy"):
        VPT(vit, num_prompts=2, train_head=False)  # would have frozen first's head
    assert _flags(first) == flags and first.model.head.weight.requires_grad
    with pytest.raises(ValueError, match="already wrapped by a VPT"):
        ParallelPrefix(vit, bottleneck=4)  # an adapter on the VPT's ViT directly, not through the VPT
    with pytest.raises(ValueError, match="already wrapped by a VPT"):
        Prefix(vit, length=2)
    assert _flags(first) == flags
    ParallelPrefix(first, bottleneck=4)  # wrapping the wrapper is the way to combine them
    VPT(copy.deepcopy(vit), num_prompts=2)  # a copy is independent


def test_a_vpt_on_a_vit_with_an_adapter_is_refused():
    vit = _vit()
    pp = ParallelPrefix(vit, bottleneck=4, train_backbone=True)
    flags = _flags(vit)
    with pytest.raises(ValueError, match="already wrapped by a ParallelPrefix"):
        VPT(vit, num_prompts=2)  # would freeze the backbone ParallelPrefix trains
    assert _flags(vit) == flags
    pp.eject()
    VPT(vit, num_prompts=2)  # ejected: free again


def test_a_dropped_wrapper_releases_its_vit():
    vit = _vit()
    first = VPT(vit, num_prompts=2, prompts=None)
    del first
    gc.collect()
    second = VPT(vit, num_prompts=3)
    assert second.prompts.shape == (1, 3, 64)


def test_deepcopy_and_pickle_of_a_vpt_still_work():
    import pickle

    model = VPT(_vit(), num_prompts=2, prompts=LowRankPrompt(num_prompts=2, embed_dim=64, rank=1))
    x = torch.randn(1, 3, 160, 160)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(other.eval()(x), model.eval()(x))
        with pytest.raises(ValueError, match="already wrapped"):
            VPT(other.model, num_prompts=2)


def test_a_deep_copied_adapter_claims_its_copy():
    pp = ParallelPrefix(_vit(), bottleneck=4)
    other = copy.deepcopy(pp)
    with pytest.raises(ValueError, match="already wrapped by a ParallelPrefix"):
        VPT(other.unwrap(), num_prompts=2)


def test_every_public_flag_uses_the_bool_checker():
    lowrank = LowRankPrompt(num_prompts=2, embed_dim=64, rank=1)
    with pytest.raises(TypeError, match="personal must be a bool"):
        lowrank(personal="False")  # a non-empty string would have meant True: σ + U V
    assert torch.equal(lowrank(personal=False), lowrank.global_prompt)
    model = VPT(_vit(), num_prompts=2)
    tokens = model.forward_features(torch.randn(1, 3, 160, 160))
    with pytest.raises(TypeError, match="pre_logits must be a bool"):
        model.forward_head(tokens, pre_logits="no")


# ---- issue 19.6: complex, integer and meta prompts; one image instead of a batch ------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_forward_refuses_prompts_that_are_not_floating(dtype):
    vpt = VPT(_vit(), num_prompts=2)
    prompts = torch.ones(1, 2, 64, dtype=dtype)  # complex64 used to run with its imaginary part dropped
    with pytest.raises(TypeError, match=rf"prompts must be a floating-point tensor, got dtype {dtype}"):
        vpt(torch.randn(1, 3, 160, 160), prompts=prompts)


def test_meta_prompts_are_refused_beside_real_images_and_parameters():
    vpt = VPT(_vit(), num_prompts=2)
    before = vpt.prompts.detach().clone()
    meta = torch.empty(1, 2, 64, device="meta")
    with pytest.raises(TypeError, match="prompts is a meta tensor"):
        vpt(torch.randn(1, 3, 160, 160), prompts=meta)
    with pytest.raises(TypeError, match="prompts is a meta tensor"):
        vpt.set_prompts(meta)
    assert torch.equal(vpt.prompts.detach(), before)


def test_a_meta_model_still_runs_shape_only():
    """benchmarks/coverage.py builds models on the meta device: a meta forward must keep working."""
    vit = timm.create_model("test_vit", pretrained=False, num_classes=3, device="meta")
    want = vit(torch.empty(2, 3, 160, 160, device="meta")).shape  # oracle: the plain timm model
    vpt = VPT(vit, num_prompts=2, deep=True)
    assert vpt(torch.empty(2, 3, 160, 160, device="meta")).shape == want == (2, 3)


@pytest.mark.parametrize("call", ["forward", "forward_features", "forward_intermediates"])
def test_one_image_instead_of_a_batch_is_refused(call):
    vpt = VPT(_vit(), num_prompts=2)
    with pytest.raises(ValueError, match=r"x must be a batch of images \(B, C, H, W\), got shape \(3, 160, 160\) "
                                         r"\(one image\? use x.unsqueeze\(0\)\)"):
        getattr(vpt, call)(torch.randn(3, 160, 160))
    with pytest.raises(TypeError, match="x must be a Tensor of images"):
        vpt([[0.0]])
