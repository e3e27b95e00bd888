"""State dicts to and from a list of NumPy arrays, the form Flower strategies exchange (``NDArrays``).

    keys, arrays = to_ndarrays(state)                 # keys sorted: the canonical order both sides agree on
    state = from_ndarrays(keys, arrays, like=state)   # same keys, shapes, dtypes and devices as ``like``

NumPy has no bfloat16 (nor float8), so such tensors are cast to float32 on the way out (exact) and back on the way
in when ``like=`` or ``dtypes=`` says so (exact again, since the values came from that dtype). Arrays and tensors are
always fresh copies: nothing returned shares memory with an input. fedpeft does not depend on flwr; wrap the arrays
with ``flwr.common.ndarrays_to_parameters`` (or an ``ArrayRecord``) on your side.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .._checks import check_dense, check_state, format_keys

__all__ = ["from_ndarrays", "to_ndarrays"]

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def to_ndarrays(state: Mapping[str, Tensor]) -> Tuple[List[str], List[np.ndarray]]:
    """``(keys, arrays)`` in sorted key order; CPU copies, bfloat16/float8 as float32, other dtypes unchanged.

    Raises:
        TypeError: ``state`` is not a ``Mapping[str, Tensor]``, or holds a sparse or meta tensor.
    """
    check_state(state)
    check_dense(state)
    keys = sorted(state)
    arrays = []
    for k in keys:
        t = state[k].detach()
        dtype = torch.float32 if t.is_floating_point() and t.dtype not in _NUMPY_FLOATS else t.dtype
        arrays.append(t.to(device="cpu", dtype=dtype, copy=True).numpy())
    return keys, arrays


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`to_ndarrays` sends a tensor of ``dtype`` as (float32 for NumPy-less floats, else itself)."""
    return torch.float32 if dtype.is_floating_point and dtype not in _NUMPY_FLOATS else dtype


def _to_tensor(key: str, array: object) -> Tensor:
    """A new CPU tensor from anything ``np.asarray`` takes: non-native byte order and negative strides converted."""
    try:
        a = np.asarray(array)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"array for {key!r} cannot be read as a NumPy array: {e}") from None
    if a.dtype.kind not in "biufc":
        raise TypeError(f"array for {key!r} must hold numbers, got NumPy dtype {a.dtype}")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))  # big-endian (e.g. from another platform's file) → native, a copy
    if not a.flags.c_contiguous:  # negative or other odd strides → a C-order copy (0-d arrays stay 0-d)
        a = a.copy(order="C")
    try:
        return torch.tensor(a)  # a copy: nothing returned shares memory with the input
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"array for {key!r} has a NumPy dtype torch cannot hold ({a.dtype}): {e}") from None


