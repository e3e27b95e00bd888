"""Shared fixtures: tiny timm ViTs covering the VisionTransformer family (no download, pretrained=False)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (oracles) importable as plain modules

try:  # fedpeft.flower's tests need the optional extra (it is in dev)
    import flwr  # noqa: F401
except ImportError:
    collect_ignore_glob = ["flower/*"]


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A pytest run stopped with SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: every test's `finally` runs, so the
# SuperLinks, SuperNodes and Ray clusters the tests started are stopped by PID instead of outliving the run.
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)

# Tiny models: intra-op threads only add overhead (and oversubscribe a 2-core CI machine under pytest-xdist).
torch.set_num_threads(1)

SMALL = dict(depth=2, embed_dim=64, num_heads=2)

# name -> (timm model name, kwargs, input size). Each stands for one member of the family.
VIT_FAMILY = {
    "test_vit": ("test_vit", {}, 160),  # class token, token pooling
    "test_vit2": ("test_vit2", {}, 160),  # avg pooling, fc_norm
    "test_vit3_map": ("test_vit3", {}, 160),  # map (attention-pool) head
    "registers_no_cls": ("test_vit", dict(class_token=False, reg_tokens=2, global_pool="avg"), 160),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(SMALL, img_size=64), 64),  # 2 prefix tokens
    "deit3_no_embed_class": ("deit3_small_patch16_224", dict(SMALL, img_size=64), 64),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(SMALL, img_size=56), 56),
    "clip_norm_pre": ("vit_base_patch16_clip_224", dict(SMALL, img_size=64), 64),
    "siglip_map_no_cls": ("vit_base_patch16_siglip_224", dict(SMALL, img_size=64), 64),
    "gap_avg": ("vit_medium_patch16_gap_240", dict(SMALL, img_size=64), 64),
    "dynamic_img_size": ("test_vit", dict(dynamic_img_size=True), 128),  # another input size than 160
}


def make_vit(key: str, num_classes: int = 7, seed: int = 0):
    name, kwargs, size = VIT_FAMILY[key]
    torch.manual_seed(seed)
    vit = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    _randomize_(vit)
    return vit.eval(), size


@torch.no_grad()
def _randomize_(model: torch.nn.Module) -> None:
    """timm zero-inits some tensors (cls/reg tokens, heads, layer-scale); non-trivial values make tests sharper."""
    for p in model.parameters():
        if p.dim() <= 1 or float(p.abs().max()) == 0.0:
            p.add_(0.02 * torch.randn_like(p))
        if p.numel() and float(p.abs().max()) == 0.0:
            p.normal_(0, 0.02)


@pytest.fixture(params=sorted(VIT_FAMILY))
def family_vit(request):
    vit, size = make_vit(request.param)
    return request.param, vit, size
