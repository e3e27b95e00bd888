"""Real data (``--data PATH``): one ImageFolder per client, split train/test per client and class.

Layout (the class folders need not be the same in every client; the label set is their union)::

    PATH/
      amazon/  back_pack/ 001.jpg …   bike/ …      ← client "amazon", ImageFolder layout
      dslr/    back_pack/ …           bike/ …
      …

Every client's images go through ``Resize(size) → CenterCrop(size) → ToTensor`` (values in [0, 1]; the backbone's
own mean/std normalization is applied later, see ``backbone.Preprocess``). Each client is split per class with
``test_fraction`` of its images for testing, deterministically from the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from torch.utils.data import Subset

from .config import DataConfig
from .data import ClientData, FederatedData, per_class_split

#: share of each class of each client folder held out as its test set
FOLDER_TEST_FRACTION = 0.25

__all__ = ["folder_federated"]


def _client_dirs(root: Path) -> List[Path]:
    if not root.is_dir():
        raise ValueError(f"--data must be a folder holding one sub-folder per client, got {str(root)!r}")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"--data {str(root)!r} has no client sub-folders (expected PATH/<client>/<class>/<image>)")
    return dirs


def folder_federated(cfg: DataConfig, seed: int, size: int) -> FederatedData:
    """Clients from ``cfg.data`` (see the module docstring); no public split (use ``--checkpoint``)."""
    from torchvision import datasets, transforms

    root = Path(cfg.data)
    dirs = _client_dirs(root)
    classes = sorted({c.name for d in dirs for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if not classes:
        raise ValueError(f"--data {str(root)!r}: no class folders inside the client folders")
    class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(classes)}

    class SharedClasses(datasets.ImageFolder):
        """ImageFolder with one label space for every client (a client may lack some classes)."""

        def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
            return classes, class_to_idx

    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    rng = np.random.default_rng(seed)
    clients = []
    for d in dirs:
        ds = SharedClasses(str(d), transform=tf, allow_empty=True)
        targets = np.asarray(ds.targets, dtype=np.int64)
        train_pos, test_pos = per_class_split(targets, FOLDER_TEST_FRACTION, rng)
        train_pos = rng.permutation(train_pos)
        test_pos = rng.permutation(test_pos)
        if len(train_pos) == 0 or len(test_pos) == 0:
            raise ValueError(f"client folder {str(d)!r} has too few images for a train/test split ({len(ds)})")
        info = {
            "train": len(train_pos),
            "test": len(test_pos),
            "train_labels": np.bincount(targets[train_pos], minlength=len(classes)).tolist(),
            "test_labels": np.bincount(targets[test_pos], minlength=len(classes)).tolist(),
        }
        clients.append(ClientData(d.name, Subset(ds, train_pos.tolist()), Subset(ds, test_pos.tolist()), info))
    description = {"source": str(root), "classes": classes, "size": size, "clients": {c.name: c.info for c in clients}}
    return FederatedData(clients, None, len(classes), description)
