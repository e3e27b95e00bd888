"""What crosses Flower's wire: every record key, state dicts as ``ArrayRecord`` by key, and the reading of a message.

- Keys (the one home; no literal elsewhere): ``ARRAYS`` (a state dict), ``CONFIG`` (server → node: ``ROUND``,
  ``SEED``, ``METHOD``, ``RUN``), ``METRICS`` (node → server), ``INFO`` (registration), and for one message per round
  ``DEPLOY`` (the previous round's deployment, ``EVAL_ROUND``) answered under ``EVALUATION``.
- ``to_record(state)`` / ``from_record(record, like=)``: by key, never positional; bf16/fp16 travel as float32 (Flower's
  ``Array`` has no bfloat16) and come back in ``like``'s dtype, bit for bit.
- :func:`parse_reply` reads a train reply into a :class:`~fedpeft.protocols.Reply` (or a ``Rejection``): *whose* it
  is (the message it answers, never the sender's node id), whether the client failed or diverged, its arrays. Whether
  it *counts* (ids, round, weight, keys, shapes, dtypes, finite values) is checked once, by the server's
  ``screen_replies``. See docs/flower.md.
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from torch import Tensor

from .. import fed
from .._checks import check_finite_float
from ..protocols import Diverged, Rejection, Reply

__all__ = ["ARRAYS", "CLIP_NORM", "CONFIG", "DEPLOY", "EVALUATION", "EVAL_ROUND", "INFO", "METHOD", "METRICS", "ROUND", "RUN",
           "SEED", "Task", "from_record", "parse_evaluation", "parse_reply", "partition",
           "payload_bytes", "read_clip", "read_run", "read_task", "to_record"]

ARRAYS, CONFIG, METRICS, INFO = "arrays", "config", "metrics", "info"
ROUND, SEED, METHOD, RUN = "fedpeft.round", "fedpeft.seed", "fedpeft.method", "fedpeft.run"
DEPLOY, EVAL_ROUND, EVALUATION = "fedpeft.deploy", "fedpeft.eval-round", "evaluation"
CLIP_NORM = "fedpeft.dp-clip-norm"  # user-level DP: the L2 bound a client clips its update to (docs/privacy.md)
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"  # node_config keys (state-dir: protocols.node_cache)

#: message id of each message sent this round → the partition it went to
Sent = Mapping[str, int]


def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``state`` in sorted key order (CPU copies); bf16/fp16/float8 as float32, float64 kept.

    Raises:
        TypeError: ``state`` is not a ``Mapping[str, Tensor]``.
    """
    keys, arrays = fed.to_ndarrays(state)  # sorted keys; bf16/float8 already float32
    record = ArrayRecord()
    for k, a in zip(keys, arrays):
        if np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize < 4:  # float16 (bf16 came as float32)
            a = a.astype(np.float32)
        record[k] = Array(np.asarray(a, order="C"))  # (np.ascontiguousarray makes a 0-d array 1-d)
    return record


def from_record(record: ArrayRecord, *, like: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """The state dict in ``record`` (new CPU tensors, by key); floating keys of ``like`` take its dtype and device.

    Keys ``like`` lacks come back as sent, for the screening to name them. Raises ``TypeError`` for anything but an
    ``ArrayRecord`` of NumPy arrays.
    """
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected a flwr.app.ArrayRecord, got {type(record).__name__}")
    keys = list(record.keys())
    state = fed.from_ndarrays(keys, [record[k].numpy() for k in keys])
    for k, t in state.items():
        ref = (like or {}).get(k)
        if ref is not None and t.is_floating_point() and ref.is_floating_point():
            state[k] = t.to(device=ref.device, dtype=ref.dtype)
    return state


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in ``record`` (Σ numel × itemsize as sent), without Flower's headers and key names."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())


# ---- the node's side -----------------------------------------------------------------------------------------------
class Task(NamedTuple):
    """What a train/evaluate message asks: its config, the 0-based round, the seed, the method and the run id."""

    config: ConfigRecord
    round: int
    seed: int
    method: Optional[str]
    run: Optional[str]


def read_task(msg: Message) -> Task:
    """The :class:`Task` of a train/evaluate message.

    Raises:
        ValueError: no config record, no round, or a round / seed that is not an integer (a negative round neither).
    """
    cfg = msg.content.config_records.get(CONFIG)
    if cfg is None:
        raise ValueError(f"the message has no config record {CONFIG!r} (the round it belongs to is unknown)")
    if ROUND not in cfg:
        raise ValueError(f"the message's config has no {ROUND!r}")
    round_, seed = cfg[ROUND], cfg.get(SEED, 0)
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"config[{ROUND!r}] must be an integer >= 0, got {round_!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"config[{SEED!r}] must be an integer, got {seed!r}")
    return Task(cfg, round_, seed, cfg.get(METHOD), read_run(msg))


def read_clip(task: Task) -> Dict[str, float]:
    """``{"clip_norm": C}`` when the server asks the client to clip its update (DP), else ``{}``: the keyword
    arguments for ``protocol.client_update``.

    Raises:
        ValueError: a clip norm that is not a finite number > 0.
    """
    clip = task.config.get(CLIP_NORM)
    if clip is None:
        return {}
    if check_finite_float(f"config[{CLIP_NORM!r}]", clip) <= 0:
        raise ValueError(f"config[{CLIP_NORM!r}] must be > 0, got {clip!r}")
    return {"clip_norm": float(clip)}


def read_run(msg: Message) -> Optional[str]:
    """The fedpeft run id a message names (``RUN`` in its config), or ``None``: Flower's own run id then."""
    run = msg.content.config_records.get(CONFIG, ConfigRecord()).get(RUN)
    return run if isinstance(run, str) and run else None


def partition(context: Context) -> Tuple[int, Optional[int]]:
    """``(partition_id, num_partitions)`` from ``context.node_config`` (``num_partitions`` is None if unset).

    Raises:
        ValueError: ``partition-id`` is missing, not a non-negative integer, or not below ``num-partitions``.
    """
    cfg = context.node_config
    if PARTITION_ID not in cfg:
        raise ValueError(f"node_config has no {PARTITION_ID!r} (got keys {sorted(cfg)}); start the SuperNode with "
                         f'--node-config "{PARTITION_ID}=<i> {NUM_PARTITIONS}=<N>"')
    pid, num = cfg[PARTITION_ID], cfg.get(NUM_PARTITIONS)
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ValueError(f"node_config[{PARTITION_ID!r}] must be an integer >= 0, got {pid!r}")
    if num is not None:
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"node_config[{NUM_PARTITIONS!r}] must be an integer >= 1, got {num!r}")
        if pid >= num:
            raise ValueError(f"node_config[{PARTITION_ID!r}] = {pid} is out of range for {NUM_PARTITIONS} = {num}")
    return pid, num


