"""ParallelPrefix / Prefix on a frozen backbone under timm's *reentrant* gradient checkpointing.

torch's reentrant checkpoint back-propagates into a block only if one of its *inputs* requires grad; with a frozen
backbone none does, so without fedpeft's block-input hook the adapters silently get no gradient. Oracle: the same
wrapper without checkpointing."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from oracles_attention import images, make_model

from fedpeft import VPT, ParallelPrefix, Prefix


@pytest.fixture
def reentrant():
    before = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(True)
    try:
        yield
    finally:
        timm.layers.set_reentrant_ckpt(before)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "None of the inputs have requires_grad=True" would be an error
        model(x).square().sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "make",
    [
        lambda vit: ParallelPrefix(vit, bottleneck=8),
        lambda vit: Prefix(vit, length=2),
        lambda vit: ParallelPrefix(Prefix(vit, length=2), bottleneck=8),
        lambda vit: Prefix(VPT(vit, num_prompts=2), length=2),
    ],
    ids=["parallel_prefix", "prefix", "both", "prefix_on_vpt"],
)
def test_adapters_get_the_same_gradients_as_without_checkpointing(make, reentrant):
    x = images()
    plain = make(make_model("test_vit"))
    ckpt = copy.deepcopy(plain)
    ckpt.unwrap().set_grad_checkpointing(True)
    expected = _grads(plain, x)
    got = _grads(ckpt, x)
    assert set(got) == set(expected) and any("adapters" in n or n == "keys" for n in got)
    for n in expected:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the no-grad and the ejected runs
def test_the_hook_acts_only_when_needed_and_leaves_with_eject(reentrant):
    x = images()
    vit = make_model("test_vit")
    seen = []
    vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    pp = ParallelPrefix(vit, bottleneck=8)
    pp(x)
    assert seen[-1] is False  # no checkpointing: the block input is left alone
    vit.set_grad_checkpointing(True)
    with torch.no_grad():
        pp(x)
    assert seen[-1] is False  # no grad: nothing to do
    pp(x)
    assert seen[-1] is True
    pp.eject()
    vit(x)
    assert seen[-1] is False and not vit.norm_pre._forward_hooks
