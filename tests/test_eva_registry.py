"""Every registered timm Eva model (``timm.list_models(module="eva")``), at depth 2, against the oracles.

Each is built with ``pretrained=False`` and small overrides that keep its code path (attention class, fused /
separate / biased projections, RoPE type incl. mixed and DINOv3, pooling, prefix tokens, norms, MLP type,
post-norm blocks) and only shrink its widths: ``depth=2, embed_dim=64, num_heads=2``, two patches per side. Sapiens2
keeps grouped-query attention in its second block (``num_kv_heads=(2, 1)``), where the attention adapters must refuse.
"""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from eva_oracle import eva_adapter_oracle, images, randomize_, vpt_eva_oracle
from timm.models.eva import Eva

from fedpeft import VPT, ParallelPrefix, Prefix

TOL = dict(rtol=1e-10, atol=1e-11)
EVA_NAMES = timm.list_models(module="eva")


def build(name: str) -> torch.nn.Module:
    patch = int(re.search(r"patch(\d+)", name).group(1))
    kw = dict(pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=2 * patch, num_classes=5)
    if "sapiens2" in name:  # per-block kv heads: full attention in block 0, grouped-query in block 1
        kw["num_kv_heads"] = (2, 1)
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    randomize_(model)
    return model.double().eval()


def test_the_registry_is_not_empty():
    assert len(EVA_NAMES) >= 60  # 65 in timm 1.0.31; guards against a silently empty parametrization


@pytest.mark.parametrize("name", EVA_NAMES)
def test_registered_eva(name):
    model = build(name)
    assert isinstance(model, Eva)
    x = images(model.patch_embed.img_size[0])
    plain = model(x)
    for deep in (False, True):
        assert torch.equal(VPT(copy.deepcopy(model), num_prompts=0, deep=deep).eval()(x), plain)
        vpt = VPT(copy.deepcopy(model), num_prompts=2, deep=deep).eval()
        torch.testing.assert_close(vpt(x), vpt_eva_oracle(model, x, vpt.prompts, deep=deep), **TOL)

    gqa = any(getattr(b.attn, "num_kv_groups", 1) > 1 for b in model.blocks)
    if gqa:
        for cls, kw in ((ParallelPrefix, dict(bottleneck=4)), (Prefix, dict(length=2))):
            with pytest.raises(NotImplementedError, match="grouped-query"):
                cls(model, **kw)
        return
    pp = ParallelPrefix(copy.deepcopy(model), bottleneck=4)
    torch.testing.assert_close(pp(x), eva_adapter_oracle(model, x, adapters={int(i): (a.down, a.up)
                                                                             for i, a in pp.adapters.items()}), **TOL)
    assert torch.equal(ParallelPrefix(copy.deepcopy(model), bottleneck=4, init="zero")(x), plain)
    pr = Prefix(copy.deepcopy(model), length=2)
    with torch.no_grad():
        pr.keys.normal_(0, 1.0)
        pr.values.normal_(0, 1.0)
    torch.testing.assert_close(pr(x), eva_adapter_oracle(model, x, prefix=(pr.keys, pr.values)), **TOL)
