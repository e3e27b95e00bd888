"""A node's data and built model, reused between messages from its state folder when their fingerprint matches.

A deployed SuperNode starts a fresh ClientApp process for every message, so without help every message reloads the
node's data (``load_data``: for the example, importing scikit-learn and reading the digits, 1–5 s) and rebuilds its
model (``build_model``: for a pre-trained backbone, reading a checkpoint). When the SuperNode is given a state folder
(``--node-config "... state-dir='/var/lib/fedpeft/node0'"``), :class:`NodeCache` keeps both under
``<state-dir>/cache/``:

    data-<fingerprint>.pt     the (train, test) TensorDatasets' tensors   (``torch.load(weights_only=True)``)
    frozen-<fingerprint>.pt   the SHA-256 of the built model's frozen state (what registration compares)

The fingerprint is a SHA-256 over everything the two functions are given or made of: the bytes of the source file
that defines ``load_data`` (or ``build_model``) and its qualified name, the node's ``node_config`` (without
``state-dir``) and the run's ``run_config``, and the fedpeft and torch versions. Change any of them and the cache
misses and is rewritten; files of other fingerprints are removed then, so the folder holds one entry of each kind.

What the fingerprint cannot see: files that ``load_data`` reads. If your data changes under the same code and
configuration, delete ``<state-dir>/cache`` (or put a data version into the run config).

Only plain tensors are cached, so loading never unpickles code: data must be ``TensorDataset`` s (or ``None``);
other data is loaded by ``load_data`` every time. The model itself is still built by ``build_model`` on every message
(the architecture must exist, and a pickled module would mean unpickling code); what is reused is the frozen-state
hash that registration needs (:func:`~fedpeft.flower.frozen_fingerprint`, a full pass over the backbone's bytes). For
a pre-trained backbone, let ``build_model`` read a local checkpoint rather than download.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple

import torch

__all__ = ["STATE_DIR", "NodeCache", "fingerprint"]

log = logging.getLogger("fedpeft.flower")

#: the ``node_config`` key naming the node's state folder (shared with the node's personal-state store)
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

    h = hashlib.sha256()
    h.update(_source_bytes(fn))
    for part in ({k: v for k, v in node_config.items() if k != STATE_DIR}, dict(run_config)):
        h.update(repr(sorted((str(k), repr(v)) for k, v in part.items())).encode())
    h.update(f"fedpeft {__version__} torch {torch.__version__}".encode())
    return h.hexdigest()


def _tensors_of(split: Any) -> Optional[Tuple[torch.Tensor, ...]]:
    """The tensors of a ``TensorDataset`` (``None`` stays ``None``); raises ``TypeError`` for anything else."""
    from torch.utils.data import TensorDataset

    if split is None:
        return None
    if type(split) is TensorDataset:
        return tuple(split.tensors)
    raise TypeError(f"only TensorDataset data is cached, got {type(split).__name__}")


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NodeCache:
    """``<state-dir>/cache/`` of one node (see the module docstring).

    Args:
        folder: the cache folder itself (``<state-dir>/cache``); created on the first write.
    """

    def __init__(self, folder: os.PathLike) -> None:
        self.folder = Path(folder)

    @classmethod
    def of(cls, context: Any, fallback: Any = None) -> Optional[NodeCache]:
        """The cache of the node ``context`` runs on: ``<state-dir>/cache`` of its ``node_config`` (else of
        ``fallback``, the ClientApp's own ``state_dir``), or ``None`` when it has no state folder."""
        state_dir = context.node_config.get(STATE_DIR) or (None if fallback is None else str(fallback))
        if not state_dir:
            return None
        if not isinstance(state_dir, str):
            raise TypeError(f"node_config[{STATE_DIR!r}] must be a path string, got {type(state_dir).__name__}")
        return cls(Path(state_dir).expanduser() / "cache")

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / f"{kind}-{key}.pt"

    def _replace(self, kind: str, key: str, obj: Any) -> None:
        _atomic_save(obj, self._path(kind, key))
        for old in self.folder.glob(f"{kind}-*.pt"):
            if old.name != self._path(kind, key).name:
                old.unlink(missing_ok=True)

    def data(self, context: Any, load_data: Callable[[Any], Tuple[Any, Any]]) -> Tuple[Any, Any]:
        """``load_data(context)``, or its cached ``(train, test)`` when the fingerprint matches."""
        from torch.utils.data import TensorDataset

        key = fingerprint(load_data, context.node_config, context.run_config)
        path = self._path("data", key)
        if path.exists():
            try:
                saved = torch.load(path, weights_only=True)
                return tuple(None if t is None else TensorDataset(*t) for t in saved)  # type: ignore[return-value]
            except Exception as e:  # a torn or foreign file: reload and rewrite it
                log.warning("data cache %s unreadable (%s); reloading", path, e)
        train, test = load_data(context)
        try:
            self._replace("data", key, [_tensors_of(train), _tensors_of(test)])
        except TypeError as e:
            log.info("not caching this node's data: %s", e)
        return train, test

    def frozen_hash(self, context: Any, build_model: Callable, model: torch.nn.Module,
                    compute: Callable[[torch.nn.Module], str]) -> str:
        """``compute(model)`` (the frozen-state SHA-256 of ``build_model(context)``), cached by fingerprint."""
        key = fingerprint(build_model, context.node_config, context.run_config)
        path = self._path("frozen", key)
        if path.exists():
            try:
                return str(torch.load(path, weights_only=True)["sha256"])
            except Exception as e:
                log.warning("frozen-hash cache %s unreadable (%s); recomputing", path, e)
        value = compute(model)
        self._replace("frozen", key, {"sha256": value})
        return value
