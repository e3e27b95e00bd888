"""Stamped safetensors files: tensors plus string metadata naming what the file is, written atomically, read checked.

    write_stamped(path, tensors, {"format": "fedpeft.x", "version": "1", "run": "r1"})
    meta, tensors = read_stamped(path, {"format": "fedpeft.x", "version": "1", "run": "r1"}, error=MyError)

One writer and one reader for every stamped file fedpeft keeps (a client's personal state, a server checkpoint's
tensors): the write goes through :mod:`fedpeft._atomic` (temporary file, fsync, rename, fsync of the folder), so a
reader or a crash sees the old file or the new one; the read refuses a file that is not a regular safetensors file or
whose stamp differs from ``want`` in any field, naming the file and the field. No pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Type

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import _atomic

__all__ = ["read_stamped", "write_stamped"]


def write_stamped(path: Path, tensors: Mapping[str, Tensor], stamp: Mapping[str, str]) -> None:
    """Write ``tensors`` (contiguous CPU copies) with metadata ``stamp`` to ``path`` atomically and durably."""
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic.remove_stale(path.parent, path.name)
    _atomic.replace(_atomic.write_temp(path, lambda p: save_file(data, p, metadata=dict(stamp))), path)


def read_stamped(path: Path, want: Mapping[str, str], *, error: Type[Exception] = ValueError,
                 tensors: bool = True, names: Optional[Mapping[str, str]] = None,
                 hint: str = "") -> Tuple[Dict[str, str], Dict[str, Tensor]]:
    """``(metadata, tensors)`` of the stamped file ``path`` (``tensors=False``: the header only, ``{}`` tensors).

    ``names`` words a field in messages (``{"frozen-sha256": "frozen backbone"}``); ``hint`` ends every message.

    Raises:
        error: ``path`` is not a regular, readable safetensors file, or ``metadata[field] != want[field]`` for a field
            (``format`` first, then ``version``, then the rest in ``want``'s order).
    """
    if not path.is_file():
        raise error(f"{path}: not a regular file{hint}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path}: not a readable safetensors file ({e}){hint}") from None
    order = [k for k in ("format", "version") if k in want] + [k for k in want if k not in ("format", "version")]
    for field in order:
        got, expected = meta.get(field), want[field]
        if got == expected:
            continue
        if field == "format":
            raise error(f"{path}: format {got!r} is not {expected!r}{hint}")
        if field == "version":
            raise error(f"{path}: format version {got!r} is unknown (this fedpeft reads version {expected}){hint}")
        what = (names or {}).get(field, field)
        raise error(f"{path}: the file's {what} is {got!r}, expected {expected!r}{hint}")
    return meta, out
