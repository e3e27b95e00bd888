"""VPT, ParallelPrefix and Prefix on timm's Eva family (DINOv3, EVA-02, RoPE ViT, mixed RoPE, PE) against the
oracles in ``eva_oracle`` (the model's own stages with the attention told K more prefix tokens; an explicit-softmax
re-implementation of every block)."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from eva_oracle import EVA_MODELS, eva_adapter_oracle, images, make_eva, vpt_eva_oracle

from fedpeft import VPT, ParallelPrefix, Prefix

TOL = dict(rtol=1e-10, atol=1e-11)  # float64 throughout
KEYS = sorted(EVA_MODELS)


def _adapters(pp: ParallelPrefix) -> dict:
    return {int(i): (a.down, a.up) for i, a in pp.adapters.items()}


def _random_prefix_(pr: Prefix) -> Prefix:
    with torch.no_grad():  # larger than the N(0, 0.02²) init, so a wrong RoPE/norm on the prefix would show
        pr.keys.normal_(0, 1.0)
        pr.values.normal_(0, 1.0)
    return pr


# ---- VPT ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("key", KEYS)
def test_vpt_matches_oracle(key, deep):
    model, size = make_eva(key)
    x = images(size)
    vpt = VPT(copy.deepcopy(model), num_prompts=3, deep=deep).eval()
    out = vpt(x)
    torch.testing.assert_close(out, vpt_eva_oracle(model, x, vpt.prompts, deep=deep), **TOL)
    assert (out - model(x)).abs().max() > 1e-3  # the prompts do something
    feats = vpt.forward_head(vpt.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats, vpt_eva_oracle(model, x, vpt.prompts, deep=deep, pre_logits=True), **TOL)


@pytest.mark.parametrize("key", KEYS)
def test_vpt_zero_prompts_is_exactly_the_plain_model(key):
    model, size = make_eva(key)
    x = images(size)
    for deep in (False, True):
        assert torch.equal(VPT(copy.deepcopy(model), num_prompts=0, deep=deep).eval()(x), model(x))


@pytest.mark.parametrize("key", ["dinov3", "rope_mixed", "eva02_separate"])
def test_prompts_get_no_rotary_embedding(key):
    """Without a position, prompts are a set: permuting them leaves every output unchanged. Rotated prompts (what
    a VPT unaware of RoPE would do) break that symmetry."""
    model, size = make_eva(key)
    x = images(size)
    vpt = VPT(model, num_prompts=4, deep=True).eval()
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(vpt(x), vpt(x, prompts=vpt.prompts[:, perm]), **TOL)


@pytest.mark.parametrize("key", ["dinov3", "rope_mixed", "eva02"])
def test_vpt_patch_dropout_with_keep_indices(key):
    model, size = make_eva(key, patch_drop_rate=0.5)
    x = images(size)
    vpt = VPT(copy.deepcopy(model), num_prompts=2, deep=True).eval()
    vpt.model.patch_drop.train()  # the frozen backbone stays in eval: switch the patch dropout on by hand
    oracle_model = copy.deepcopy(model)
    oracle_model.patch_drop.train()
    torch.manual_seed(7)
    out = vpt(x)
    torch.manual_seed(7)
    expected = vpt_eva_oracle(oracle_model, x, vpt.prompts, deep=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.manual_seed(7)
    assert not torch.allclose(out, vpt_eva_oracle(model, x, vpt.prompts, deep=True))  # dropout was active


def test_vpt_dynamic_img_size_other_resolution():
    model, size = make_eva("dinov3")  # DINOv3 is built with dynamic_img_size=True
    assert model.dynamic_img_size
    vpt = VPT(copy.deepcopy(model), num_prompts=2, deep=True).eval()
    for s in (size + 16, size - 16):
        x = images(s)
        torch.testing.assert_close(vpt(x), vpt_eva_oracle(model, x, vpt.prompts, deep=True), **TOL)


@pytest.mark.parametrize("key", ["rope_mixed", "eva02_separate"])
def test_vpt_gradient_checkpointing_same_output_and_grads(key):
    model, size = make_eva(key)
    x = images(size)
    plain = VPT(copy.deepcopy(model), num_prompts=2, deep=True).eval()
    ckpt = copy.deepcopy(plain)
    ckpt.model.set_grad_checkpointing(True)
    outs = []
    for m in (plain, ckpt):
        out = m(x)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    torch.testing.assert_close(plain.prompts.grad, ckpt.prompts.grad, **TOL)
    assert plain.prompts.grad.abs().sum() > 0


def test_vpt_freezes_the_eva_and_keeps_its_state_dict_keys():
    model, _ = make_eva("dinov3")
    keys = set(model.state_dict())
    vpt = VPT(model, num_prompts=2)
    assert {n for n, p in vpt.named_parameters() if p.requires_grad} == {"prompts", "model.head.weight",
                                                                         "model.head.bias"}
    assert {k[len("model."):] for k in vpt.state_dict() if k.startswith("model.")} == keys
    assert vpt.prompts.shape == (1, 2, model.embed_dim)


# ---- ParallelPrefix / Prefix ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_parallel_prefix_matches_oracle_and_zero_init_is_exact(key):
    model, size = make_eva(key)
    x = images(size)
    pp = ParallelPrefix(copy.deepcopy(model), bottleneck=8, scale=1.5)
    out = pp(x)
    torch.testing.assert_close(out, eva_adapter_oracle(model, x, adapters=_adapters(pp)), **TOL)
    assert (out - model(x)).abs().max() > 1e-3
    zero = ParallelPrefix(copy.deepcopy(model), bottleneck=8, init="zero")
    assert torch.equal(zero(x), model(x))


@pytest.mark.parametrize("key", KEYS)
def test_prefix_matches_oracle(key):
    model, size = make_eva(key)
    x = images(size)
    pr = _random_prefix_(Prefix(copy.deepcopy(model), length=3))
    out = pr(x)
    torch.testing.assert_close(out, eva_adapter_oracle(model, x, prefix=(pr.keys, pr.values)), **TOL)
    assert (out - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("key", ["dinov3", "eva02_separate"])
def test_prefix_keeps_masked_models_masked_and_the_prefix_visible(key):
    model, size = make_eva(key)
    x = images(size)
    n = model.num_prefix_tokens + (size // model.patch_embed.patch_size[0]) ** 2
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(3)) > 0.3
    mask |= torch.eye(n, dtype=torch.bool)  # every query sees at least itself
    pr = _random_prefix_(Prefix(copy.deepcopy(model), length=3))
    out = pr(x, attn_mask=mask)
    torch.testing.assert_close(out, eva_adapter_oracle(model, x, prefix=(pr.keys, pr.values), attn_mask=mask), **TOL)
    assert not torch.allclose(out, pr(x))  # the mask mattered


def test_adapter_files_round_trip_on_an_eva(tmp_path):
    from fedpeft import load_adapter, save_adapter

    model, size = make_eva("eva02")
    x = images(size)
    for i, make in enumerate((lambda m: VPT(m, num_prompts=2, deep=True), lambda m: ParallelPrefix(m, bottleneck=4),
                              lambda m: Prefix(m, length=2))):
        a, b = make(copy.deepcopy(model)).eval(), make(copy.deepcopy(model)).eval()
        with torch.no_grad():
            for p in a.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))  # deliberately not b's values
        assert not torch.equal(a(x), b(x))
        save_adapter(a, tmp_path / str(i))
        load_adapter(b, tmp_path / str(i))
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("key", ["dinov3_qkvb", "eva02_separate", "pe"])
def test_vpt_composition_and_both_adapters_in_either_order(key):
    model, size = make_eva(key)
    x = images(size)
    vpt = VPT(copy.deepcopy(model), num_prompts=2, deep=True)
    pp = ParallelPrefix(vpt, bottleneck=8, blocks=[1])
    torch.testing.assert_close(
        pp(x), eva_adapter_oracle(model, x, adapters=_adapters(pp), prompts=vpt.prompts, deep=True), **TOL
    )
    pr = _random_prefix_(Prefix(VPT(copy.deepcopy(model), num_prompts=2), length=2))
    torch.testing.assert_close(
        pr(x), eva_adapter_oracle(model, x, prefix=(pr.keys, pr.values), prompts=pr.model.prompts), **TOL
    )
    a = ParallelPrefix(Prefix(copy.deepcopy(model), length=2), bottleneck=8)
    b = Prefix(ParallelPrefix(copy.deepcopy(model), bottleneck=8), length=2)
    for outer, pp_, pr_ in ((a, a, a.model), (b, b.model, b)):
        _random_prefix_(pr_)
        expected = eva_adapter_oracle(model, x, adapters=_adapters(pp_), prefix=(pr_.keys, pr_.values))
        torch.testing.assert_close(outer(x), expected, **TOL)
    # ejecting one keeps the other
    a.eject()
    torch.testing.assert_close(a.model(x), eva_adapter_oracle(model, x, prefix=(a.model.keys, a.model.values)), **TOL)
    a.model.eject()
    assert torch.equal(a.model.unwrap()(x), model(x))
    assert all("forward" not in vars(blk.attn) for blk in a.model.unwrap().blocks)


def test_gradients_reach_only_adapters_and_head():
    model, size = make_eva("eva02")
    x = images(size)
    for wrapper, own in ((ParallelPrefix(copy.deepcopy(model), bottleneck=8), "adapters."),
                         (Prefix(copy.deepcopy(model), length=2), "")):
        wrapper(x).square().sum().backward()
        got = {n for n, p in wrapper.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
        assert got == trainable
        assert all(n.startswith(own) or n.startswith("model.head.") or n in ("keys", "values") for n in trainable)


def test_eject_attach_twice_deepcopy_and_pickle():
    model, size = make_eva("dinov3_qkvb")
    x = images(size)
    ref = model(x)
    mine = copy.deepcopy(model)
    pp = ParallelPrefix(mine, bottleneck=8)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn already has a ParallelPrefix"):
        ParallelPrefix(mine, bottleneck=8)
    pr = Prefix(pp, length=2)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn already has a Prefix"):
        Prefix(mine, length=2)
    before = pr(x)
    for other in (copy.deepcopy(pr), pickle.loads(pickle.dumps(pr))):
        with torch.no_grad():
            other.keys.add_(1.0)
        assert not torch.equal(other(x), before) and torch.equal(pr(x), before)  # independent clients
    pr.eject()
    pp.eject()
    assert torch.equal(mine(x), ref)
    assert all("forward" not in vars(b.attn) for b in mine.blocks)


def test_someone_elses_forward_is_not_replaced():
    model, _ = make_eva("rope_vit")
    foreign = model.blocks[1].attn.forward
    model.blocks[1].attn.forward = foreign  # an instance-level forward fedpeft did not put there
    for cls, kw in ((ParallelPrefix, dict(bottleneck=4)), (Prefix, dict(length=2))):
        with pytest.raises(ValueError, match="not fedpeft's"):
            cls(model, **kw)
        assert vars(model.blocks[1].attn)["forward"] is foreign and "forward" not in vars(model.blocks[0].attn)


def test_grouped_query_attention_is_refused_for_adapters_but_vpt_works():
    model = timm.create_model("vit_base_patch16_sapiens2", pretrained=False, depth=2, embed_dim=64, num_heads=2,
                              num_kv_heads=(2, 1), img_size=32, num_classes=3).double().eval()
    x = images(32)
    for cls, kw in ((ParallelPrefix, dict(bottleneck=4)), (Prefix, dict(length=2))):
        with pytest.raises(NotImplementedError, match=r"blocks\.1\.attn is grouped-query attention"):
            cls(model, **kw)
        assert "forward" not in vars(model.blocks[0].attn)  # nothing attached to the valid block either
    pp = ParallelPrefix(copy.deepcopy(model), bottleneck=4, blocks=[0])  # the full-MHA block alone is fine
    torch.testing.assert_close(pp(x), eva_adapter_oracle(model, x, adapters=_adapters(pp)), **TOL)
    vpt = VPT(copy.deepcopy(model), num_prompts=2, deep=True).eval()
    torch.testing.assert_close(vpt(x), vpt_eva_oracle(model, x, vpt.prompts, deep=True), **TOL)


def test_naflexvit_is_refused_with_the_reason():
    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=32, num_heads=2)
    for make in (lambda: VPT(model, num_prompts=2), lambda: ParallelPrefix(model), lambda: Prefix(model, length=2)):
        with pytest.raises(TypeError, match=r"NaFlexVit .*not supported yet.*padding mask"):
            make()
