"""Image transforms of the main job: the clients' shift families, and the pre-training corpus's letters.

Everything acts on a batch (B, 3, H, W) in [0, 1] and draws its randomness from a ``torch.Generator``.

**Client shift families** (``--split domain``): several clients share a kind of visual shift, each at its own
strength ``s`` in [0, 1] (they stand in for the domains of Office-Caltech10 / DomainNet, pFedPG Table 1):

=========  ================================================================================================
rotated    rotated by 60° + 60°·s (60°–120°), zero fill: a geometric shift the backbone never saw
inverted   ``1 − c·x`` with contrast c = 1 − 0.4·s: white background, dark strokes (photometric)
coloured   strokes and background mapped to the client's own two colours (drawn from its seed), ± 0.1 per
           image (MNIST-M-like); s sets how dark the strokes are relative to the background (lower contrast)
noisy      additive Gaussian noise, σ = 0.3 + 0.3·s, clipped
blurred    Gaussian blur, σ = (1 + 1.5·s)·H/32 pixels, then contrast halved around 0.5
sketch     Sobel edge magnitude (outlines only, DomainNet's sketch), raised to the power 1 − 0.5·s (thicker lines)
=========  ================================================================================================

**Pre-training letters** (:func:`render_letters`, :func:`letter_batch`): the 52 Latin letters of every TrueType font
in matplotlib's wheel that draws them as letters (:data:`LETTER_FONTS`, 22 files), rendered once at 64×64, white on
black, centred; each pre-training batch then draws glyphs at a random affine (rotation ±15°, shear ±0.2, scale
0.55–1.0, position ±18 % of the image), stroke width (eroded by one 64-px pixel, as drawn, or dilated by one or
two) and blur (σ ∈ [0, 1] px at the output size). No inversion, colour, noise or 60°+ rotation: the clients' shifts stay new to
the backbone. Digits never come from fonts (they are the clients' task).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LETTER_FONTS", "SHIFTS", "affine", "apply_shift", "blur", "letter_batch", "render_letters"]

# ----------------------------------------------------------------------------------------------- client shifts


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


# ------------------------------------------------------------------------------------- pre-training transforms


def _warp(x: Tensor, angle: Tensor, scale: Tensor, shift: Tensor, shear: Tensor, size: int) -> Tensor:
    """Per-image affine warp to ``size``×``size``: output pixel p samples input at A·p + t, with A = R(angle)·
    [[1, shear], [0, 1]] / scale (all (B,), ``shift`` (B, 2) in normalized coordinates); zero fill."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    a11, a12 = cos / scale, (cos * shear - sin) / scale
    a21, a22 = sin / scale, (sin * shear + cos) / scale
    theta = torch.stack([torch.stack([a11, a12, shift[:, 0]], 1), torch.stack([a21, a22, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def affine(x: Tensor, g: torch.Generator) -> Tensor:
    """Light random affine per image (the public digits): rotation ±10°, scale 0.9–1.1, translation ±10 %."""
    B = x.shape[0]
    angle = (torch.rand(B, generator=g) - 0.5) * (math.pi / 9)
    scale = 0.9 + 0.2 * torch.rand(B, generator=g)
    shift = (torch.rand(B, 2, generator=g) - 0.5) * 0.2
    return _warp(x, angle, scale, shift, torch.zeros(B), x.shape[-1])


def blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-image separable Gaussian blur, standard deviation ``sigma`` (B,) pixels (0: unchanged), 5 taps."""
    B, C, H, W = x.shape
    t = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.clamp_min(1e-3).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B·C, 5)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k.view(B * C, 1, 1, 5), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k.view(B * C, 1, 5, 1), groups=B * C)
    return y.view(B, C, H, W)


#: matplotlib's TrueType files that draw the 52 Latin letters as letters (its symbol fonts, the "Display" fonts
#: without letters, and LastResort's boxed placeholders are left out)
LETTER_FONTS: Tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf",
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CANVAS = 64


@lru_cache(maxsize=1)
def render_letters() -> Tuple[Tensor, Tensor, List[str]]:
    """Every letter of every font of :data:`LETTER_FONTS`, rendered once: ``(glyphs (N, 1, 64, 64) in [0, 1],
    labels (N,) in 0–25 (case-insensitive letter), font file names)``. A glyph's larger side is 44 px, centred."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    root = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    glyphs, labels, used = [], [], []
    for name in LETTER_FONTS:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"matplotlib's font {path} is missing (the pre-training corpus needs it)")
        font = ImageFont.truetype(str(path), 48)
        used.append(name)
        for i, ch in enumerate(LETTERS):
            im = Image.new("L", (96, 96), 0)
            draw = ImageDraw.Draw(im)
            draw.text((24, 12), ch, fill=255, font=font)
            box = im.getbbox()
            crop = im.crop(box)
            w, h = crop.size
            f = 44.0 / max(w, h)
            crop = crop.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
            canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
            canvas.paste(crop, ((_CANVAS - crop.size[0]) // 2, (_CANVAS - crop.size[1]) // 2))
            glyphs.append(torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(1, _CANVAS, _CANVAS))
            labels.append(i % 26)
    return torch.stack(glyphs).float() / 255.0, torch.tensor(labels), used


def letter_batch(index: Tensor, size: int, g: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Glyphs ``index`` of :func:`render_letters` at a random affine, stroke width, blur and position:
    ``(images (B, 3, size, size) in [0, 1], labels (B,))`` (see the module docstring)."""
    glyphs, labels, _ = render_letters()
    x = glyphs[index]
    B = x.shape[0]
    stroke = torch.randint(0, 4, (B,), generator=g).view(-1, 1, 1, 1)  # eroded, as drawn, dilated by 1 or 2 px
    for k, pooled in ((0, -F.max_pool2d(-x, 3, 1, 1)), (2, F.max_pool2d(x, 3, 1, 1)), (3, F.max_pool2d(x, 5, 1, 2))):
        x = torch.where(stroke == k, pooled, x)
    angle = (torch.rand(B, generator=g) - 0.5) * (math.pi / 6)
    shear = (torch.rand(B, generator=g) - 0.5) * 0.4
    scale = 0.55 + 0.45 * torch.rand(B, generator=g)
    shift = (torch.rand(B, 2, generator=g) - 0.5) * 0.36
    x = _warp(x, angle, scale, shift, shear, 2 * size)
    x = F.avg_pool2d(x, 2)  # render at twice the size, then average: no aliasing of thin strokes
    x = blur(x, torch.rand(B, generator=g))
    return x.clamp(0.0, 1.0).expand(-1, 3, -1, -1), labels[index]
