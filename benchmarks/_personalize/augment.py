"""Augmentations for pre-training the default backbone on the public split (never applied to client data).

Two policies (``--pretrain``), both acting on a batch (B, 3, H, W) in [0, 1] with randomness from a generator:

``clean``  (default) light random affine per image: rotation ±10°, scale 0.9–1.1, translation ±10 %. The backbone
           sees only clean grey digits, so the clients' shifts (inversion, rotation, noise, …) are new to it.
``broad``  a backbone that has seen image-space changes of the clients' kinds (not the papers' regime: their ImageNet
           ViT has seen neither these digits nor these shifts): the ``clean`` affine, then each of
           these independently with probability ``BROAD_P`` = 0.3 per image (about a sixth of the images stay clean):

           - inversion ``1 − x``;
           - rotation by an angle uniform in [−90°, 90°] (not beyond: a 180° turn makes a 6 a 9);
           - Gaussian noise, σ uniform in [0, 0.4], clipped;
           - Gaussian blur, σ uniform in [0.5, 2] pixels (a 7-tap separable kernel), contrast factor in [0.5, 1];
           - colour: strokes and background mapped to two random colours (as ``coloured``, drawn per image).

           Generic image-space changes, not the client shifts replayed: the angle varies (the ``rotated`` client is
           exactly 90°), the noise and blur strengths vary, and edge maps (the ``sketch`` client) are never shown.
           A first version with probability 1/2 each and any angle left the backbone at 0.21 held-out accuracy
           after the 60 epochs (chance: 0.1): too hard a task for 486 images and a 4-layer ViT.
           The public split stays disjoint from every client's images.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BROAD_P", "PRETRAIN_AUGMENT", "affine", "broad"]

BROAD_P = 0.3  # probability of each broad transform, per image


def _rotate_scale_shift(x: Tensor, angle: Tensor, scale: Tensor, shift: Tensor, fill: Optional[Tensor] = None) -> Tensor:
    """Per-image affine warp (angle, scale, shift of shape (B,), (B,), (B, 2)); uncovered pixels get ``fill`` (B,)."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if fill is None:
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    f = fill.view(-1, 1, 1, 1)
    return F.grid_sample(x - f, grid, align_corners=False, padding_mode="zeros") + f


def affine(x: Tensor, g: torch.Generator) -> Tensor:
    """Random affine per image: rotation ±10°, scale 0.9–1.1, translation ±10 % of the image."""
    B = x.shape[0]
    angle = (torch.rand(B, generator=g) - 0.5) * (math.pi / 9)
    scale = 0.9 + 0.2 * torch.rand(B, generator=g)
    shift = (torch.rand(B, 2, generator=g) - 0.5) * 0.2
    return _rotate_scale_shift(x, angle, scale, shift)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-image separable Gaussian blur with standard deviation ``sigma`` (B,) pixels, 7 taps, replicate padding."""
    B, C, H, W = x.shape
    t = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B·C, 7)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), k.view(B * C, 1, 1, 7), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k.view(B * C, 1, 7, 1), groups=B * C)
    return y.view(B, C, H, W)


def broad(x: Tensor, g: torch.Generator) -> Tensor:
    """``affine``, then inversion, rotation (±90°), noise, blur and colour, each with probability ``BROAD_P``."""
    B = x.shape[0]
    x = affine(x, g)
    on = torch.rand(5, B, generator=g) < BROAD_P  # which transforms each image gets
    u = torch.rand(6, B, generator=g)
    bg = 0.45 * torch.rand(B, 3, 1, 1, generator=g)
    fg = 0.55 + 0.45 * torch.rand(B, 3, 1, 1, generator=g)
    noise = torch.randn(x.shape, generator=g)

    def pick(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
        return torch.where(mask.view(-1, 1, 1, 1), new, old)

    x = pick(on[0], 1.0 - x, x)
    corner = x[:, :, 0, 0].mean(dim=1)  # the background level (1 for an inverted digit): corners stay background
    rotated = _rotate_scale_shift(x, math.pi * (u[0] - 0.5), torch.ones(B), torch.zeros(B, 2), fill=corner)
    x = pick(on[1], rotated, x)
    x = pick(on[2], (x + (0.4 * u[1]).view(-1, 1, 1, 1) * noise).clamp(0.0, 1.0), x)
    contrast = (0.5 + 0.5 * u[3]).view(-1, 1, 1, 1)
    blurred = _blur(x, 0.5 + 1.5 * u[2])
    x = pick(on[3], 0.5 + contrast * (blurred - 0.5), x)
    grey = x.mean(dim=1, keepdim=True)
    x = pick(on[4], bg + (fg - bg) * grey, x)
    return x.clamp(0.0, 1.0)


PRETRAIN_AUGMENT: Dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {"clean": affine, "broad": broad}
