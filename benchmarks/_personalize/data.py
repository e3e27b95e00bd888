"""The embedded data: scikit-learn's bundled handwritten digits, split into a public part and heterogeneous clients.

``load_digits`` holds 1,797 real 8×8 grey images of 10 classes. They are upsampled (bilinear) to ``size``×``size``,
copied to 3 channels, and split:

1. **public** (``public_fraction``, stratified): clean digits for pre-training the backbone. Disjoint from every
   client; it plays the role of the papers' ImageNet-21k pre-training.
2. the rest over **clients**, either
   - ``domain``: class-balanced, disjoint parts; client ``c`` sees every image through shift ``c`` of
     :mod:`.shifts` (feature skew, like Office-Caltech10 / DomainNet in pFedPG Table 1), or
   - ``dirichlet``: clean images, label skew: for each class, its samples are divided among the clients in
     proportions drawn from Dir(α·1) (α = 0.1 as pFedPG's CIFAR Dir(0.1), Table 2), redrawn until every client
     holds at least ``min_client_size`` samples.
3. per client a **train/test** split, per class (``test_fraction``), so each client's test labels follow its own
   training distribution (personalized evaluation).

Everything is a deterministic function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .config import DataConfig
from .shifts import SHIFTS, apply_shift

__all__ = ["ClientData", "FederatedData", "digits_federated", "per_class_split"]

DEFAULT_CLIENTS = {"domain": len(SHIFTS), "dirichlet": 10}


@dataclass
class ClientData:
    """One client's private data: a name (its domain or index), a train and a test ``Dataset`` of (image, label)."""

    name: str
    train: Dataset
    test: Dataset
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FederatedData:
    """The clients, the public pre-training set (``None`` for real data), and the number of classes."""

    clients: List[ClientData]
    public: Optional[Dataset]
    num_classes: int
    description: Dict[str, Any] = field(default_factory=dict)


def _digits(size: int) -> Tuple[Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1).contiguous(), d.target.astype(np.int64)


def per_class_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Positions ``(rest, picked)`` with ``round(fraction · n_c)`` of each class's ``n_c`` samples picked."""
    picked = []
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        picked.extend(pos[: int(fraction * len(pos) + 0.5)])
    picked = np.sort(np.asarray(picked, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), picked), picked


def _domain_parts(labels: np.ndarray, clients: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Class-balanced disjoint parts: each class's samples dealt round-robin from a random start."""
    parts: List[list] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        start = int(rng.integers(clients))
        for j, p in enumerate(pos):
            parts[(start + j) % clients].append(p)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_parts(
    labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator, min_size: int
) -> List[np.ndarray]:
    """Label skew: class c's samples split in proportions ~ Dir(α·1); redrawn until every client has ≥ min_size."""
    if clients * min_size > len(labels):
        raise ValueError(f"could not draw a Dir({alpha}) split giving {clients} clients ≥ {min_size} samples each: "
                         f"there are only {len(labels)} samples")
    for _ in range(1000):
        parts: List[list] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            pos = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(pos)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(pos, cuts)):
                parts[k].extend(chunk)
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not draw a Dir({alpha}) split giving {clients} clients ≥ {min_size} samples each")


def _histogram(y: Tensor, num_classes: int) -> List[int]:
    return torch.bincount(y, minlength=num_classes).tolist()


def digits_federated(cfg: DataConfig, seed: int, size: int = 32) -> FederatedData:
    """The embedded federated data set (see the module docstring) at ``size``×``size`` pixels, 3 channels."""
    if cfg.split not in DEFAULT_CLIENTS:
        raise ValueError(f"split must be one of {sorted(DEFAULT_CLIENTS)}, got {cfg.split!r}")
    if not 0.0 < cfg.alpha < float("inf"):
        raise ValueError(f"alpha must be > 0, got {cfg.alpha}")
    clients = cfg.clients or DEFAULT_CLIENTS[cfg.split]
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    rng = np.random.default_rng(seed)
    x, y = _digits(size)
    rest, public = per_class_split(y, cfg.public_fraction, rng)
    if cfg.split == "domain":
        parts = _domain_parts(y[rest], clients, rng)
    else:
        min_size = 8 if cfg.max_train_per_client else 20
        parts = _dirichlet_parts(y[rest], clients, cfg.alpha, rng, min_size)
    shift_names = list(SHIFTS)
    out = []
    for c, part in enumerate(parts):
        idx = rest[part]
        xc, yc = x[idx], torch.as_tensor(y[idx])
        if cfg.split == "domain":
            shift = shift_names[c % len(shift_names)]
            name = shift if clients <= len(shift_names) else f"{shift}{c // len(shift_names)}"
            xc = apply_shift(shift, xc, seed * 1000 + c)
        else:
            name = f"client{c}"
        train_pos, test_pos = per_class_split(yc.numpy(), cfg.test_fraction, rng)
        train_pos = rng.permutation(train_pos)[: cfg.max_train_per_client]
        test_pos = rng.permutation(test_pos)[: cfg.max_test_per_client]
        train = TensorDataset(xc[train_pos], yc[train_pos])
        test = TensorDataset(xc[test_pos], yc[test_pos])
        info = {
            "train": len(train_pos),
            "test": len(test_pos),
            "train_labels": _histogram(yc[train_pos], 10),
            "test_labels": _histogram(yc[test_pos], 10),
        }
        out.append(ClientData(name, train, test, info))
    description = {
        "source": "sklearn.datasets.load_digits (1,797 real 8x8 digits), upsampled bilinear",
        "size": size,
        "split": cfg.split,
        "alpha": cfg.alpha if cfg.split == "dirichlet" else None,
        "public": len(public),
        "clients": {c.name: c.info for c in out},
    }
    return FederatedData(out, TensorDataset(x[public], torch.as_tensor(y[public])), 10, description)
