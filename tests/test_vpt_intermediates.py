"""``VPT.forward_intermediates``: timm's signature, prompt tokens removed from every intermediate.

Oracles: with no prompts, the model's own ``forward_intermediates``; with prompts, a hand-written block loop (for an
Eva, on a deep copy whose attention is told that the K prompts are prefix tokens)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import make_vit
from eva_oracle import images, make_eva

from fedpeft import VPT

TOL = dict(rtol=1e-5, atol=1e-5)


def _model(key: str):
    if key.startswith("eva:"):
        model, size = make_eva(key[4:], dtype=torch.float32)
        return model, size
    return make_vit(key)


KEYS = ["test_vit", "registers_no_cls", "eva:dinov3", "eva:pe"]
OPTIONS = [
    dict(indices=idx, return_prefix_tokens=rp, norm=nm, stop_early=se, output_fmt=fmt, intermediates_only=io)
    for idx, rp, nm, se, fmt, io in itertools.product([None, 1, [0]], [False, True], [False, True], [False, True],
                                                      ["NCHW", "NLC"], [False, True])
    if not (se and idx is None)
]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("key", KEYS)
def test_no_prompts_equals_timms_own_forward_intermediates(key):
    model, size = _model(key)
    x = images(size, dtype=next(model.parameters()).dtype)
    vpt = VPT(copy.deepcopy(model), num_prompts=0, deep=True).eval()
    for opts in OPTIONS:
        assert _equal(vpt.forward_intermediates(x, **opts), model.forward_intermediates(x, **opts)), opts


def _prompted_block_outputs(model, x, prompts, deep):
    """Per-block outputs (B, n_p + N, D) with the K prompt slots dropped, computed by a hand-written loop."""
    m = copy.deepcopy(model)
    n_p, K = m.num_prefix_tokens, prompts.shape[1]
    rope = None
    if hasattr(m, "rope"):  # Eva: RoPE from its own stage; the attention is told K more prefix tokens
        t, rope = m._pos_embed(m.patch_embed(x))
        for blk in m.blocks:
            blk.attn.num_prefix_tokens = n_p + K
    else:
        t = m.patch_drop(m._pos_embed(m.patch_embed(x)))
    B = t.shape[0]
    t = m.norm_pre(torch.cat([t[:, :n_p], prompts[0].expand(B, -1, -1), t[:, n_p:]], dim=1))
    outs = []
    for i, blk in enumerate(m.blocks):
        if deep and i > 0:
            t = torch.cat([t[:, :n_p], prompts[i].expand(B, -1, -1), t[:, n_p + K :]], dim=1)
        t = blk(t) if rope is None else blk(t, rope=rope)
        outs.append(torch.cat([t[:, :n_p], t[:, n_p + K :]], dim=1))
    return m, outs


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("key", KEYS)
def test_prompt_tokens_are_removed_from_every_intermediate(key, deep):
    model, size = _model(key)
    x = images(size, dtype=next(model.parameters()).dtype)
    vpt = VPT(copy.deepcopy(model), num_prompts=3, deep=deep).eval()
    m, outs = _prompted_block_outputs(model, x, vpt.prompts, deep)
    n_p, depth = m.num_prefix_tokens, len(m.blocks)
    final, inter = vpt.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
    torch.testing.assert_close(final, m.norm(outs[-1]), **TOL)
    torch.testing.assert_close(final, vpt.forward_features(x), **TOL)
    assert len(inter) == depth
    for i in range(depth):
        spatial, prefix = inter[i] if n_p else (inter[i], None)
        torch.testing.assert_close(spatial, outs[i][:, n_p:], **TOL)
        if n_p:
            torch.testing.assert_close(prefix, outs[i][:, :n_p], **TOL)
    # NCHW on the patch grid, normed, the first block only, stopping early
    got = vpt.forward_intermediates(x, indices=[0], norm=True, stop_early=True, intermediates_only=True)
    H = W = size // m.patch_embed.patch_size[0]
    expected = m.norm(outs[0])[:, n_p:].reshape(x.shape[0], H, W, -1).permute(0, 3, 1, 2)
    assert len(got) == 1
    torch.testing.assert_close(got[0], expected, **TOL)


def test_bad_output_format_and_indices():
    model, size = _model("test_vit")
    vpt = VPT(model, num_prompts=1)
    x = images(size, dtype=torch.float32)
    with pytest.raises(ValueError, match="output_fmt"):
        vpt.forward_intermediates(x, output_fmt="NHWC")
    for bad in (0, len(model.blocks) + 1, [len(model.blocks)], "last"):
        with pytest.raises(ValueError, match="indices must be"):
            vpt.forward_intermediates(x, indices=bad)