def _check_like(state: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> None:
    """Each array's shape and wire dtype must be ``like``'s for its key; say which keys look swapped."""

    def fits(t: Tensor, ref: Tensor) -> bool:
        return t.shape == ref.shape and t.dtype == _wire_dtype(ref.dtype)

    wrong = [k for k in like if not fits(state[k], like[k])]
    if not wrong:
        return
    details = [
        f"{k!r}: expected shape {tuple(like[k].shape)} {_wire_dtype(like[k].dtype)}, "
        f"got {tuple(state[k].shape)} {state[k].dtype}"
        for k in wrong[:5]
    ]
    swapped = sorted(
        {tuple(sorted((a, b))) for a in wrong for b in wrong if a != b and fits(state[a], like[b]) and fits(state[b], like[a])}
    )
    hint = ""
    if swapped:
        pairs = ", ".join(f"{a!r} and {b!r}" for a, b in swapped[:5])
        hint = f"; keys {pairs} look swapped (each array fits the other key: are keys and arrays in the same order?)"
    more = f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""
    raise ValueError(f"arrays do not match like=: {'; '.join(details)}{more}{hint}")


def from_ndarrays(
    keys: Iterable[str],
    arrays: Iterable[np.ndarray],
    *,
    like: Optional[Mapping[str, Tensor]] = None,
    dtypes: Optional[Mapping[str, torch.dtype]] = None,
) -> Dict[str, Tensor]:
    """Build a state dict ``{keys[i]: tensor(arrays[i])}`` (new CPU tensors, in ``keys`` order).

    Args:
        keys: the key of each array, e.g. as returned by :func:`to_ndarrays`.
        arrays: NumPy arrays (or anything ``np.asarray`` takes), read-only buffers, non-native byte order and negative
            strides included (converted).
        like: a reference state dict: the result must have exactly its keys, and each array the shape and dtype
            :func:`to_ndarrays` gives for that key's tensor (float32 for bfloat16/float8); the result takes ``like``'s
            dtypes and devices (so a bfloat16 model round-trips as bfloat16).
        dtypes: instead of ``like``, a ``{key: torch.dtype}`` map for the keys to cast; other keys keep the array's
            dtype. A cast that would truncate (a floating array to an integer or bool dtype, a complex one to a real
            dtype) is refused.

    ``keys[i]`` names ``arrays[i]``: values are mapped by these keys, never by their position in ``like`` (keys in
    any order). The result is in ``like``'s key order with ``like``, else in ``keys`` order.

    Raises:
        ValueError: ``keys`` and ``arrays`` differ in length, a key repeats, both ``like`` and ``dtypes`` are given,
            ``dtypes`` names a key that is not in ``keys`` or a truncating cast, or the arrays do not match
            ``like``'s keys, shapes and dtypes (the message names each key and the pairs of keys that look swapped).
        TypeError: a key is not a str, an array holds no numbers (strings, objects), ``like`` is not a
            ``Mapping[str, Tensor]``, or ``dtypes`` is not a mapping of ``torch.dtype`` values.
    """
    if isinstance(keys, str):
        raise TypeError(f"keys must be a list of str, got the str {keys!r}")
    keys, arrays = list(keys), list(arrays)
    if len(keys) != len(arrays):
        raise ValueError(f"from_ndarrays() got {len(keys)} keys but {len(arrays)} arrays")
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"keys must be str, got {type(k).__name__} {k!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"from_ndarrays(): repeated keys {format_keys({k for k in keys if keys.count(k) > 1})}")
    if like is not None and dtypes is not None:
        raise ValueError("from_ndarrays(): pass like= or dtypes=, not both")
    if like is not None:
        check_state(like, name="like")
    if dtypes is not None:
        _check_dtypes(dtypes, keys)
    state = {k: _to_tensor(k, a) for k, a in zip(keys, arrays)}  # keys[i] ↔ arrays[i]: by key from here on
    if like is not None:
        check_state(state, like=like, name="arrays")
        _check_like(state, like)
        return {k: state[k].to(device=ref.device, dtype=ref.dtype) for k, ref in like.items()}  # like's key order
    if dtypes is not None:
        _check_casts(state, dtypes)
        return {k: t.to(dtypes.get(k, t.dtype)) for k, t in state.items()}
    return state


def _check_dtypes(dtypes: object, keys: List[str]) -> None:
    """``dtypes`` must be a ``{key: torch.dtype}`` mapping over keys that are in ``keys``."""
    if not isinstance(dtypes, Mapping):
        raise TypeError(
            f"dtypes must be a mapping {{key: torch.dtype}} (e.g. {{'prompts': torch.bfloat16}}), got "
            f"{type(dtypes).__name__}"
        )
    for k, d in dtypes.items():
        if not isinstance(d, torch.dtype):
            raise TypeError(f"dtypes[{k!r}] must be a torch.dtype (e.g. torch.bfloat16), got {type(d).__name__} {d!r}")
    unknown = dtypes.keys() - set(keys)
    if unknown:
        raise ValueError(f"from_ndarrays(): dtypes names keys that are not in keys: {format_keys(unknown)}")


def _check_casts(state: Mapping[str, Tensor], dtypes: Mapping[str, torch.dtype]) -> None:
    """Refuse a cast that would drop information a float/complex array holds (to an integer, bool or real dtype)."""
    for k, d in dtypes.items():
        t = state[k]
        drops_imaginary = t.is_complex() and not d.is_complex
        drops_fraction = t.is_floating_point() and not (d.is_floating_point or d.is_complex)
        if drops_imaginary or drops_fraction:
            raise ValueError(
                f"dtypes[{k!r}] = {d} cannot hold the {t.dtype} array sent for {k!r} (the cast would truncate it); "
                "pass a floating dtype"
            )
