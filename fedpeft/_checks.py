"""Argument checks shared by fedpeft's constructors: one message style, ``ValueError``/``TypeError`` naming the argument."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["check_finite_float", "check_fits", "check_flag", "check_float_dtype", "check_positive_int"]


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_flag(name: str, value: Any, *, allow_none: bool = False) -> Optional[bool]:
    """Every public boolean flag goes through here: a ``bool`` (or ``None`` where allowed), never a truthy stand-in.

    ``deep="False"`` is a non-empty string, i.e. true: accepting it would silently mean the opposite of what was
    written, so anything but ``True``/``False`` raises ``TypeError``.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be {'None or ' if allow_none else ''}a bool, got {value!r}")
    return value


def check_finite_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def check_float_dtype(name: str, dtype: Any) -> Optional[torch.dtype]:
    """``None`` or a floating-point ``torch.dtype`` (parameters must be able to hold gradients); else ``TypeError``."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be None or a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    return dtype


def check_fits(name: str, value: Tensor, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless every value of ``value`` is finite *once stored as* ``dtype``.

    Finiteness is checked in the dtype the value will live in: float64 ``1e300`` is finite, but becomes ``inf`` in a
    float32 parameter, and ``1e5`` becomes ``inf`` in float16. One ``aminmax`` read; the cast is monotonic, so the
    values fit iff both ends do (NaN propagates to both ends).
    """
    if not value.is_floating_point() or value.numel() == 0:
        return
    lo, hi = torch.aminmax(value.detach())
    ends = torch.stack([lo, hi]).to(dtype)
    if not bool(torch.isfinite(ends).all()):
        lo_f, hi_f = float(lo), float(hi)
        if math.isfinite(lo_f) and math.isfinite(hi_f):
            raise ValueError(
                f"{name} overflows {dtype}: values range over [{lo_f:.6g}, {hi_f:.6g}] but {dtype} holds at most "
                f"±{torch.finfo(dtype).max:.6g}"
            )
        raise ValueError(f"{name} holds non-finite values (NaN or Inf)")
