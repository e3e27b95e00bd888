"""What a node knows about itself: which client it is, and its personal state with the round it was written in.

Clients are identified by ``context.node_config["partition-id"]`` (set by Flower's simulation engine, or by
``flower-supernode --node-config "partition-id=0 num-partitions=3"``), never by the random 64-bit node id.

Personal parameters live in ``context.state`` and never leave the node: an ``ArrayRecord`` (float32, as on the wire)
under ``"fedpeft.<namespace>.personal"`` and a ``ConfigRecord`` under ``"fedpeft.<namespace>.meta"`` holding the
round they were written in. A message whose round is not newer than the stored one is *stale* (a late or repeated
message): it must neither train on old state nor write, so it can never roll newer personal state back. A failed
message writes nothing (the handler writes only after its work succeeded, and Flower discards the context of a
raising ClientApp).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

from flwr.app import ConfigRecord, Context
from torch import Tensor

from .records import from_record, to_record

__all__ = ["StaleMessage", "load_personal", "partition", "save_personal"]

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


class StaleMessage(RuntimeError):
    """A message for a round not newer than the node's stored personal state (a late or repeated message)."""


def partition(context: Context) -> Tuple[int, Optional[int]]:
    """``(partition_id, num_partitions)`` from ``context.node_config`` (``num_partitions`` is None if unset).

    Raises:
        ValueError: ``partition-id`` is missing, not a non-negative integer, or not below ``num-partitions``.
    """
    cfg = context.node_config
    if PARTITION_ID not in cfg:
        raise ValueError(
            f"node_config has no {PARTITION_ID!r} (got keys {sorted(cfg)}); start the SuperNode with "
            f'--node-config "{PARTITION_ID}=<i> {NUM_PARTITIONS}=<N>"'
        )
    pid, num = cfg[PARTITION_ID], cfg.get(NUM_PARTITIONS)
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ValueError(f"node_config[{PARTITION_ID!r}] must be an integer >= 0, got {pid!r}")
    if num is not None:
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"node_config[{NUM_PARTITIONS!r}] must be an integer >= 1, got {num!r}")
        if pid >= num:
            raise ValueError(f"node_config[{PARTITION_ID!r}] = {pid} is out of range for {NUM_PARTITIONS} = {num}")
    return pid, num


def _keys(namespace: str) -> Tuple[str, str]:
    return f"fedpeft.{namespace}.personal", f"fedpeft.{namespace}.meta"


def stored_round(context: Context, namespace: str) -> Optional[int]:
    """The round the node's personal state for ``namespace`` was written in, or None if it has none yet."""
    meta = context.state.get(_keys(namespace)[1])
    return None if meta is None else int(meta["round"])


def load_personal(
    context: Context, namespace: str, like: Mapping[str, Tensor]
) -> Tuple[Optional[Dict[str, Tensor]], Optional[int]]:
    """``(personal_state, round)`` stored on this node, cast like ``like``; ``(None, None)`` if there is none yet."""
    rec_key, _ = _keys(namespace)
    written = stored_round(context, namespace)
    if written is None or rec_key not in context.state:
        return None, None
    return from_record(context.state[rec_key], like=like), written


def check_fresh(context: Context, namespace: str, round_: int) -> None:
    """Raise :class:`StaleMessage` if this node already holds personal state from round ``round_`` or later."""
    written = stored_round(context, namespace)
    if written is not None and round_ <= written:
        raise StaleMessage(
            f"message for round {round_} is stale: this node's {namespace} personal state is from round {written}"
        )


def save_personal(context: Context, namespace: str, state: Mapping[str, Tensor], round_: int) -> None:
    """Store ``state`` as written in ``round_``; refuses (``StaleMessage``) to overwrite a newer or equal round."""
    check_fresh(context, namespace, round_)
    rec_key, meta_key = _keys(namespace)
    context.state[rec_key] = to_record(state)
    context.state[meta_key] = ConfigRecord({"round": int(round_)})
