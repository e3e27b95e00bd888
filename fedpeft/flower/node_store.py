"""Where a node keeps what outlives a message: its clients' personal state, and a cache of its data and backbone hash.

- :func:`state_dir`: the one reader of ``node_config["state-dir"]`` (else the ClientApp's ``state_dir=``).
- :func:`store_for`: with a state folder, a :class:`~fedpeft.protocols.ClientStateFile` (one stamped safetensors file
  per (run, partition): survives a SuperNode restart, redoes a round the server resends after a resume); without
  one, a :class:`MemoryStore` in Flower's ``context.state`` (lost with the SuperNode; a repeated round is refused).
- :class:`NodeCache`: ``<state-dir>/cache/`` keeps ``load_data``'s TensorDatasets and the frozen-backbone hash, keyed by
  a SHA-256 of the function's source and name, ``node_config`` (without ``state-dir``), ``run_config`` and the
  fedpeft and torch versions; only plain tensors (``torch.load(weights_only=True)``). What the key cannot see: files
  ``load_data`` reads (delete the cache folder when they change). See docs/flower.md.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from flwr.app import ConfigRecord, Context
from torch import Tensor, nn

from .. import _atomic, fed
from ..protocols import ClientStateFile, StaleMessage
from .wire import STATE_DIR, from_record, to_record

__all__ = ["MemoryStore", "NodeCache", "state_dir", "store_for"]

log = logging.getLogger("fedpeft.flower")


def state_dir(context: Context, fallback: Union[str, Path, None] = None) -> Optional[Path]:
    """The node's state folder: ``node_config["state-dir"]`` if set (non-empty), else ``fallback`` (``None``: none).

    Raises:
        TypeError: ``node_config["state-dir"]`` is not a string.
    """
    value = context.node_config.get(STATE_DIR)
    if value is None or value == "":
        return None if fallback is None or str(fallback) == "" else Path(fallback).expanduser()
    if not isinstance(value, str):
        raise TypeError(f"node_config[{STATE_DIR!r}] must be a path string, got {type(value).__name__} {value!r}")
    return Path(value).expanduser()


class MemoryStore:
    """A client's personal state in ``context.state`` (float32 ``ArrayRecord`` plus its round): the interface of
    :class:`~fedpeft.protocols.ClientStateFile`, but a round not newer than the stored one is refused."""

    def __init__(self, context: Context, method: str) -> None:
        self.context = context
        self.key, self.meta = f"fedpeft.{method}.personal", f"fedpeft.{method}.meta"

    def stored_round(self) -> Optional[int]:
        meta = self.context.state.get(self.meta)
        return None if meta is None else int(meta["round"])

    def _check_fresh(self, round_: int) -> None:
        written = self.stored_round()
        if written is not None and round_ <= written:
            raise StaleMessage(f"message for round {round_} is stale: this node's {self.key} is from round {written}")

    def deployed_state(self, like: Mapping[str, Tensor],
                       round_: Optional[int] = None) -> Tuple[Optional[Dict[str, Tensor]], Optional[int]]:
        written = self.stored_round()
        if written is None or self.key not in self.context.state:
            return None, None
        return from_record(self.context.state[self.key], like=like), written

    def start_state(self, round_: int, like: Mapping[str, Tensor]) -> Tuple[Optional[Dict[str, Tensor]], bool]:
        self._check_fresh(round_)
        return self.deployed_state(like)[0], False

    def save(self, round_: int, personal: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> None:
        self._check_fresh(round_)
        self.context.state[self.key] = to_record(personal)
        self.context.state[self.meta] = ConfigRecord({"round": int(round_)})


Store = Union[MemoryStore, ClientStateFile]


def store_for(context: Context, *, run: Optional[str], method: str, partition: int,
              fingerprint: Callable[[], str], fallback: Union[str, Path, None] = None) -> Store:
    """The store of this client's personal state (``fingerprint()`` is called only when a state folder is used).
    ``run``: the fedpeft run id the server sent (``None``: Flower's run id)."""
    folder = state_dir(context, fallback)
    if folder is None:
        return MemoryStore(context, method)
    return ClientStateFile(folder, run=run or str(context.run_id), partition=partition, method=method,
                           fingerprint=fingerprint())


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

    @classmethod
    def of(cls, context: Context, fallback: Union[str, Path, None] = None) -> Optional[NodeCache]:
        """``<state-dir>/cache`` of the node ``context`` runs on, or ``None`` without a state folder."""
        folder = state_dir(context, fallback)
        return None if folder is None else cls(folder / "cache")

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

    def data(self, context: Context, load_data: Callable[[Context], Tuple[Any, Any]]) -> Tuple[Any, Any]:
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

    def frozen_hash(self, context: Context, build_model: Callable, model: nn.Module,
                    compute: Callable[[nn.Module], str] = fed.frozen_fingerprint) -> str:
        """``compute(model)`` (the frozen-state SHA-256 of ``build_model(context)``), cached by fingerprint."""
        key = fingerprint(build_model, context.node_config, context.run_config)
        saved = self._load("frozen", key)
        if saved is not None:
            return str(saved["sha256"])
        value = compute(model)
        self._replace("frozen", key, {"sha256": value})
        return value
