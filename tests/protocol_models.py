"""Tiny models and client data for the protocol tests: timm's ``test_vit`` cut to 2 blocks at 32×32 (16 patches)."""

from __future__ import annotations

import timm
import torch
from torch.utils.data import TensorDataset

from fedpeft import VPT, LowRankPrompt, ParallelPrefix

NUM_CLASSES = 3
K = 2  # prompt tokens


def vit(seed: int = 0):
    """A fresh ViT, identical for equal seeds (D = 64, 2 blocks, 3 classes)."""
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES, img_size=32, patch_size=8,
                             depth=2)


def model_for(method: str, seed: int = 0):
    """Each method's client model, as docs/protocols.md lists them."""
    builders = {
        "Local": lambda: VPT(vit(seed), num_prompts=0),
        "SingleSet-VPT": lambda: VPT(vit(seed), num_prompts=K),
        "FedAvg": lambda: vit(seed),
        "FedAvg-FT": lambda: vit(seed),
        "FedRep": lambda: vit(seed),
        "FedVPT": lambda: VPT(vit(seed), num_prompts=K),
        "FedVPT-deep": lambda: VPT(vit(seed), num_prompts=K, deep=True),
        "pFedPG": lambda: VPT(vit(seed), num_prompts=K),
        "FedPerfix": lambda: ParallelPrefix(vit(seed), bottleneck=8, train_backbone=True),
        "FedPGP": lambda: VPT(vit(seed), num_prompts=K, prompts=LowRankPrompt(num_prompts=K, embed_dim=64, rank=2)),
        "VanillaAttention": lambda: vit(seed),
    }
    return builders[method]()


def client_data(num_clients: int = 3, n: int = 12, seed: int = 0):
    """``num_clients`` small labelled image sets (3×32×32), different per client."""
    g = torch.Generator().manual_seed(seed)
    return [TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
            for _ in range(num_clients)]
