"""Integrity of fedpeft's files on disk: content checksums, one writer per folder, modes that follow the umask.

- :func:`tensor_digest` / :func:`content_digest`: SHA-256 over tensors by key (name, dtype, shape, bytes) and, for
  :func:`content_digest`, a JSON-ready ``meta`` first (canonical JSON: sorted keys, no spaces). A flipped bit in a
  tensor, an edited header field or a tensor stored with another dtype changes it.
- :func:`write_safetensors`: a safetensors file written atomically through :mod:`fedpeft._atomic`, so it gets the
  umask's permissions (safetensors' own ``save_file`` writes a ``.tmpXXXXXX`` file with mode 0600 and renames it,
  leaving that full-size file behind when the process is killed).
- :class:`FolderLock`: an advisory ``flock`` on ``<folder>/<name>`` holding the writer's pid and host. Released when
  the holder closes it or dies (``kill -9`` included); a second writer is refused with the first one's pid and host,
  or (``wait=True``) waits its turn.
- :func:`remove_leftovers`: deletes the temporary files a killed writer left in a folder it owns (call it while
  holding the folder's lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import save as _safetensors_bytes
from torch import Tensor

from . import _atomic

try:  # POSIX; elsewhere folders are not locked (documented in docs/flower.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderLock", "content_digest", "remove_leftovers", "tensor_digest", "write_safetensors"]

log = logging.getLogger("fedpeft")

#: temporary files of :mod:`fedpeft._atomic` (``.<name>.<16 hex>.tmp``) and of safetensors' ``save_file`` (``.tmpXXXXXX``)
_LEFTOVER = re.compile(r"^(\..+\.[0-9a-f]{16}\.tmp|\.tmp[A-Za-z0-9]{6})$")


def tensor_digest(tensors: Mapping[str, Tensor], h: Optional[Any] = None) -> str:
    """SHA-256 (hex) over ``tensors`` in sorted key order: ``name|dtype|shape|`` then the raw bytes of each.

    ``h``: a ``hashlib`` object to continue (the digest returned is of everything fed to it).
    """
    h = hashlib.sha256() if h is None else h
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def content_digest(meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) over ``meta`` (canonical JSON) and then ``tensors`` (:func:`tensor_digest`)."""
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True, default=repr).encode())
    h.update(b"\0")
    return tensor_digest(tensors, h)


def write_safetensors(path: Union[str, Path], tensors: Mapping[str, Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` to ``path`` atomically and durably (:mod:`fedpeft._atomic`), mode ``0o666 & ~umask``."""
    path = Path(path)
    data = _safetensors_bytes(dict(tensors), metadata=None if metadata is None else dict(metadata))
    _atomic.replace(_atomic.write_temp(path, lambda p: Path(p).write_bytes(data)), path)


def remove_leftovers(directory: Union[str, Path], name: Optional[str] = None) -> int:
    """Delete the temporary files a killed writer left in ``directory`` (with ``name``: only those of that file and
    safetensors' own); returns how many. Hold the lock of what you clean."""
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for p in directory.iterdir():
        mine = name is None or p.name.startswith(f".{name}.") or p.name.startswith(".tmp")
        if mine and _LEFTOVER.match(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) a killed writer left in %s", removed, directory)
    return removed


class FolderLock:
    """An exclusive advisory lock on ``directory / name`` (created, mode ``0o666 & ~umask``), naming its holder.

    Args:
        directory: the folder (created if missing).
        what: how errors call the folder (e.g. ``"checkpoint folder"``).
        name: the lock file's name; ``None`` locks the folder itself (no file; the holder is not named).
        wait: block until the lock is free instead of refusing.

    Raises:
        RuntimeError: (``wait=False``) another writer holds it; names its pid and host.
    """

    def __init__(self, directory: Union[str, Path], *, what: str = "folder", name: Optional[str] = ".fedpeft.lock",
                 wait: bool = False) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory if name is None else directory / name  # None: lock the folder itself, name no holder
        flags = os.O_RDONLY if name is None else os.O_RDWR | os.O_CREAT
        self._fd: Optional[int] = os.open(self.path, flags, 0o666)
        if fcntl is None:  # pragma: no cover - Windows
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = (os.pread(self._fd, 256, 0).decode(errors="replace").strip() if name else "") or "another process"
            self.close()
            raise RuntimeError(f"the {what} {directory} is locked by {holder}, which writes it; a second writer is "
                               "refused (stop that process, or use another folder)") from None
        if name is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock (idempotent); the lock file stays."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a dropped holder (an engine garbage-collected) frees the folder
        with contextlib.suppress(Exception):
            self.close()
