"""VPT against the hand-written oracle (tests/vpt_oracle.py) and the plain timm model, over the ViT family."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import VIT_FAMILY, make_vit
from torch import nn
from vpt_oracle import vpt_oracle

from fedpeft import VPT

ATOL = 1e-5


def _images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


class FixedPrompts(nn.Module):
    """A prompt module returning a fixed (L, K, D) tensor, standing in for LowRankPrompt & co."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(tensor.clone())

    def forward(self) -> torch.Tensor:
        return self.weight * 1.0


# ---- exactness against the oracle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_matches_oracle_over_family(family_vit, deep):
    _, vit, size = family_vit
    model = VPT(vit, num_prompts=3, deep=deep).eval()
    x = _images(size)
    with torch.no_grad():
        out = model(x)
        ref = vpt_oracle(vit, x, model.prompts, deep=deep)
    assert out.shape == ref.shape == (2, 7)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_zero_prompts_is_exactly_the_plain_model(family_vit):
    _, vit, size = family_vit
    x = _images(size)
    with torch.no_grad():
        plain = vit(x)
        for deep in (False, True):
            out = VPT(vit, num_prompts=0, deep=deep).eval()(x)
            assert torch.equal(out, plain)


def test_prompts_change_the_output():
    vit, size = make_vit("test_vit")
    x = _images(size)
    with torch.no_grad():
        assert not torch.allclose(VPT(vit, num_prompts=4).eval()(x), vit(x), atol=1e-4)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("key", ["test_vit", "deit_distilled", "siglip_map_no_cls"])
