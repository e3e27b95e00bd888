"""Shift families for ``--split domain``: several clients share a kind of visual shift, each at its own strength.

They stand in for the domains of Office-Caltech10 / DomainNet (pFedPG Table 1), with the structure the papers'
federations have and a generator can exploit: clients of one *family* see their digits through the same kind of
shift, at a client-specific strength ``s`` in [0, 1]. All act on a batch (B, 3, H, W) in [0, 1] and return a new
batch in [0, 1]; randomness (noise, per-image colour jitter) comes from ``generator``.

=========  ================================================================================================
rotated    rotated by 60° + 60°·s (60°–120°), zero fill: a geometric shift the backbone never saw
inverted   ``1 − c·x`` with contrast c = 1 − 0.4·s: white background, dark strokes (photometric)
coloured   strokes and background mapped to the client's own two colours (drawn from its seed), ± 0.1 per
           image (MNIST-M-like); s sets how dark the strokes are relative to the background (lower contrast)
noisy      additive Gaussian noise, σ = 0.3 + 0.3·s, clipped
blurred    Gaussian blur, σ = (1 + 1.5·s)·H/32 pixels, then contrast halved around 0.5
sketch     Sobel edge magnitude (outlines only, DomainNet's sketch), raised to the power 1 − 0.5·s (thicker lines)
=========  ================================================================================================
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SHIFTS", "apply_shift"]


def _rotated(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    a = math.radians(60.0 + 60.0 * s)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _inverted(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    return 1.0 - (1.0 - 0.4 * s) * x


def _coloured(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    B = x.shape[0]
    bg0 = 0.5 * torch.rand(1, 3, 1, 1, generator=g)  # the client's background colour
    fg0 = 0.5 + 0.5 * torch.rand(1, 3, 1, 1, generator=g)  # the client's stroke colour
    bg = (bg0 + 0.1 * (torch.rand(B, 3, 1, 1, generator=g) - 0.5)).clamp(0.0, 1.0)
    fg = (fg0 + 0.1 * (torch.rand(B, 3, 1, 1, generator=g) - 0.5)).clamp(0.0, 1.0)
    fg = bg + (1.0 - 0.6 * s) * (fg - bg)
    return bg + (fg - bg) * x.mean(dim=1, keepdim=True)


def _noisy(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    return x + (0.3 + 0.3 * s) * torch.randn(x.shape, generator=g)


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blurred(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    k = _gaussian_kernel((1.0 + 1.5 * s) * x.shape[-1] / 32)
    C, r = x.shape[1], k.numel() // 2
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return 0.25 + 0.5 * y


def _sketch(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    grey = x.mean(dim=1, keepdim=True)
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    p = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    mag = torch.sqrt(F.conv2d(p, sx) ** 2 + F.conv2d(p, sx.transpose(-1, -2)) ** 2)
    mag = mag / mag.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return mag.pow(1.0 - 0.5 * s).expand(-1, 3, -1, -1).contiguous()


#: the families, in the order ``--families N`` takes them
SHIFTS: Dict[str, Callable[[Tensor, float, torch.Generator], Tensor]] = {
    "rotated": _rotated,
    "inverted": _inverted,
    "coloured": _coloured,
    "noisy": _noisy,
    "blurred": _blurred,
    "sketch": _sketch,
}


def apply_shift(name: str, images: Tensor, strength: float, seed: int) -> Tensor:
    """``SHIFTS[name]`` at ``strength`` in [0, 1] on a batch (B, 3, H, W) in [0, 1], randomness seeded by ``seed``."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {sorted(SHIFTS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    g = torch.Generator().manual_seed(seed)
    return SHIFTS[name](images, float(strength), g).clamp(0.0, 1.0)
