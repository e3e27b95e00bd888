"""The frozen backbone: a small timm ViT pre-trained centrally on a public corpus (shipped), or a real timm model.

Default: ``timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=96,
depth=4, num_heads=3, global_pool="avg", class_token=False)`` (:class:`~.config.BackboneConfig`), pre-trained on the
**public corpus** (:func:`public_corpus`), which excludes the clients' images and shifts:

- letters: the 52 Latin letters of 22 TrueType fonts from matplotlib's wheel (:func:`.images.render_letters`), drawn
  afresh in every batch at a random affine, stroke width, blur and position (:func:`.images.letter_batch`), 26 classes
  (case-insensitive); ``pretrain_letters`` of them per epoch;
- scikit-learn's 1,797 real 8×8 digits, upsampled to 32×32, light random affine, 10 more classes.

One 36-class head, AdamW (wd 0.05) with a one-cycle rate, one torch thread; held out, never trained on: 10 % of the
digits and one clean drawing of every glyph (its held-out accuracies are in the recipe). It plays the role of the
papers' ImageNet-21k ViT-B/16.

**Shipped weights.** The default backbone's weights are in the repository (:data:`SHIPPED`, safetensors, with a JSON
recipe: configuration, command, torch / timm / Pillow / matplotlib versions, sha256, held-out accuracies) and are
loaded whenever the run's :class:`~.config.BackboneConfig` is the recipe's, so every machine starts from the same
bits. ``--pretrain`` rebuilds them from the recipe instead (into ``--cache``; other versions or CPUs give other bits,
hence another table); other configurations (``--smoke``) are pre-trained and cached under a key of every setting that
changes the weights (:func:`_cache_path`).

``--model NAME --checkpoint FILE``: a registered timm model with weights from a local file (timm's own loader, no
download); its classifier is dropped, its mean/std and input size are used. Every method gets a fresh copy
(:meth:`Backbone.make`) with the same new head initialization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import images as _images_module
from .config import BackboneConfig
from .images import affine, letter_batch, render_letters

__all__ = ["SHIPPED", "Backbone", "Preprocess", "build_backbone", "pretrain", "public_corpus", "sha256"]

log = logging.getLogger(__name__)

#: the shipped default backbone (weights) and its recipe (``.json`` beside it)
SHIPPED = Path(__file__).resolve().parent.parent / "backbones" / "personalize-vit.safetensors"
LETTER_CLASSES, DIGIT_CLASSES = 26, 10

#: SHA-1 of the transforms' source: part of the cache key (a changed augmentation is a different backbone)
_IMAGES_CODE = hashlib.sha1(Path(_images_module.__file__).read_bytes()).hexdigest()


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

    def make(self) -> nn.Module:
        """A fresh timm ViT: the pre-trained weights, a new ``num_classes`` head (same init on every call)."""
        vit = timm.create_model(self.cfg.model, pretrained=False, num_classes=0, **self.cfg.timm_kwargs())
        vit.load_state_dict(self.state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            vit.reset_classifier(self.num_classes)
        return vit


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digits(size: int) -> Tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(d.target, dtype=torch.int64)


def public_corpus(size: int, seed: int) -> Dict[str, Any]:
    """The public corpus's fixed parts: ``digits_train`` / ``digits_val`` (images, labels 26–35; 10 % held out),
    ``letters_val`` (one clean drawing of every glyph at a random position, labels 0–25), ``glyphs`` (their count)."""
    x, y = _digits(size)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_val = len(y) // 10
    _, labels, fonts = render_letters()
    idx = torch.arange(len(labels))
    lv, ly = letter_batch(idx, size, torch.Generator().manual_seed(seed + 1))
    return {"digits_train": (x[perm[n_val:]], y[perm[n_val:]] + LETTER_CLASSES),
            "digits_val": (x[perm[:n_val]], y[perm[:n_val]] + LETTER_CLASSES),
            "letters_val": (lv.contiguous(), ly), "glyphs": len(labels), "fonts": fonts}


@torch.no_grad()
def _accuracy(model: nn.Module, pre: Preprocess, x: Tensor, y: Tensor) -> float:
    model.eval()
    correct = sum(int((model(pre(x[i:i + 256])).argmax(-1) == y[i:i + 256]).sum()) for i in range(0, len(y), 256))
    return correct / max(len(y), 1)


def pretrain(cfg: BackboneConfig, pre: Preprocess, progress: Callable) -> Tuple[nn.Module, Dict[str, Any]]:
    """Central training on the public corpus (module docstring) with one torch thread, whatever the caller's setting:
    CPU kernels split reductions by thread count, so another count gives other low-order bits, another backbone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_1thread(cfg, pre, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain_1thread(cfg: BackboneConfig, pre: Preprocess, progress: Callable) -> Tuple[nn.Module, Dict[str, Any]]:
    seed = cfg.pretrain_seed
    torch.manual_seed(seed)
    corpus = public_corpus(cfg.img_size, seed)
    dx, dy = corpus["digits_train"]
    glyphs = corpus["glyphs"]
    g = torch.Generator().manual_seed(seed)
    model = timm.create_model(cfg.model, pretrained=False, num_classes=LETTER_CLASSES + DIGIT_CLASSES,
                              **cfg.timm_kwargs())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.05)
    per_epoch = cfg.pretrain_letters + len(dy)
    b = cfg.pretrain_batch_size
    steps_per_epoch = -(-per_epoch // b)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr,
                                                total_steps=cfg.pretrain_epochs * steps_per_epoch, pct_start=0.1)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in progress(range(cfg.pretrain_epochs), desc="pre-training backbone"):
        model.train()
        # an epoch: ``pretrain_letters`` glyph draws (every glyph about equally often) and every training digit
        letters = torch.randperm(cfg.pretrain_letters, generator=g) % glyphs
        order = torch.randperm(per_epoch, generator=g)
        for i in range(0, per_epoch, b):
            pick = order[i:i + b]
            is_letter = pick < cfg.pretrain_letters
            lx, ly = letter_batch(letters[pick[is_letter]], cfg.img_size, g)
            d = pick[~is_letter] - cfg.pretrain_letters
            x, y = torch.cat([lx, affine(dx[d], g)]), torch.cat([ly, dy[d]])
            loss = F.cross_entropy(model(pre(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    info = {
        "pretrain_images_seen": cfg.pretrain_epochs * per_epoch,
        "pretrain_glyphs": glyphs,
        "pretrain_fonts": corpus["fonts"],
        "pretrain_digits_train": len(dy),
        "heldout_letter_accuracy": _accuracy(model, pre, *corpus["letters_val"]),
        "heldout_digit_accuracy": _accuracy(model, pre, *corpus["digits_val"]),
        "pretrain_seconds": time.perf_counter() - t0,
        "pretrain_cpu_seconds": time.process_time() - cpu0,
    }
    return model, info


def _cache_path(cache: Path, cfg: BackboneConfig) -> Path:
    """Keyed by everything that changes the weights: the whole configuration (architecture, epochs, rate, batch,
    letters per epoch, seed), the transforms' code (a SHA-1 of ``images.py``), and the timm and torch versions."""
    key = json.dumps({"cfg": asdict(cfg), "images": _IMAGES_CODE, "timm": timm.__version__,
                      "torch": torch.__version__.split("+")[0], "threads": 1}, sort_keys=True)
    return cache / f"backbone-{cfg.model}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors"


def _headless_state(model: nn.Module) -> Dict[str, Tensor]:
    model.reset_classifier(0)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def recipe(path: Path = SHIPPED) -> Optional[Dict[str, Any]]:
    """The shipped weights' recipe (the JSON beside them), ``None`` when there is none."""
    meta = Path(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else None


def _load_shipped(cfg: BackboneConfig, path: Path) -> Optional[Tuple[Dict[str, Tensor], Dict[str, Any]]]:
    """The shipped weights when ``cfg`` is their recipe's configuration; ``ValueError`` on a sha256 mismatch."""
    meta = recipe(path)
    if meta is None or not path.is_file() or meta.get("config") != asdict(cfg):
        return None
    digest = sha256(path)
    if digest != meta["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} is not the recipe's {meta['sha256']} (a damaged or replaced file; "
                         f"git checkout it, or rebuild with --pretrain)")
    return load_file(str(path)), {**meta, "source": f"shipped: {path.name}", "cached": True}


def write_shipped(cfg: BackboneConfig, path: Path, command: str, progress: Callable) -> Dict[str, Any]:
    """Pre-train ``cfg`` and write the weights to ``path`` with their recipe (``path`` with ``.json``)."""
    import matplotlib
    import PIL

    pre = Preprocess(cfg.img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model, info = pretrain(cfg, pre, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_headless_state(model), str(path))
    meta = {"config": asdict(cfg), "command": command, "sha256": sha256(path), "bytes": path.stat().st_size,
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
                         "matplotlib": matplotlib.__version__}, **info}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_backbone(cfg: BackboneConfig, num_classes: int, cache: Path, seed: int, progress: Callable,
                   rebuild: bool = False) -> Backbone:
    """The shipped weights, the cached ones, or a fresh pre-training (module docstring); ``rebuild``: ``--pretrain``.
    ``progress`` wraps iterables (tqdm)."""
    if cfg.is_custom:
        if not Path(cfg.checkpoint).is_file():
            raise ValueError(f"--checkpoint {cfg.checkpoint!r} is not a file")
        model = timm.create_model(cfg.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(cfg.checkpoint)),
                                  num_classes=0)
        data_cfg = timm.data.resolve_model_data_config(model)
        pre = Preprocess(int(data_cfg["input_size"][-1]), tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
        info = {"checkpoint": str(cfg.checkpoint), "input_size": data_cfg["input_size"]}
        return Backbone(cfg, _headless_state(model), num_classes, pre, seed, info)
    pre = Preprocess(cfg.img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    shipped = None if rebuild else _load_shipped(cfg, SHIPPED)
    if shipped is not None:
        return Backbone(cfg, shipped[0], num_classes, pre, seed, shipped[1])
    path = _cache_path(cache, cfg)
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return Backbone(cfg, load_file(str(path)), num_classes, pre, seed, {**json.loads(meta.read_text()),
                                                                             "source": f"cache: {path}", "cached": True})
    model, info = pretrain(cfg, pre, progress)
    state = _headless_state(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    meta.write_text(json.dumps(info, indent=2))
    return Backbone(cfg, state, num_classes, pre, seed, {**info, "source": f"pre-trained: {path}", "cached": False})
