"""A node's cache: ``load_data``'s datasets and the frozen-backbone hash, reused between messages while the key matches.

A deployed SuperNode starts a fresh ClientApp process per message; with a state folder, ``<state-dir>/cache/`` keeps

    data-p<partition>-<key>.pt     the (train, test) TensorDatasets' tensors  (``torch.load(weights_only=True)``)
    frozen-p<partition>-<key>.pt   the SHA-256 of the built model's frozen state (what registration compares) and a
                                   :func:`sketch` of the weights it was computed from (another sketch: recomputed)

``key`` is a SHA-256 of the function's source file and qualified name, the node's ``node_config`` (without
``state-dir``), the run's ``run_config`` and the fedpeft and torch versions; another key rewrites that partition's
entry and removes its old one (partitions sharing a state folder keep theirs). Optional in fact: a cache that cannot
be written (a file in the way, a full disk) is logged and the message goes on. What the key cannot see: files ``load_data`` reads (delete the folder when they change). Only
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

__all__ = ["NodeCache", "fingerprint", "sketch"]

log = logging.getLogger("fedpeft.protocols")

#: the ``node_config`` key naming the node's state folder (left out of the key: moving the folder keeps the cache)
STATE_DIR = "state-dir"
#: the ``node_config`` key of the node's partition: each partition keeps its own entries
PARTITION_ID = "partition-id"


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


def sketch(model: nn.Module) -> str:
    """A cheap check that ``model``'s state is the one a cached frozen hash was computed from: SHA-256 of every
    entry's name, dtype and shape and of ≈ 4096 evenly strided values (all of a smaller tensor). Any other checkpoint
    (retrained, fine-tuned, another seed: every weight differs) changes it, at a few % of a full hash's cost
    (ViT-B/16, one CPU thread: 0.023 s vs 0.84 s); an edit confined to unsampled entries of a large matrix is missed.
    No defence against a crafted state, and none is needed: a node reports its own fingerprint at registration."""
    h = hashlib.sha256()
    with torch.no_grad():
        for k, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(flat[:: max(1, flat.numel() // 4096)].to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class NodeCache:
    """``<state-dir>/cache/`` of one node (see the module docstring); ``folder`` is created on the first write."""

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder)

    def _path(self, kind: str, context: Any, key: str = "*") -> Path:
        """``<kind>-p<partition>-<key>.pt``: partitions sharing a state folder keep their own entries."""
        return self.folder / f"{kind}-p{context.node_config.get(PARTITION_ID)}-{key}.pt"

    def _replace(self, kind: str, context: Any, key: str, obj: Any) -> None:
        """Write one entry and drop this partition's older ones; optional: a failure is logged, never raised."""
        path = self._path(kind, context, key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic.remove_stale(self.folder, path.name)
            _atomic.replace(_atomic.write_temp(path, lambda p: torch.save(obj, p)), path)
            for old in self.folder.glob(self._path(kind, context).name):
                if old.name != path.name:
                    old.unlink(missing_ok=True)
        except (OSError, RuntimeError) as e:  # a file in the way, a full disk, a read-only folder
            log.warning("node cache %s not written (%s); going on without it", path, e)

    def _load(self, kind: str, context: Any, key: str) -> Any:
        path = self._path(kind, context, key)
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception as e:  # a torn or foreign file: recompute and rewrite it
                log.warning("%s cache %s unreadable (%s); recomputing", kind, path, e)
        return None

    def data(self, context: Any, load_data: Callable[[Any], Tuple[Any, Any]]) -> Tuple[Any, Any]:
        """``load_data(context)``, or its cached ``(train, test)`` when the fingerprint matches."""
        from torch.utils.data import TensorDataset

        key = fingerprint(load_data, context.node_config, context.run_config)
        saved = self._load("data", context, key)
        if saved is not None:
            return tuple(None if t is None else TensorDataset(*t) for t in saved)  # type: ignore[return-value]
        train, test = load_data(context)
        try:
            entry = [_tensors_of(train), _tensors_of(test)]
        except TypeError as e:
            log.info("not caching this node's data: %s", e)
        else:
            self._replace("data", context, key, entry)
        return train, test

    def frozen_hash(self, context: Any, build_model: Callable, model: nn.Module,
                    compute: Callable[[nn.Module], str] = fed.frozen_fingerprint) -> str:
        """``compute(model)`` (the frozen-state SHA-256 of ``build_model(context)``), cached by fingerprint and
        recomputed when ``model``'s :func:`sketch` differs from the cached one (``build_model``'s weights changed)."""
        key, now = fingerprint(build_model, context.node_config, context.run_config), sketch(model)
        saved = self._load("frozen", context, key)
        if isinstance(saved, dict) and saved.get("sketch") == now:
            return str(saved["sha256"])
        value = compute(model)
        self._replace("frozen", context, key, {"sha256": value, "sketch": now})
        return value
