"""The frozen backbone: a small timm ViT pre-trained centrally on the public digits (cached), or a real timm model.

Default: ``timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=96,
depth=4, num_heads=3, global_pool="avg", class_token=False)``, a 0.46 M-parameter ``VisionTransformer`` (16 patch
tokens, mean pooling), trained from scratch on the public split (AdamW, one-cycle schedule, one torch thread; 10 % of
the public split held out to report its accuracy) under the ``clean`` or ``broad`` augmentation of :mod:`.augment`.
It plays the role of the papers' ImageNet-21k ViT-B/16. The weights are cached under ``--cache`` as safetensors,
keyed by every setting that changes them (see ``_cache_path``), so later runs skip pre-training.

``--model NAME --checkpoint FILE``: a registered timm model with weights from a local file (timm's own loader,
``pretrained_cfg_overlay=dict(file=FILE)``, no download); its classifier is dropped, its mean/std and input size are
used. Every method then gets a fresh copy (:meth:`Backbone.make`) with the same new head initialization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import augment as _augment_module
from .augment import PRETRAIN_AUGMENT
from .config import BackboneConfig

__all__ = ["Backbone", "Preprocess", "build_backbone"]

log = logging.getLogger(__name__)

#: SHA-1 of the augmentation policies' source: part of the cache key
_AUGMENT_CODE = hashlib.sha1(Path(_augment_module.__file__).read_bytes()).hexdigest()


class Preprocess(nn.Module):
    """Images in [0, 1] (B, 3, h, w) → the backbone's input: resized to ``size`` if needed, then (x − mean) / std."""

    def __init__(self, size: int, mean: Tuple[float, ...], std: Tuple[float, ...]) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


@dataclass
class Backbone:
    """Pre-trained weights (classifier removed) and how to build fresh copies with a new head."""

    cfg: BackboneConfig
    state: Dict[str, Tensor]
    num_classes: int
    preprocess: Preprocess
    seed: int
    info: Dict[str, Any] = field(default_factory=dict)

    def _create(self, num_classes: int) -> nn.Module:
        return timm.create_model(self.cfg.model, pretrained=False, num_classes=num_classes, **self.cfg.timm_kwargs())

    def make(self) -> nn.Module:
        """A fresh timm ViT: the pre-trained weights, a new ``num_classes`` head (same init on every call)."""
        vit = self._create(0)
        vit.load_state_dict(self.state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            vit.reset_classifier(self.num_classes)
        return vit


@torch.no_grad()
def _accuracy(model: nn.Module, pre: Preprocess, ds: Dataset) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(ds, batch_size=256):
        correct += int((model(pre(x)).argmax(-1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def _pretrain(cfg: BackboneConfig, public: TensorDataset, pre: Preprocess, seed: int, progress) -> Tuple[nn.Module, Dict]:
    """Central training of the small ViT on the public digits; 10 % held out (not augmented) to report its accuracy.

    Runs with one torch thread whatever the caller's setting: CPU kernels split their reductions by thread count,
    so a different count gives different low-order bits and, after 60 epochs, a different backbone.
    """
    if cfg.pretrain_augment not in PRETRAIN_AUGMENT:
        raise ValueError(f"pretrain_augment must be one of {sorted(PRETRAIN_AUGMENT)}, got {cfg.pretrain_augment!r}")
    augment = PRETRAIN_AUGMENT[cfg.pretrain_augment]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_1thread(cfg, public, pre, seed, progress, augment)
    finally:
        torch.set_num_threads(threads)


def _pretrain_1thread(cfg, public, pre, seed, progress, augment) -> Tuple[nn.Module, Dict]:
    torch.manual_seed(seed)
    x, y = public.tensors
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_val = max(1, len(y) // 10)
    val, train = TensorDataset(x[perm[:n_val]], y[perm[:n_val]]), TensorDataset(x[perm[n_val:]], y[perm[n_val:]])
    model = timm.create_model(cfg.model, pretrained=False, num_classes=10, **cfg.timm_kwargs())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.05)
    loader = DataLoader(train, batch_size=cfg.pretrain_batch_size, shuffle=True, generator=g, drop_last=False)
    steps = cfg.pretrain_epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=steps, pct_start=0.1)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in progress(range(cfg.pretrain_epochs), desc="pre-training backbone"):
        model.train()
        for xb, yb in loader:
            loss = F.cross_entropy(model(pre(augment(xb, g))), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    info = {
        "pretrain_train_images": len(train),
        "pretrain_val_images": len(val),
        "pretrain_val_accuracy": _accuracy(model, pre, val),
        "pretrain_seconds": time.perf_counter() - t0,
        "pretrain_cpu_seconds": time.process_time() - cpu0,
        "pretrain_augment": cfg.pretrain_augment,
    }
    return model, info


def _cache_path(cache: Path, cfg: BackboneConfig, public: TensorDataset, seed: int) -> Path:
    """Keyed by everything that changes the weights: the whole configuration (architecture, pre-training epochs,
    rate, batch, augmentation policy name), the code of the augmentation policies (a SHA-1 of ``augment.py``: a changed
    policy is a different backbone), the seed, the exact public images and labels (a SHA-1 of their bytes), and the
    timm and torch versions (their initializations and kernels)."""
    x, y = public.tensors
    digest = hashlib.sha1(x.contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().tobytes())
    key = json.dumps(
        {"cfg": asdict(cfg), "seed": seed, "data": digest.hexdigest(), "augment": _AUGMENT_CODE, "timm": timm.__version__,
         "torch": torch.__version__.split("+")[0], "threads": 1},
        sort_keys=True,
    )
    return cache / f"backbone-{cfg.model}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors"


def _headless_state(model: nn.Module) -> Dict[str, Tensor]:
    model.reset_classifier(0)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_backbone(
    cfg: BackboneConfig, public: Optional[Dataset], num_classes: int, cache: Path, seed: int, progress
) -> Backbone:
    """Load or pre-train the backbone (see the module docstring); ``progress`` wraps iterables (tqdm)."""
    if cfg.is_custom:
        if not Path(cfg.checkpoint).is_file():
            raise ValueError(f"--checkpoint {cfg.checkpoint!r} is not a file")
        model = timm.create_model(
            cfg.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(cfg.checkpoint)), num_classes=0
        )
        data_cfg = timm.data.resolve_model_data_config(model)
        pre = Preprocess(int(data_cfg["input_size"][-1]), tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
        info = {"checkpoint": str(cfg.checkpoint), "input_size": data_cfg["input_size"]}
        return Backbone(cfg, _headless_state(model), num_classes, pre, seed, info)
    pre = Preprocess(cfg.img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    if public is None:
        raise ValueError("the default backbone is pre-trained on the public digits; with --data give --checkpoint")
    path = _cache_path(cache, cfg, public, seed)
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        info["cached"] = True
        return Backbone(cfg, load_file(str(path)), num_classes, pre, seed, info)
    model, info = _pretrain(cfg, public, pre, seed, progress)
    state = _headless_state(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    info["cache_file"] = str(path)
    meta.write_text(json.dumps(info, indent=2))
    info["cached"] = False
    return Backbone(cfg, state, num_classes, pre, seed, info)