# ---- the server's side ---------------------------------------------------------------------------------------------
def _answering(msg: Message, sent: Sent, key: str = METRICS) -> Union[Tuple[int, MetricRecord], Rejection]:
    """``(partition id, metrics)`` of a reply to one of the ``sent`` messages, or why it cannot be attributed."""
    pid = sent.get(msg.metadata.reply_to_message_id)
    if pid is None:
        return Rejection(f"node {msg.metadata.src_node_id}", "a reply to no message sent this round")
    if msg.has_error():
        return Rejection(pid, f"the client failed: {msg.error.reason}")
    metrics = msg.content.metric_records.get(key)
    if metrics is None:
        return Rejection(pid, f"reply without a MetricRecord {key!r}")
    if metrics.get(PARTITION_ID) != pid:
        return Rejection(pid, f"reply claims partition-id {metrics.get(PARTITION_ID)!r}, but the message went to "
                              f"partition {pid}")
    return pid, metrics


def parse_reply(msg: Message, sent: Sent, like: Mapping[str, Tensor],
                registered: Optional[Mapping[int, int]] = None) -> Union[Reply, Rejection]:
    """A train reply as ``Reply(partition, upload cast like like, num-examples, round, max_weight=registered[pid])``,
    or a ``Rejection`` (``Diverged`` when the client's own training diverged).

    Args:
        sent: message id → partition id of this round's train messages.
        like: the server's ``expected_upload`` (dtypes and devices to cast to).
        registered: partition → the training examples its node registered with (the reply's weight cap).
    """
    got = _answering(msg, sent)
    if isinstance(got, Rejection):
        return got
    pid, metrics = got
    if metrics.get("diverged"):
        info = msg.content.config_records.get(INFO)
        why = info.get("why") if info is not None else None
        return Diverged(pid, why if isinstance(why, str) else
                        "local training diverged; the client kept its previous personal state")
    try:
        upload = from_record(msg.content.array_records.get(ARRAYS, ArrayRecord()), like=like)
    except (TypeError, ValueError) as e:
        return Rejection(pid, f"unreadable reply: {e}")
    cap = None if registered is None else registered.get(pid)
    if registered is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        return Rejection(pid, f"the node registered no training examples ({cap!r}); its weight cannot be capped")
    return Reply(pid, upload, metrics.get("num-examples"), metrics.get("round"), cap)


def parse_evaluation(msg: Message, sent: Sent, key: str = METRICS) -> Union[Tuple[int, float, MetricRecord], Rejection]:
    """An evaluate reply as ``(partition id, accuracy in [0, 1], metrics)``, or a ``Rejection``; ``key=EVALUATION``
    reads the evaluation a train reply carries (one message per round)."""
    got = _answering(msg, sent, key)
    if isinstance(got, Rejection):
        return got
    pid, metrics = got
    acc = metrics.get("accuracy")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0.0 <= float(acc) <= 1.0:
        return Rejection(pid, f"accuracy {acc!r} is not a number in [0, 1]")
    return pid, float(acc), metrics
