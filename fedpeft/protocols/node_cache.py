"""A node's cache: ``load_data``'s datasets and the frozen-backbone hash, reused between messages while the key matches.

A deployed SuperNode starts a fresh ClientApp process per message; with a state folder, ``<state-dir>/cache/`` keeps

    data-<key>.pt     the (train, test) TensorDatasets' tensors     (``torch.load(weights_only=True)``: no code)
    frozen-<key>.pt   the SHA-256 of the built model's frozen state (what registration compares)

``key`` is a SHA-256 of the function's source file and qualified name, the node's ``node_config`` (without
``state-dir``), the run's ``run_config`` and the fedpeft and torch versions; another key rewrites the entry and removes
the old one. What the key cannot see: files ``load_data`` reads (delete the folder when they change). Only
``TensorDataset`` data is cached. Engine-agnostic: a ``context`` is anything with ``node_config`` and ``run_config``.
See docs/flower.md.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _atomic, fed

__all__ = ["NodeCache", "fingerprint"]

log = logging.getLogger("fedpeft.protocols")

#: the ``node_config`` key naming the node's state folder (left out of the key: moving the folder keeps the cache)
STATE_DIR = "state-dir"


def _source_bytes(fn: Callable) -> bytes:
    target = inspect.unwrap(fn)
    try:
        path = inspect.getsourcefile(target)
        data = Path(path).read_bytes() if path else b""
    except (TypeError, OSError):
        data = b""
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"
    return name.encode() + b"\0" + data


def fingerprint(fn: Callable, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``fn``'s source file and name, ``node_config`` (without ``state-dir``), ``run_config``, and
    the fedpeft and torch versions: equal iff the cached result of ``fn`` may be reused."""
    from .._version import __version__

    h = hashlib.sha256(_source_bytes(fn))
    for part in ({k: v for k, v in node_config.items() if k != STATE_DIR}, dict(run_config)):
        h.update(repr(sorted((str(k), repr(v)) for k, v in part.items())).encode())
    h.update(f"fedpeft {__version__} torch {torch.__version__}".encode())
    return h.hexdigest()


def _tensors_of(split: Any) -> Optional[Tuple[Tensor, ...]]:
    """The tensors of a ``TensorDataset`` (``None`` stays ``None``); ``TypeError`` for anything else."""
    from torch.utils.data import TensorDataset

    if split is None:
        return None
    if type(split) is TensorDataset:
        return tuple(split.tensors)
    raise TypeError(f"only TensorDataset data is cached, got {type(split).__name__}")


class NodeCache:
    """``<state-dir>/cache/`` of one node (see the module docstring); ``folder`` is created on the first write."""

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder)

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / f"{kind}-{key}.pt"

    def _replace(self, kind: str, key: str, obj: Any) -> None:
        path = self._path(kind, key)
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic.remove_stale(self.folder, path.name)
        _atomic.replace(_atomic.write_temp(path, lambda p: torch.save(obj, p)), path)
        for old in self.folder.glob(f"{kind}-*.pt"):
            if old.name != path.name:
                old.unlink(missing_ok=True)

    def _load(self, kind: str, key: str) -> Any:
        path = self._path(kind, key)
        if path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception as e:  # a torn or foreign file: recompute and rewrite it
                log.warning("%s cache %s unreadable (%s); recomputing", kind, path, e)
        return None

    def data(self, context: Any, load_data: Callable[[Any], Tuple[Any, Any]]) -> Tuple[Any, Any]:
        """``load_data(context)``, or its cached ``(train, test)`` when the fingerprint matches."""
        from torch.utils.data import TensorDataset

        key = fingerprint(load_data, context.node_config, context.run_config)
        saved = self._load("data", key)
        if saved is not None:
            return tuple(None if t is None else TensorDataset(*t) for t in saved)  # type: ignore[return-value]
        train, test = load_data(context)
        try:
            self._replace("data", key, [_tensors_of(train), _tensors_of(test)])
        except TypeError as e:
            log.info("not caching this node's data: %s", e)
        return train, test

    def frozen_hash(self, context: Any, build_model: Callable, model: nn.Module,
                    compute: Callable[[nn.Module], str] = fed.frozen_fingerprint) -> str:
        """``compute(model)`` (the frozen-state SHA-256 of ``build_model(context)``), cached by fingerprint."""
        key = fingerprint(build_model, context.node_config, context.run_config)
        saved = self._load("frozen", key)
        if saved is not None:
            return str(saved["sha256"])
        value = compute(model)
        self._replace("frozen", key, {"sha256": value})
        return value
