"""Durable file replacement: write to a temporary file beside the target, fsync, rename over it, fsync the directory.

``write_temp`` creates the temporary file with ``os.open(..., 0o666)``, so it gets exactly the permissions any
normal write gets under the user's umask (``tempfile.mkstemp`` would make it 0600), and fsyncs its data before
returning. ``replace`` renames it into place (atomic on POSIX and Windows) and fsyncs the directory, so the rename
itself survives a power loss. Temporary names are ``.<target name>.<random hex>.tmp``; ``remove_stale`` deletes the
leftovers an interrupted writer (a killed process) left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["fsync_dir", "remove_stale", "replace", "write_temp"]


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")


def write_temp(final: Path, write: Callable[[str], None]) -> Path:
    """A new temporary file beside ``final`` filled by ``write(path)`` and fsync'ed; removed again if ``write`` fails."""
    tmp = _temp_name(final)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0o666 & ~umask, like open(..., "w")
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so renames and unlinks in it are durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` over ``final`` (atomic) and make the rename durable."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def remove_stale(directory: Path, name: str) -> None:
    """Delete leftover temporary files of ``name`` in ``directory`` (from a writer that was killed mid-way)."""
    for leftover in directory.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
