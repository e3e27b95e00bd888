"""What the clients and the server share: the method, the model, each node's data and the local trainer.

- ``METHOD``: any name of ``fedpeft.protocols.METHODS`` ("pFedPG", "FedVPT", "FedPerfix", "FedPGP", ...).
- ``build_model(context)``: a small timm ViT (random weights here: offline, no download; use your pre-trained one with
  ``timm.create_model(..., pretrained=True)`` or a checkpoint) wrapped for the method by its registry entry
  (``fedpeft.protocols.method(METHOD).build``), built under a fixed seed so every node and the server hold the same
  frozen backbone and the same initial prompts and heads. Its one patch is the whole 16×16 image: with random frozen
  weights, averaging many small patches would wash out the digit's shape (per-client accuracy about chance), while
  one patch keeps it (about 0.9 after the default 3 rounds).
- ``load_data(context)``: this node's part of scikit-learn's bundled digits (1,797 real 8×8 images, offline), chosen
  by ``node_config["partition-id"]`` out of ``num-partitions``, 25 % held out for testing.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from flwr.app import Context
from torch.utils.data import TensorDataset

from fedpeft.protocols import LocalTrainer, method

METHOD = "pFedPG"
SEED = 0
PROMPTS = 4


def build_model(context: Context) -> torch.nn.Module:
    torch.manual_seed(SEED)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=16,
                            embed_dim=48, depth=2, num_heads=3, global_pool="avg", class_token=False)
    return method(METHOD).build(vit, num_prompts=PROMPTS, bottleneck=32, rank=2)


def load_data(context: Context):
    from sklearn.datasets import load_digits

    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    mine = order[pid::parts]  # a disjoint share per partition
    n_test = len(mine) // 4
    return TensorDataset(x[mine[n_test:]], y[mine[n_test:]]), TensorDataset(x[mine[:n_test]], y[mine[:n_test]])


def trainer() -> LocalTrainer:
    return LocalTrainer(epochs=2, batch_size=32, lr=1e-2, lr_backbone=5e-4)
