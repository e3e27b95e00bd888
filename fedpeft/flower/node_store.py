"""Where a node keeps what outlives a message: its clients' personal state, and a cache of its data and backbone hash.

- :func:`state_dir`: the one reader of ``node_config["state-dir"]`` (else the ClientApp's ``state_dir=``).
- :func:`store_for`: with a state folder, a :class:`~fedpeft.protocols.ClientStateFile` (one stamped safetensors file
  per (run, partition): survives a SuperNode restart, redoes a round the server resends after a resume); without
  one, a :class:`MemoryStore` in Flower's ``context.state`` (lost with the SuperNode; a repeated round is refused).
- :func:`cache_for`: ``<state-dir>/cache/``, a :class:`~fedpeft.protocols.node_cache.NodeCache` of the node's data and
  frozen-backbone hash (a deployed SuperNode starts a process per message). See docs/flower.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

from flwr.app import ConfigRecord, Context
from torch import Tensor

from ..protocols import ClientStateFile, StaleMessage
from ..protocols.node_cache import STATE_DIR, NodeCache
from .wire import from_record, to_record

__all__ = ["MemoryStore", "cache_for", "state_dir", "store_for"]


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


def cache_for(context: Context, fallback: Union[str, Path, None] = None) -> Optional[NodeCache]:
    """``<state-dir>/cache`` of the node ``context`` runs on, or ``None`` without a state folder."""
    folder = state_dir(context, fallback)
    return None if folder is None else NodeCache(folder / "cache")
