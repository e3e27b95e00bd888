"""The argument and state checks every fedpeft function runs before it computes or mutates anything.

One home for validation, one message style: ``TypeError`` for the wrong kind of object, ``ValueError`` for wrong
content, each naming the argument (and the key of a state dict), what was expected and what came, so bad input is
refused with a message a user can act on before it touches any state.

Arguments of constructors: :func:`check_positive_int`, :func:`check_flag`, :func:`check_finite_float`,
:func:`check_float_dtype`; values: :func:`check_fits` (finite once stored in a dtype), :func:`check_data` (a tensor
with values, not ``meta``).

State dicts (``fedpeft.fed``, the protocols): :func:`check_state` validates a state dict (types, and optionally the
same keys and shapes as a reference and finite floating values); :func:`check_dense` refuses sparse and meta tensors
where values are read; :func:`value_ranges` reads every tensor's (min, max) in one host sync (finiteness, and the
magnitudes the aggregation needs); :func:`check_weight` / :func:`check_weights` validate aggregation weights (finite,
>= 0, not all zero).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "check_data",
    "check_dense",
    "check_finite_float",
    "check_fits",
    "check_flag",
    "check_float_dtype",
    "check_positive_int",
    "check_state",
    "check_weight",
    "check_weights",
    "first_nonfinite",
    "format_keys",
    "value_ranges",
]


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


def check_data(name: str, value: Tensor, *, beside: Optional[Tensor] = None) -> None:
    """Raise ``TypeError`` if ``value`` is a ``meta`` tensor: it has a shape but no values to read or compute with.

    ``beside``: the tensor ``value`` is used with; a meta ``value`` is fine beside a meta one (a shape-only run of a
    model built on the meta device).
    """
    if value.device.type == "meta" and (beside is None or beside.device.type != "meta"):
        raise TypeError(f"{name} is a meta tensor (shape only, no values); pass a tensor with data")


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


def format_keys(keys: Iterable[str], limit: int = 5) -> str:
    """``['a', 'b', ...]``: the first ``limit`` keys in sorted order, and how many more there are."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def value_ranges(state: Mapping[str, Tensor]) -> Dict[str, Tuple[float, float]]:
    """``{key: (min, max)}`` of every non-empty floating tensor of ``state``, as Python floats; one host sync in all.

    NaN propagates to both ends and an Inf is the min or the max, so a key is finite iff both ends are.
    """
    # torch.aminmax is one read per tensor with no temporary (torch.isfinite(t).all() allocates a bool mask and is
    # an order of magnitude slower on CPU). All ends are gathered in one tensor and read back with one .tolist(),
    # so a CUDA state costs one synchronization, not one per key.
    items = [(k, v.detach()) for k, v in state.items() if v.is_floating_point() and v.numel()]
    if not items:
        return {}
    device = items[0][1].device
    ends = torch.stack([end.to(device=device, dtype=torch.float64) for _, v in items for end in torch.aminmax(v)])
    flat = ends.tolist()
    return {k: (flat[2 * i], flat[2 * i + 1]) for i, (k, _) in enumerate(items)}


def first_nonfinite(ranges: Mapping[str, Tuple[float, float]]) -> Optional[str]:
    """The first key of :func:`value_ranges`' result whose tensor holds a NaN or ±Inf, or None."""
    for key, (lo, hi) in ranges.items():
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return key
    return None


def check_dense(state: Mapping[str, Tensor], name: str = "state") -> None:
    """Raise ``TypeError`` unless every tensor of ``state`` is a dense (strided) tensor with data (not ``meta``)."""
    for key, value in state.items():
        if value.layout != torch.strided:
            raise TypeError(
                f"{name}[{key!r}] is a {value.layout} tensor; fedpeft.fed needs dense tensors (call .to_dense())"
            )
        check_data(f"{name}[{key!r}]", value)


def check_state(
    state: object,
    *,
    like: Optional[Mapping[str, Tensor]] = None,
    finite: bool = False,
    name: str = "state",
) -> None:
    """Raise unless ``state`` is a ``Mapping[str, Tensor]`` (and, optionally, shaped like ``like`` and finite).

    Args:
        state: the object to check.
        like: if given, ``state`` must have exactly its keys, and each tensor its shape.
        finite: if true, every floating-point tensor must hold only finite values (no NaN, no ±Inf).
        name: how error messages call ``state`` (e.g. ``"state #3"``).

    Raises:
        TypeError: ``state`` is not a mapping, a key is not a ``str`` or a value not a ``Tensor``.
        ValueError: missing or unexpected keys, a shape mismatch, or a non-finite value; the message names the key.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a Mapping[str, Tensor] (e.g. model.state_dict()), got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {type(key).__name__} {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    if like is not None:
        missing, unexpected = like.keys() - state.keys(), state.keys() - like.keys()
        if missing or unexpected:
            raise ValueError(
                f"{name} does not have the expected keys: missing {format_keys(missing)}, "
                f"unexpected {format_keys(unexpected)}"
            )
        for key, ref in like.items():
            if state[key].shape != ref.shape:
                raise ValueError(
                    f"{name}[{key!r}]: expected shape {tuple(ref.shape)}, got {tuple(state[key].shape)}"
                )
    if finite:
        check_dense(state, name)
        key = first_nonfinite(value_ranges(state))
        if key is not None:
            raise ValueError(f"{name}[{key!r}] holds non-finite values (NaN or Inf); refusing it")


def check_weight(weight: object, name: str = "weight") -> float:
    """Return ``weight`` as a float; raise unless it is a finite real number >= 0 (a Python, NumPy or 0-d tensor number).

    Weights are relative (sample counts, say): any finite non-negative value is valid, however large or small,
    because fedpeft normalises them in float64 before use. A zero weight contributes nothing.

    Raises:
        TypeError: not a real number (``bool`` is refused too: ``True`` is almost always a mistake here).
        ValueError: negative, NaN or infinite.
    """
    if isinstance(weight, Tensor) and weight.numel() == 1 and not weight.dtype.is_complex and weight.dtype != torch.bool:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"{name} must be a real number (e.g. the client's sample count), got {type(weight).__name__}")
    try:
        value = float(weight)
    except OverflowError:  # a Python int beyond float64
        raise ValueError(f"{name} must be finite and >= 0, got {weight!r} (beyond float64)") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {weight!r}")
    return value


def check_weights(weights: Iterable[object], count: Optional[int] = None) -> List[float]:
    """Validate a whole weight vector: each as :func:`check_weight`, ``count`` of them if given, a positive sum.

    Raises:
        TypeError: ``weights`` is not an iterable of real numbers (a single number or a str, say).
        ValueError: a bad weight (the message names its index), a length other than ``count``, or all zero.
    """
    if isinstance(weights, (str, bytes, Tensor)) and not (isinstance(weights, Tensor) and weights.dim() == 1):
        raise TypeError(f"weights must be a sequence of numbers, one per state, got {type(weights).__name__}")
    try:
        weights = list(weights)
    except TypeError:
        raise TypeError(
            f"weights must be a sequence of numbers, one per state, got {type(weights).__name__}"
        ) from None
    if count is not None and len(weights) != count:
        raise ValueError(f"got {count} states but {len(weights)} weights")
    values = [check_weight(w, name=f"weight #{i}") for i, w in enumerate(weights)]
    if values and not any(values):
        raise ValueError(f"weights are all zero ({len(values)} of them); at least one must be > 0")
    return values
