"""The main job's backbone: the shipped weights, the cache key, and the pre-training corpus's transforms.

Oracles: ``hashlib.sha256`` of the shipped file and ``safetensors`` reading it directly (the loader must hand out
exactly those bytes), the list of ``BackboneConfig`` fields (every one must change the cache key), hand-built inputs
whose transformed values are known (a black image stays black; a flat interior stays flat), PIL's glyph count, and
the clients' MNIST digits read independently (no pre-training image may be one of them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _personalize import backbone as bb
from _personalize.config import BackboneConfig
from _personalize.images import LETTER_FONTS, LETTERS, affine, letter_batch, render_letters


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2
    if value is None:
        return "weights.pth"
    return {"vit_tiny_patch16_224": "vit_small_patch16_224", "avg": "token"}.get(value, value + "x")


def test_shipped_weights_match_their_recipe_and_are_loaded_by_default(tmp_path):
    recipe = json.loads(bb.SHIPPED.with_suffix(".json").read_text())
    assert hashlib.sha256(bb.SHIPPED.read_bytes()).hexdigest() == recipe["sha256"]
    assert recipe["config"] == dataclasses.asdict(BackboneConfig())  # the default configuration is the recipe's
    assert {"torch", "timm", "pillow", "matplotlib"} <= set(recipe["versions"]) and recipe["command"]
    assert bb.SHIPPED.stat().st_size < 8 * 2**20  # a few MB
    got = bb.build_backbone(BackboneConfig(), 10, tmp_path, seed=0, progress=lambda it, **_: it)
    want = load_file(str(bb.SHIPPED))
    assert set(got.state) == set(want) and all(torch.equal(got.state[k], want[k]) for k in want)
    assert got.info["source"].startswith("shipped") and not any(tmp_path.iterdir())  # nothing trained or cached
    assert got.make()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / bb.SHIPPED.name
    shutil.copy(bb.SHIPPED, copy)
    shutil.copy(bb.SHIPPED.with_suffix(".json"), copy.with_suffix(".json"))
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(bb, "SHIPPED", copy)
    with pytest.raises(ValueError, match="sha256"):
        bb.build_backbone(BackboneConfig(), 10, tmp_path / "cache", seed=0, progress=lambda it, **_: it)


def test_cache_key_changes_with_every_setting(tmp_path):
    cfg = BackboneConfig()
    base = bb._cache_path(tmp_path, cfg)
    assert base == bb._cache_path(tmp_path, BackboneConfig())  # same inputs, same file
    for f in dataclasses.fields(BackboneConfig):
        other = dataclasses.replace(cfg, **{f.name: _changed(getattr(cfg, f.name))})
        assert bb._cache_path(tmp_path, other) != base, f.name


def test_letters_are_every_letter_of_every_font():
    glyphs, labels, fonts = render_letters()
    assert list(fonts) == list(LETTER_FONTS) and len(LETTERS) == 52
    assert glyphs.shape == (len(LETTER_FONTS) * 52, 1, 64, 64)
    assert torch.bincount(labels).tolist() == [2 * len(LETTER_FONTS)] * 26  # upper and lower case per letter
    ink = glyphs.sum(dim=(1, 2, 3))
    assert float(ink.min()) > 20.0  # every glyph drew something
    assert float(glyphs.amax(dim=(1, 2, 3)).min()) > 0.9  # white strokes on black
    assert float(glyphs[..., :2, :].max()) == 0.0  # a glyph (44 px) is centred in 64: the top rows stay empty


def test_letter_batches_are_seeded_in_range_and_varied():
    idx = torch.arange(40)
    a, ya = letter_batch(idx, 32, torch.Generator().manual_seed(3))
    b, yb = letter_batch(idx, 32, torch.Generator().manual_seed(3))
    c, _ = letter_batch(idx, 32, torch.Generator().manual_seed(4))
    assert a.shape == (40, 3, 32, 32) and torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2])  # grey: no colour shift
    assert float(a[:, :, 0, 0].max()) < 0.05  # black background: no inversion
    # the same glyph drawn 40 times: different positions/sizes/strokes (not one image repeated)
    same, _ = letter_batch(torch.zeros(40, dtype=torch.long), 32, torch.Generator().manual_seed(5))
    assert float((same[1:] - same[:1]).abs().amax(dim=(1, 2, 3)).min()) > 0.1


def test_affine_keeps_a_black_image_black_and_a_flat_interior_flat():
    black = torch.zeros(4, 3, 16, 16)
    assert torch.equal(affine(black, torch.Generator().manual_seed(0)), black)
    grey = torch.full((4, 3, 16, 16), 0.5)
    out = affine(grey, torch.Generator().manual_seed(0))
    # a ±10° rotation, 0.9-1.1 scale and ±10 % shift keep the central 4x4 pixels inside the image
    assert torch.allclose(out[..., 6:10, 6:10], grey[..., 6:10, 6:10], atol=1e-6)


def test_public_corpus_holds_no_client_image():
    """The pre-training corpus (letters, scikit-learn's digits) shares no image with the clients' MNIST digits."""
    from _personalize.data import _mnist

    corpus = bb.public_corpus(28, seed=0)
    mnist, _ = _mnist(28)
    flat = mnist[:, 0].reshape(len(mnist), -1)
    for key in ("digits_train", "digits_val", "letters_val"):
        x = corpus[key][0][:, 0].reshape(len(corpus[key][0]), -1)
        nearest = torch.cdist(x[:200], flat).min(dim=1).values
        assert float(nearest.min()) > 1.0, key  # no exact (or near-exact) copy of a client image
    assert set(corpus["digits_train"][1].tolist()) == set(range(26, 36))  # digits after the 26 letter classes
