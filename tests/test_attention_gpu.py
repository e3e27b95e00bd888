"""GPU checks for the attention adapters: the fused SDPA kernels (flash / memory-efficient) run in every attention of a
wrapped model, forward and backward, and agree with the math kernel. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from fedpeft.parallel_prefix import ParallelPrefix
from fedpeft.prefix import Prefix
from fedpeft.vpt import VPT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEPTH = 4
SDPA_OPS = {
    SDPBackend.FLASH_ATTENTION: "aten::_scaled_dot_product_flash_attention",
    SDPBackend.EFFICIENT_ATTENTION: "aten::_scaled_dot_product_efficient_attention",
}


def _build(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if method.startswith("eva_"):  # DINOv3-S/16 geometry (head_dim 64, cls + 4 registers, RoPE), only shallower
        eva = timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=DEPTH, num_classes=10)
        if method == "eva_vpt_parallel_prefix":
            return ParallelPrefix(VPT(eva, num_prompts=5, deep=True))
        if method == "eva_prefix":
            return Prefix(ParallelPrefix(eva), length=10)
        raise ValueError(method)
    # head_dim 64 (384 / 6), 197 tokens at 224 px: the ViT-S/16 geometry, only shallower
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, depth=DEPTH, num_classes=10)
    if method == "plain":
        return vit
    if method == "parallel_prefix":
        return ParallelPrefix(vit, train_backbone=True)
    if method == "prefix":
        return Prefix(vit, length=10)
    if method == "both":
        return Prefix(ParallelPrefix(vit), length=10)
    if method == "vpt_parallel_prefix":
        return ParallelPrefix(VPT(vit, num_prompts=5, deep=True))
    raise ValueError(method)


METHODS = ["plain", "parallel_prefix", "prefix", "both", "vpt_parallel_prefix", "eva_vpt_parallel_prefix", "eva_prefix"]


@pytest.mark.parametrize(
    "backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], ids=["flash", "efficient"]
)
@pytest.mark.parametrize("method", METHODS)
def test_fused_kernel_in_every_attention(method, backend):
    model = _build(method).cuda().half().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.half)
    with profile(activities=[ProfilerActivity.CPU]) as prof, sdpa_kernel([backend]):
        out = model(x)  # raises "No available kernel" if the fused kernel cannot run
        out.float().square().mean().backward()
    torch.cuda.synchronize()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get(SDPA_OPS[backend], 0) == DEPTH, counts
    assert counts.get("aten::_softmax", 0) == 0  # no explicit softmax anywhere
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = copy.deepcopy(model).float()(x.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("method", ["parallel_prefix", "prefix"])
def test_autocast_bf16_flash(method):
    model = _build(method).cuda().train()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss = model(x).float().square().mean()
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


@pytest.mark.parametrize("method", ["parallel_prefix", "prefix", "both"])
def test_torch_compile_matches_eager(method):
    model = _build(method).cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
