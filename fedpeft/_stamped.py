"""Stamped safetensors files: tensors plus string metadata naming what the file is, written atomically, read checked.

    write_stamped(path, tensors, {"format": "fedpeft.x", "version": "1", "run": "r1"})
    meta, tensors = read_stamped(path, {"format": "fedpeft.x", "version": "1", "run": "r1"}, error=MyError)

One writer and one reader for every stamped file fedpeft keeps (a client's personal state, a server checkpoint's
tensors): the write goes through :mod:`fedpeft._atomic` (temporary file, fsync, rename, fsync of the folder), so a
reader or a crash sees the old file or the new one, with the umask's permissions; the stamp carries ``sha256`` over
itself and the tensors. The read refuses a file that is not a regular safetensors file, whose stamp differs from
``want`` in any field, or (tensors read) whose ``sha256`` does not match: naming the file and the field. No pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Type

from safetensors import SafetensorError, safe_open
from torch import Tensor

from ._integrity import content_digest, remove_leftovers, write_safetensors

__all__ = ["read_stamped", "write_stamped"]


def write_stamped(path: Path, tensors: Mapping[str, Tensor], stamp: Mapping[str, str]) -> None:
    """Write ``tensors`` (contiguous CPU copies) with metadata ``stamp`` plus ``sha256`` (over the stamp and the
    tensors: :func:`~fedpeft._integrity.content_digest`) to ``path`` atomically and durably, mode ``0o666 & ~umask``;
    deletes what a killed writer of ``path`` left."""
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: v for k, v in stamp.items() if k != "sha256"}
    meta["sha256"] = content_digest(meta, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, path.name)
    write_safetensors(path, data, meta)


def read_stamped(path: Path, want: Mapping[str, str], *, error: Type[Exception] = ValueError,
                 tensors: bool = True, names: Optional[Mapping[str, str]] = None,
                 hint: str = "", checksum: bool = True) -> Tuple[Dict[str, str], Dict[str, Tensor]]:
    """``(metadata, tensors)`` of the stamped file ``path`` (``tensors=False``: the header only, ``{}`` tensors, the
    checksum not verified).

    ``names`` words a field in messages (``{"frozen-sha256": "frozen backbone"}``); ``hint`` ends every message;
    ``checksum=False``: the stamp's ``sha256`` is not required (a file whose checksum is kept elsewhere).

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
    if tensors and checksum and content_digest({k: v for k, v in meta.items() if k != "sha256"}, out) != meta.get("sha256"):
        raise error(f"{path}: its tensors or header do not match its sha256 (edited or damaged){hint}")
    return meta, out