def test_external_prompts_shared_and_per_sample(key, deep):
    vit, size = make_vit(key)
    model = VPT(vit, num_prompts=2, deep=deep).eval()
    L, D = model.prompt_depth, model.embed_dim
    x = _images(size, batch=3)
    shared = torch.randn(L, 5, D)  # K may differ from num_prompts
    per_sample = torch.randn(3, L, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(model(x, prompts=shared), vpt_oracle(vit, x, shared, deep=deep), atol=ATOL, rtol=0)
        out = model(x, prompts=per_sample)
        for b in range(3):  # each sample with its own prompts, one at a time
            ref = vpt_oracle(vit, x[b : b + 1], per_sample[b], deep=deep)
            torch.testing.assert_close(out[b : b + 1], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_prompt_module_source(deep):
    vit, size = make_vit("test_vit")
    L = len(vit.blocks) if deep else 1
    tensor = torch.randn(L, 4, vit.embed_dim)
    model = VPT(vit, num_prompts=4, deep=deep, prompts=FixedPrompts(tensor)).eval()
    x = _images(size)
    out = model(x)
    torch.testing.assert_close(out, vpt_oracle(vit, x, tensor, deep=deep), atol=ATOL, rtol=0)
    out.sum().backward()
    assert model.prompts.weight.grad is not None and model.prompts.weight.grad.abs().sum() > 0
    assert [n for n, _ in model.named_parameters() if n.startswith("prompts.")] == ["prompts.weight"]


def test_deep_prompts_every_layer_used_and_length_constant():
    """Each layer's prompts reach the output, and the sequence stays n_p + K + N (replaced, not accumulated)."""
    vit, size = make_vit("test_vit")
    model = VPT(vit, num_prompts=2, deep=True).eval()
    x = _images(size)
    P = model.prompts.detach().clone()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        base = model(x, prompts=P)
        for i in range(len(vit.blocks)):
            Q = P.clone()
            Q[i] += torch.randn(Q[i].shape, generator=g)  # random: LayerNorm would cancel a constant shift
            assert not torch.allclose(model(x, prompts=Q), base, atol=1e-5), f"layer {i} prompts unused"
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for b in vit.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    n_patches = (size // 16) ** 2
    assert lengths == [1 + 2 + n_patches] * len(vit.blocks)


def test_dynamic_img_size_other_resolutions():
    vit, _ = make_vit("dynamic_img_size")
    model = VPT(vit, num_prompts=3, deep=True).eval()
    for size in (96, 128, 160):
        x = _images(size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), vpt_oracle(vit, x, model.prompts, deep=True), atol=ATOL, rtol=0)


def test_pre_logits_features_match_oracle():
    vit, size = make_vit("gap_avg")
    model = VPT(vit, num_prompts=3).eval()
    x = _images(size)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(feats, vpt_oracle(vit, x, model.prompts, deep=False, pre_logits=True), atol=ATOL, rtol=0)
    assert feats.shape == (2, vit.embed_dim)


# ---- init, freezing, modes -------------------------------------------------------------------------------------------


def test_prompt_shape_and_vpt_uniform_init():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    model = VPT(vit, num_prompts=50, deep=True)
    assert isinstance(model.prompts, nn.Parameter)
    assert model.prompts.shape == (2, 50, 192)
    v = math.sqrt(6.0 / (3 * 16 * 16 + 192))
    p = model.prompts.detach()
    assert float(p.abs().max()) <= v
    assert float(p.abs().max()) > 0.95 * v
    assert abs(float(p.var()) - v * v / 3) < 0.1 * v * v / 3  # variance of U(-v, v)


def test_backbone_frozen_head_trainable_and_grads_only_there():
    vit, size = make_vit("deit_distilled")
    model = VPT(vit, num_prompts=2)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "model.head.bias", "model.head.weight", "model.head_dist.bias", "model.head_dist.weight", "prompts",
    ]
    model(_images(size)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    frozen_head = VPT(make_vit("test_vit")[0], num_prompts=2, train_head=False)
    assert [n for n, p in frozen_head.named_parameters() if p.requires_grad] == ["prompts"]


def test_train_keeps_frozen_backbone_in_eval_and_prompt_dropout_follows():
    vit = timm.create_model("test_vit", pretrained=False, drop_rate=0.5, drop_path_rate=0.5, attn_drop_rate=0.3)
    model = VPT(vit, num_prompts=3, dropout=0.5)
    model.train()
    assert model.training and model.prompt_dropout.training
    assert not any(m.training for m in vit.modules())
    x = _images(160)
    with torch.no_grad():
        P = model.prompts.detach()
        # with prompt dropout off (external prompts still pass through it) the frozen backbone is deterministic
        model.prompt_dropout.p = 0.0
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, vpt_oracle(vit.eval(), x, P, deep=False), atol=ATOL, rtol=0)
        model.prompt_dropout.p = 0.5
        assert not torch.equal(model(x), a)  # prompt dropout active in train mode
        model.eval()
        assert torch.equal(model(x), a)
    # unfreezing the backbone makes train() reach it again
    for p in vit.blocks.parameters():
        p.requires_grad_(True)
    model.train()
    assert vit.blocks[0].training


def test_backbone_state_dict_keys_and_values_untouched():
    vit, _ = make_vit("dinov2_reg4")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    model = VPT(vit, num_prompts=4, deep=True)
    assert model.unwrap() is vit
    after = vit.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # a timm checkpoint of the same architecture still loads into unwrap()
    other, _ = make_vit("dinov2_reg4", seed=3)
    model.unwrap().load_state_dict(other.state_dict())
    assert set(model.state_dict()) == {"prompts"} | {f"model.{k}" for k in before}


def test_grad_checkpointing_same_result():
    vit, size = make_vit("test_vit")
    model = VPT(vit, num_prompts=2, deep=True)
    x = _images(size)
    model(x).sum().backward()
    g = model.prompts.grad.clone()
    model.prompts.grad = None
    vit.set_grad_checkpointing(True)
    model(x).sum().backward()
    torch.testing.assert_close(model.prompts.grad, g, atol=1e-6, rtol=1e-5)


def test_set_prompts_copies_and_validates():
    vit, _ = make_vit("test_vit")
    model = VPT(vit, num_prompts=2)
    P = torch.randn(1, 2, vit.embed_dim, requires_grad=True)
    model.set_prompts(P)
    assert torch.equal(model.prompts.detach(), P.detach()) and model.prompts.requires_grad
    before = model.prompts.detach().clone()
    with pytest.raises(ValueError, match="shape"):
        model.set_prompts(torch.randn(1, 3, vit.embed_dim))
    with pytest.raises(ValueError, match="NaN"):
        model.set_prompts(torch.full((1, 2, vit.embed_dim), float("nan")))
    assert torch.equal(model.prompts.detach(), before)


def test_get_prompts_is_a_detached_copy():
    vit, _ = make_vit("test_vit")
    model = VPT(vit, num_prompts=2)
    sent = model.get_prompts()
    expected = model.prompts.detach().clone()
    assert not sent.requires_grad and torch.equal(sent, expected)
    model.set_prompts(torch.zeros_like(expected))  # writes the parameter in place
    assert torch.equal(sent, expected)  # what was sent did not change


# ---- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resnet18", {}),
        ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 1, 1, 1))),
        ("xcit_nano_12_p16_224", dict(depth=1)),
        ("beit_base_patch16_224", dict(depth=1, embed_dim=64, num_heads=2)),
        ("naflexvit_base_patch16_gap", dict(depth=1, embed_dim=32, num_heads=2)),
        ("vit_relpos_small_patch16_224", dict(depth=1)),
        ("samvit_base_patch16", dict(depth=1, embed_dim=64, num_heads=2, global_attn_indexes=(), img_size=64)),
    ],
)
def test_unsupported_models_raise_typeerror_naming_the_class(name, kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(TypeError) as err:
        VPT(model, num_prompts=2)
    assert type(model).__name__ in str(err.value) and "VisionTransformer" in str(err.value)


def test_not_a_module_and_wrapper_inputs_raise():
    with pytest.raises(TypeError, match="VisionTransformer"):
        VPT("vit", num_prompts=2)
    vit, _ = make_vit("test_vit")
    with pytest.raises(TypeError, match=r"VPT must wrap the ViT directly"):
        VPT(VPT(vit, num_prompts=1), num_prompts=1)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_num_prompts(bad):
    vit, _ = make_vit("test_vit")
    with pytest.raises(ValueError, match="num_prompts"):
        VPT(vit, num_prompts=bad)


def test_bad_dropout_and_prompt_module():
    vit, _ = make_vit("test_vit")
    with pytest.raises(ValueError, match="dropout"):
        VPT(vit, num_prompts=2, dropout=1.0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        VPT(vit, num_prompts=2, prompts=torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match=r"\(L, K, D\)"):
        VPT(vit, num_prompts=2, deep=True, prompts=FixedPrompts(torch.zeros(1, 2, 64)))
    # a refused construction leaves the user's model trainable as it was
    assert all(p.requires_grad for p in vit.parameters())


@pytest.mark.parametrize("shape", [(2, 3, 64), (1, 3, 32), (5, 1, 3, 64), (2, 2, 3, 64), (3, 64)])
def test_bad_external_prompt_shapes(shape):
    vit, size = make_vit("test_vit")
    model = VPT(vit, num_prompts=3)
    with pytest.raises(ValueError, match=r"\(L, K, D\) or \(B, L, K, D\)"):
        model(_images(size), prompts=torch.zeros(shape))


def test_family_table_is_complete():
    """The family list in conftest covers what the issue asks for (a guard against silently dropping a case)."""
    assert {"test_vit", "test_vit2", "registers_no_cls", "deit_distilled", "deit3_no_embed_class", "dinov2_reg4",
            "clip_norm_pre", "siglip_map_no_cls", "gap_avg", "dynamic_img_size"} <= set(VIT_FAMILY)
