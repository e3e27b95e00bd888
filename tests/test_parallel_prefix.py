"""ParallelPrefix (FedPerfix) against the explicit-softmax oracle in ``oracles_attention``."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from oracles_attention import MODELS, clone, images, make_model, vit_oracle

from fedpeft import _wrapping
from fedpeft.parallel_prefix import ParallelPrefix
from fedpeft.prefix import Prefix
from fedpeft.vpt import VPT

TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout


def _adapters(pp: ParallelPrefix) -> dict:
    return {int(i): (a.down, a.up) for i, a in pp.adapters.items()}


@pytest.fixture(scope="module")
def x():
    return images()


@pytest.mark.parametrize("key", sorted(MODELS))
def test_matches_explicit_softmax_oracle(key, x):
    vit = make_model(key)
    pp = ParallelPrefix(clone(vit), bottleneck=8, scale=1.5)
    out = pp(x)
    expected = vit_oracle(vit, x, adapters=_adapters(pp), scale=1.5)
    torch.testing.assert_close(out, expected, **TOL)
    assert (out - vit(x)).abs().max() > 1e-2  # the adapters do something


def test_blocks_subset_and_negative_indices(x):
    vit = make_model("test_vit")
    pp = ParallelPrefix(clone(vit), bottleneck=4, scale=0.7, blocks=[-1, 2, 0])
    assert pp.blocks == (0, 2, 5)
    assert sorted(pp.adapters.keys()) == ["0", "2", "5"]
    torch.testing.assert_close(pp(x), vit_oracle(vit, x, adapters=_adapters(pp), scale=0.7), **TOL)


def test_state_dict_keys_and_shapes():
    vit = make_model("test_vit", dtype=torch.float32)
    pp = ParallelPrefix(vit, bottleneck=16, blocks=[3])
    sd = pp.state_dict()
    assert sd["adapters.3.down.weight"].shape == (16, 64)
    assert sd["adapters.3.down.bias"].shape == (16,)
    assert sd["adapters.3.up.weight"].shape == (128, 16)
    assert sd["adapters.3.up.bias"].shape == (128,)
    assert "model.blocks.0.attn.qkv.weight" in sd
    assert set(vit.state_dict()) == {
        k[len("model.") :] for k in sd if k.startswith("model.")
    }  # timm keys intact
    assert sd["adapters.3.up.weight"].dtype == torch.float32


def test_zero_init_is_exactly_the_plain_model(x):
    for key in MODELS:
        vit = make_model(key)
        pp = ParallelPrefix(clone(vit), init="zero")
        assert torch.count_nonzero(pp.adapters["0"].up.weight) == 0
        assert torch.count_nonzero(pp.adapters["0"].down.weight) > 0
        assert torch.equal(pp(x), vit(x))


def test_fedperfix_init_is_nn_linear_default():
    vit = make_model("test_vit", dtype=torch.float32)
    torch.manual_seed(123)
    pp = ParallelPrefix(vit, bottleneck=32, blocks=[0])
    torch.manual_seed(123)
    down, up = torch.nn.Linear(64, 32), torch.nn.Linear(32, 128)
    a = pp.adapters["0"]
    # same distributions as nn.Linear's reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert torch.equal(a.down.weight, down.weight) and torch.equal(a.down.bias, down.bias)
    assert torch.equal(a.up.weight, up.weight) and torch.equal(a.up.bias, up.bias)


def test_vpt_composition_matches_oracle_with_prompts(x):
    vit = make_model("registers")
    for deep in (False, True):
        vpt = VPT(clone(vit), num_prompts=3, deep=deep)
        with torch.no_grad():
            vpt.prompts.normal_(0, 1.0)
        pp = ParallelPrefix(vpt, bottleneck=8)
        expected = vit_oracle(vit, x, adapters=_adapters(pp), prompts=vpt.prompts, deep=deep)
        torch.testing.assert_close(pp(x), expected, **TOL)
        assert pp.unwrap() is vpt.model is _wrapping.innermost(pp)
        assert pp.model is vpt
        # external prompts pass through the wrapper's forward
        P = torch.randn_like(vpt.prompts)
        expected = vit_oracle(vit, x, adapters=_adapters(pp), prompts=P, deep=deep)
        torch.testing.assert_close(pp(x, prompts=P), expected, **TOL)
    keys = set(pp.state_dict())
    assert {"model.prompts", "model.model.blocks.0.attn.qkv.weight", "adapters.3.down.weight"} <= keys


def test_with_prefix_both_orders_match_oracle(x):
    vit = make_model("test_vit2")
    for order in ("pp_outside", "prefix_outside"):
        if order == "pp_outside":
            pre = Prefix(clone(vit), length=2)
            pp = ParallelPrefix(pre, bottleneck=8)
            outer = pp
        else:
            pp = ParallelPrefix(clone(vit), bottleneck=8)
            pre = Prefix(pp, length=2)
            outer = pre
        expected = vit_oracle(vit, x, adapters=_adapters(pp), prefix=(pre.keys, pre.values))
        torch.testing.assert_close(outer(x), expected, **TOL)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_only_adapters_and_head_when_frozen(x):
    vit = make_model("test_vit")
    pp = ParallelPrefix(clone(vit), bottleneck=8, blocks=[1, 4])
    trainable = {n for n, p in pp.named_parameters() if p.requires_grad}
    expected = {f"adapters.{i}.{m}.{t}" for i in (1, 4) for m in ("down", "up") for t in ("weight", "bias")}
    assert trainable == expected | {"model.head.weight", "model.head.bias"}
    assert _grads(pp, x) == trainable

    pp = ParallelPrefix(clone(vit), bottleneck=8, train_head=False)
    assert all(n.startswith("adapters.") for n, p in pp.named_parameters() if p.requires_grad)


def test_train_backbone_trains_everything(x):
    vit = make_model("test_vit")
    pp = ParallelPrefix(clone(vit), bottleneck=8, train_backbone=True)
    assert all(p.requires_grad for p in pp.parameters())
    got = _grads(pp, x)
    assert {"model.blocks.0.attn.qkv.weight", "model.patch_embed.proj.weight", "model.cls_token"} <= got
    assert "adapters.0.down.weight" in got
    pp.train()
    assert pp.model.training and pp.model.blocks[0].training  # a trained backbone follows train()


def test_frozen_backbone_stays_in_eval_mode():
    pp = ParallelPrefix(make_model("test_vit", dtype=torch.float32), bottleneck=8)
    pp.train()
    assert pp.training and pp.adapters.training
    assert not pp.model.training and not pp.model.blocks[0].attn.training


def test_wrapping_vpt_keeps_its_freezing_unless_train_backbone(x):
    vit = make_model("test_vit")
    vpt = VPT(clone(vit), num_prompts=2, train_head=False)
    pp = ParallelPrefix(vpt, bottleneck=8)
    assert pp.train_head is False
    trainable = {n for n, p in pp.named_parameters() if p.requires_grad}
    assert "model.prompts" in trainable and not any(".head." in n for n in trainable)
    assert not any(n.startswith("model.model.blocks") for n in trainable)

    vpt = VPT(clone(vit), num_prompts=2)
    pp = ParallelPrefix(vpt, bottleneck=8, train_backbone=True)
    assert all(p.requires_grad for p in pp.parameters())
    assert "model.model.blocks.2.mlp.fc1.weight" in _grads(pp, x)


def test_sdpa_runs_and_no_explicit_softmax(monkeypatch, x):
    vit = make_model("test_vit")
    pp = ParallelPrefix(clone(vit), bottleneck=8)
    calls = {"sdpa": 0, "softmax": 0}
    sdpa, softmax = F.scaled_dot_product_attention, torch.Tensor.softmax

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def counting_softmax(self, *args, **kwargs):
        calls["softmax"] += 1
        return softmax(self, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(torch.Tensor, "softmax", counting_softmax)
    pp(x)
    assert calls == {"sdpa": len(vit.blocks), "softmax": 0}


def test_unfused_layers_warn_and_stay_exact(x):
    vit = make_model("test_vit")
    unfused = clone(vit)
    unfused.blocks[2].attn.fused_attn = False
    with pytest.warns(UserWarning, match=r"blocks \[2\].*explicit-softmax"):
        pp = ParallelPrefix(unfused, bottleneck=8)
    torch.testing.assert_close(pp(x), vit_oracle(vit, x, adapters=_adapters(pp)), **TOL)


def test_eject_restores_the_plain_model_exactly(x):
    vit = make_model("test_vit")
    ref = vit(x)
    mine = clone(vit)
    pp = ParallelPrefix(mine, bottleneck=8)
    assert pp.unwrap() is mine
    assert not torch.equal(mine(x), ref)  # unwrap(): the adapters are still attached
    assert pp.eject() is mine
    assert torch.equal(mine(x), ref)
    assert all(len(b.attn.qkv._forward_hooks) == 0 for b in mine.blocks)
    assert pp.eject() is mine  # idempotent
    with pytest.raises(RuntimeError, match="ejected"):
        pp(x)
    ParallelPrefix(mine, bottleneck=8)  # can attach again after eject


def test_eject_through_vpt(x):
    vit = make_model("test_vit")
    vpt = VPT(clone(vit), num_prompts=2)
    plain = vpt(x)
    pp = ParallelPrefix(vpt, bottleneck=8)
    assert pp.eject() is vpt.model
    assert torch.equal(vpt(x), plain)


def test_attaching_twice_is_refused_and_leaves_the_model_untouched(x):
    vit = make_model("test_vit")
    pp = ParallelPrefix(vit, bottleneck=8, blocks=[3])
    before = {id(b.attn.qkv): len(b.attn.qkv._forward_hooks) for b in vit.blocks}
    flags = {n: p.requires_grad for n, p in vit.named_parameters()}
    with pytest.raises(ValueError, match=r"blocks\.3\.attn already has a ParallelPrefix"):
        ParallelPrefix(vit, bottleneck=8, train_backbone=True)
    assert {id(b.attn.qkv): len(b.attn.qkv._forward_hooks) for b in vit.blocks} == before
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags
    with pytest.raises(ValueError, match="already has a ParallelPrefix"):
        ParallelPrefix(pp, bottleneck=8)
    ParallelPrefix(vit, bottleneck=8, blocks=[0, 1])  # other layers are free


def test_deepcopy_and_pickle_give_independent_clients(x):
    vit = make_model("test_vit")
    pp = ParallelPrefix(clone(vit), bottleneck=8)
    before = pp(x)
    for other in (copy.deepcopy(pp), pickle.loads(pickle.dumps(pp))):
        with torch.no_grad():
            other.adapters["2"].up.bias.add_(1.0)
        torch.testing.assert_close(other(x), vit_oracle(vit, x, adapters=_adapters(other)), **TOL)
        assert torch.equal(pp(x), before)  # the original is untouched
        assert not torch.equal(other(x), before)
        other.eject()
        assert torch.equal(other.unwrap()(x), vit(x))
        assert torch.equal(pp(x), before)


def test_load_state_dict_is_seen(x):
    vit = make_model("test_vit")
    a, b = ParallelPrefix(clone(vit), bottleneck=8), ParallelPrefix(clone(vit), bottleneck=8)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()}, assign=True)
    assert torch.equal(a(x), b(x))


def test_adapter_config():
    vit = make_model("test_vit", dtype=torch.float32)
    cfg = ParallelPrefix(
        VPT(vit, num_prompts=2), bottleneck=16, scale=0.5, blocks=[4, 5], init="zero"
    ).adapter_config()
    assert cfg == {
        "method": "ParallelPrefix",
        "bottleneck": 16,
        "scale": 0.5,
        "blocks": [4, 5],
        "init": "zero",
        "attn_dim": 64,
        "train_backbone": False,
        "train_head": True,
        "backbone": "VisionTransformer",
        "embed_dim": 64,
        "depth": 6,
        "wraps": "VPT",
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bottleneck=0), "bottleneck"),
        (dict(bottleneck=-3), "bottleneck"),
        (dict(bottleneck=2.5), "bottleneck"),
        (dict(bottleneck=True), "bottleneck"),
        (dict(init="xavier"), "init"),
        (dict(scale=float("nan")), "scale"),
        (dict(blocks=[6]), "out of range"),
        (dict(blocks=[-7]), "out of range"),
        (dict(blocks=[]), "empty"),
        (dict(blocks=[1, 1]), "twice"),
    ],
)
def test_bad_arguments(kwargs, match):
    vit = make_model("test_vit", dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        ParallelPrefix(vit, **kwargs)
    assert all(len(b.attn.qkv._forward_hooks) == 0 for b in vit.blocks)
    assert all(p.requires_grad for p in vit.parameters())  # untouched


def test_bad_argument_types():
    vit = make_model("test_vit", dtype=torch.float32)
    with pytest.raises(TypeError, match="blocks"):
        ParallelPrefix(vit, blocks=3)
    with pytest.raises(TypeError, match="train_backbone"):
        ParallelPrefix(vit, train_backbone="yes")
    with pytest.raises(TypeError):
        ParallelPrefix(torch.nn.Linear(3, 3))


SMALL = dict(pretrained=False, depth=1, embed_dim=32, num_heads=2, num_classes=3)


@pytest.mark.parametrize("cls", [ParallelPrefix, Prefix])
def test_unsupported_attention_is_refused(cls):
    kw = dict(bottleneck=4) if cls is ParallelPrefix else dict(length=2)
    xp = timm.create_model("vit_base_patch16_xp_224", img_size=32, **SMALL)  # ParallelScalingBlock
    with pytest.raises(TypeError, match=r"blocks\.0"):
        cls(xp, **kw)
    naflex = timm.create_model("naflexvit_base_patch16_gap", **SMALL)  # Eva is supported (tests/test_eva.py)
    with pytest.raises(TypeError, match="NaFlexVit"):
        cls(naflex, **kw)
    diff = timm.create_model("test_vit", pretrained=False, depth=1, attn_layer="diff", num_classes=3)
    with pytest.raises(TypeError, match=r"blocks\.0\.attn.*DiffAttention"):
        cls(diff, **kw)
    gated = timm.create_model("test_vit", pretrained=False, depth=2, num_classes=3)
    gated.blocks[1].attn.gate = torch.nn.Linear(64, 64)
    with pytest.raises(NotImplementedError, match=r"blocks\.1\.attn.*gated"):
        cls(gated, **kw)
    assert "forward" not in vars(gated.blocks[0].attn) and not gated.blocks[0].attn.qkv._forward_hooks


def test_adapter_file_round_trip(tmp_path, x):
    from fedpeft.adapter_io import load_adapter, save_adapter

    vit = make_model("test_vit")
    a = ParallelPrefix(VPT(clone(vit), num_prompts=2), bottleneck=8, blocks=[1, 3])
    save_adapter(a, tmp_path)
    b = ParallelPrefix(VPT(clone(vit), num_prompts=2), bottleneck=8, blocks=[1, 3])
    assert not torch.equal(a(x), b(x))
    load_adapter(b, tmp_path)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError):  # another block set: keys differ, nothing copied
        load_adapter(ParallelPrefix(VPT(clone(vit), num_prompts=2), bottleneck=8, blocks=[1]), tmp_path)
