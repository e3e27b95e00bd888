"""Small federations for the tests: a tiny timm ViT, C clients with a few random images each, and both engines.

``world(method, ...)`` returns the Flower side (ClientApp on a ``LocalGrid``, a strategy) and ``oracle(...)`` the
in-process engine (``fedpeft.protocols.Federation``) built from the same seeded model, data and trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import timm
import torch
from flower_harness import LocalGrid, node_context
from torch.utils.data import TensorDataset

from fedpeft.flower import ProtocolStrategy, client_app
from fedpeft.protocols import Federation, LocalTrainer, Privacy
from fedpeft.protocols import get as get_protocol
from fedpeft.protocols import method as method_entry

SEED = 0
CLASSES = 3
NODE_IDS = [9_000_000_011, 9_000_000_007, 9_000_000_003, 9_000_000_005]  # random-looking, not in partition order


def vit(seed: int = SEED) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, img_size=16,
                             patch_size=4, embed_dim=32, depth=2, num_heads=2, global_pool="avg", class_token=False)


def build(method: str, backbone_seed: int = SEED, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The client model of ``method``, built under ``torch.manual_seed(SEED)`` (the same on every call)."""
    v = vit(backbone_seed)
    torch.manual_seed(SEED)
    m = method_entry(method).build(v, num_prompts=2, bottleneck=8, rank=2)
    return m.to(dtype)


def client_data(num_clients: int, n_train: int = 12, n_test: int = 8, nan_client: Optional[int] = None,
                dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(123)
    out = []
    for c in range(num_clients):
        x = torch.randn(n_train + c + n_test, 3, 16, 16, generator=g)
        y = torch.randint(0, CLASSES, (len(x),), generator=g)
        if c == nan_client:
            x[:n_train + c] = float("nan")
        x = x.to(dtype)
        out.append((TensorDataset(x[: n_train + c], y[: n_train + c]), TensorDataset(x[n_train + c:], y[n_train + c:])))
    return out


def trainer() -> LocalTrainer:
    return LocalTrainer(epochs=1, batch_size=4, lr=5e-2, lr_backbone=5e-3)


@dataclass
class World:
    grid: LocalGrid
    strategy: ProtocolStrategy
    data: list
    method: str

    def partition_of(self, node: int) -> int:
        return int(self.grid.contexts[node].node_config["partition-id"])


def world(method: str, num_clients: int = 3, *, fraction: float = 1.0, nan_client: Optional[int] = None,
          dtype: torch.dtype = torch.float32, load_data: Optional[Callable] = None,
          node_configs: Optional[List[Dict]] = None, backbone_seed: Optional[Dict[int, int]] = None,
          check_frozen: bool = True, privacy: Optional[Privacy] = None) -> World:
    data = client_data(num_clients, nan_client=nan_client, dtype=dtype)
    protocol = get_protocol(method)
    seeds = backbone_seed or {}

    def build_model(context):
        pid = int(context.node_config["partition-id"]) if "partition-id" in context.node_config else -1
        return build(method, seeds.get(pid, SEED), dtype)

    def default_load(context):  # a node with a foreign partition id still has data (the server must refuse it)
        return data[int(context.node_config["partition-id"]) % len(data)]

    app = client_app(protocol, build_model, load_data or default_load, trainer=trainer())
    configs = node_configs or [{"partition-id": c, "num-partitions": num_clients} for c in range(num_clients)]
    contexts = {}
    for node, cfg in zip(NODE_IDS, configs):
        ctx = node_context(node, 0, num_clients)
        ctx.node_config = dict(cfg)
        contexts[node] = ctx
    grid = LocalGrid(app, contexts)
    torch.manual_seed(SEED)
    model = build(method, SEED, dtype)
    strategy = ProtocolStrategy(protocol, model, num_partitions=num_clients, seed=SEED, fraction_train=fraction,
                   registration_timeout=1.0, check_frozen=check_frozen,
                   min_nodes=min(num_clients, len(configs)), privacy=privacy)
    return World(grid, strategy, data, method)


def oracle(method: str, num_clients: int = 3, *, fraction: float = 1.0, nan_client: Optional[int] = None,
           dtype: torch.dtype = torch.float32, privacy: Optional[Privacy] = None) -> Federation:
    data = client_data(num_clients, nan_client=nan_client, dtype=dtype)
    torch.manual_seed(SEED)
    model = build(method, SEED, dtype)
    return Federation(get_protocol(method), model, [d[0] for d in data], test_data=[d[1] for d in data],
                      trainer=trainer(), seed=SEED, fraction=fraction, privacy=privacy)
