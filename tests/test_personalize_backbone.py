"""The main job's backbone cache key and pre-training augmentations (``benchmarks/_personalize``).

Oracles: the list of ``BackboneConfig`` fields (every one must change the key), hand-built inputs whose augmented
values are known (an all-black image stays black under the affine; an all-grey image is unchanged by the affine's
interior), and the definition of each broad transform on its own.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _personalize.augment import PRETRAIN_AUGMENT, affine, broad
from _personalize.backbone import _cache_path
from _personalize.config import BackboneConfig


def _public(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(20, 3, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g))


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2
    if value is None:
        return "weights.pth"
    return {"vit_tiny_patch16_224": "vit_small_patch16_224", "avg": "token", "clean": "broad"}.get(value, value + "x")


def test_cache_key_changes_with_every_setting(tmp_path):
    cfg, public = BackboneConfig(), _public()
    base = _cache_path(tmp_path, cfg, public, 0)
    assert base == _cache_path(tmp_path, BackboneConfig(), _public(), 0)  # same inputs, same file
    for f in dataclasses.fields(BackboneConfig):
        other = dataclasses.replace(cfg, **{f.name: _changed(getattr(cfg, f.name))})
        assert _cache_path(tmp_path, other, public, 0) != base, f.name
    assert _cache_path(tmp_path, cfg, public, 1) != base  # seed
    x, y = public.tensors
    nudged = x.clone()
    nudged[0, 0, 0, 0] += 1e-6  # one pixel, by less than float32 sum round-off would notice
    assert _cache_path(tmp_path, cfg, TensorDataset(nudged, y), 0) != base
    relabelled = y.clone()
    relabelled[:2] = relabelled[:2].flip(0) if relabelled[0] != relabelled[1] else (relabelled[:2] + 1) % 10
    assert _cache_path(tmp_path, cfg, TensorDataset(x, relabelled), 0) != base


@pytest.mark.parametrize("name", sorted(PRETRAIN_AUGMENT))
def test_augmentations_are_seeded_and_stay_in_range(name):
    x = _public().tensors[0]
    a = PRETRAIN_AUGMENT[name](x, torch.Generator().manual_seed(3))
    b = PRETRAIN_AUGMENT[name](x, torch.Generator().manual_seed(3))
    c = PRETRAIN_AUGMENT[name](x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_affine_keeps_a_black_image_black_and_a_flat_interior_flat():
    black = torch.zeros(4, 3, 16, 16)
    assert torch.equal(affine(black, torch.Generator().manual_seed(0)), black)
    grey = torch.full((4, 3, 16, 16), 0.5)
    out = affine(grey, torch.Generator().manual_seed(0))
    # a ±10° rotation, 0.9-1.1 scale and ±10 % shift keep the central 4x4 pixels inside the image
    assert torch.allclose(out[..., 6:10, 6:10], grey[..., 6:10, 6:10], atol=1e-6)


def test_broad_reaches_what_the_clean_policy_never_shows():
    """Over many images, broad pre-training shows inverted backgrounds and colour; the affine never does."""
    x = torch.zeros(64, 3, 16, 16)
    x[..., 6:10, 4:12] = 1.0  # a white bar on black
    clean = affine(x, torch.Generator().manual_seed(0))
    wide = broad(x, torch.Generator().manual_seed(0))
    corner = lambda t: t[:, :, 0, 0]  # noqa: E731 - background pixel, per image and channel
    assert float(corner(clean).max()) == 0.0
    assert float(corner(wide).mean(1).max()) > 0.5  # some backgrounds inverted to light
    channel_gap = (wide.amax(dim=(2, 3)) - wide.amin(dim=(2, 3))).std(dim=1)
    assert float(channel_gap.max()) > 0.05  # some images coloured: the channels differ
    assert float((clean[:, 0] - clean[:, 1]).abs().max()) == 0.0  # the affine keeps grey images grey
