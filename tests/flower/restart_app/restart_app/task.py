"""The model, each node's data and the trainer, shared by the app and the test's in-process oracle."""

from __future__ import annotations

import timm
import torch
from torch.utils.data import TensorDataset

from fedpeft import VPT, LowRankPrompt
from fedpeft.protocols import LocalTrainer
from fedpeft.protocols import get as get_protocol

SEED = 0


def protocol():
    return get_protocol("FedPGP")


def build_model(context=None) -> torch.nn.Module:
    torch.manual_seed(SEED)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2, global_pool="avg", class_token=False)
    return VPT(vit, num_prompts=2, prompts=LowRankPrompt(num_prompts=2, embed_dim=32, rank=2))


def partition_data(pid: int):
    g = torch.Generator().manual_seed(100 + pid)
    x = torch.randn(40, 3, 16, 16, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return TensorDataset(x[:28], y[:28]), TensorDataset(x[28:], y[28:])


def load_data(context):
    return partition_data(int(context.node_config["partition-id"]))


def trainer() -> LocalTrainer:
    return LocalTrainer(epochs=1, batch_size=7, lr=5e-2, lr_backbone=5e-3)


