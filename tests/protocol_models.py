"""Tiny models and client data for the protocol tests: timm's ``test_vit`` cut to 2 blocks at 32×32 (16 patches)."""

from __future__ import annotations

import timm
import torch
from torch.utils.data import TensorDataset

from fedpeft import protocols

NUM_CLASSES = 3
K = 2  # prompt tokens


def vit(seed: int = 0):
    """A fresh ViT, identical for equal seeds (D = 64, 2 blocks, 3 classes)."""
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES, img_size=32, patch_size=8,
                             depth=2)


def model_for(method: str, seed: int = 0):
    """Each method's client model, built by its registry entry (``protocols.method(name).build``)."""
    return protocols.method(method).build(vit(seed), num_prompts=K, bottleneck=8, rank=2)


def client_data(num_clients: int = 3, n: int = 12, seed: int = 0):
    """``num_clients`` small labelled image sets (3×32×32), different per client."""
    g = torch.Generator().manual_seed(seed)
    return [TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
            for _ in range(num_clients)]
