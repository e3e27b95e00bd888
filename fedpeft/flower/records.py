"""What crosses Flower's wire: the record keys, state dicts as ``ArrayRecord`` by key, and the reading of a reply.

Record keys (one home; the ClientApp, the strategy and the registry import them from here): ``ARRAYS`` (the state
dict), ``CONFIG`` (server → node: ``ROUND``, ``SEED``, ``METHOD``), ``METRICS`` (node → server: ``partition-id``,
``num-examples``, ``loss``, ``accuracy``, ...), ``INFO`` (registration: method, frozen-state fingerprint).
One message per round: a train message may also carry ``DEPLOY`` (the state the node deploys with for the previous
round's evaluation, ``EVAL_ROUND`` in its config); its reply then carries that evaluation under ``EVALUATION`` (the
same metrics an evaluate reply has under ``METRICS``).

:func:`parse_reply` reads one train reply into a protocol :class:`~fedpeft.protocols.Reply` or a
:class:`~fedpeft.protocols.Rejection` with its reason: which partition it answers (by ``reply_to_message_id``, the id
of the message the server sent, never by the sender's node id: Flower's own "node unavailable" errors come from the
SuperLink), whether the client failed, and its arrays by key. The upload's keys, shapes, dtypes, finite values and
weight are screened once, by the protocol's server (``server.update``). :func:`parse_evaluation` does the same for an
evaluate reply.

State dicts on the wire: ``ArrayRecord`` by key, half precision sent as float32 and cast back on arrival.

    record = to_record(state)                          # sorted keys; bf16/fp16 cast up to float32 (exact)
    state = from_record(record, like=reference)        # by key; reference's dtypes and devices (bf16 comes back)

Flower's ``Array`` cannot hold bfloat16 (``Got unsupported ScalarType BFloat16``) and its stock aggregation sums
float16 in float16, so fedpeft sends every floating tensor narrower than 32 bits as float32 (float32 and float64
travel as they are). Casting bf16/fp16 → float32 → bf16/fp16 is exact, so a client's model round-trips bit for bit.
Conversion is always by key (``ArrayRecord`` is a name-keyed dict), never positional.

``payload_bytes(record)`` is the size of the arrays themselves (Σ numel × itemsize as sent), the number to compare
with ``fed.num_bytes`` of the same state; ``record.count_bytes()`` adds Flower's per-array header and the key names.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from torch import Tensor

from .. import fed
from ..protocols import Rejection, Reply

__all__ = ["ARRAYS", "CONFIG", "DEPLOY", "EVALUATION", "EVAL_ROUND", "INFO", "METHOD", "METRICS", "ROUND", "SEED",
           "from_record", "parse_evaluation", "parse_reply", "payload_bytes", "to_record"]

ARRAYS, CONFIG, METRICS, INFO = "arrays", "config", "metrics", "info"
ROUND, SEED, METHOD = "fedpeft.round", "fedpeft.seed", "fedpeft.method"
DEPLOY, EVAL_ROUND, EVALUATION = "fedpeft.deploy", "fedpeft.eval-round", "evaluation"
#: the start of the reason of a reply whose client's own training diverged (``RoundRecord.diverged``)
DIVERGED = "local training diverged"

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
    """The state dict in ``record`` (new CPU tensors, by key).

    With ``like``, floating tensors whose key is in ``like`` take ``like``'s dtype and device (so a bf16 model gets
    bf16 back); keys that ``like`` lacks are returned as sent, for the caller's validation to name them. Shapes and
    key sets are *not* checked here: that is the protocol's validation (``fed``), which refuses a bad reply with a
    reason.

    Raises:
        TypeError: ``record`` is not an ``ArrayRecord``, or holds an array that is not a NumPy array.
    """
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected a flwr.app.ArrayRecord, got {type(record).__name__}")
    keys = list(record.keys())
    state = fed.from_ndarrays(keys, [record[k].numpy() for k in keys])
    if like is None:
        return state
    out = {}
    for k, t in state.items():
        ref = like.get(k)
        if ref is not None and t.is_floating_point() and ref.is_floating_point():
            t = t.to(device=ref.device, dtype=ref.dtype)
        out[k] = t
    return out


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in ``record`` (Σ numel × itemsize as sent), without Flower's headers and key names."""
    total = 0
    for arr in record.values():
        total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return total


def _answering(msg: Message, sent: Sent, key: str = METRICS) -> Union[Tuple[int, MetricRecord], Rejection]:
    """``(partition id, metrics)`` of a reply to one of the ``sent`` messages, or why it cannot be used."""
    pid = sent.get(msg.metadata.reply_to_message_id)
    if pid is None:
        return Rejection(f"node {msg.metadata.src_node_id}", "a reply to no message sent this round")
    if msg.has_error():
        return Rejection(pid, f"the client failed: {msg.error.reason}")
    metrics = msg.content.metric_records.get(key)
    if metrics is None:
        return Rejection(pid, f"reply without a MetricRecord {key!r}")
    if metrics.get("partition-id") != pid:
        return Rejection(pid, f"reply claims partition-id {metrics.get('partition-id')!r}, but the message went to "
                              f"partition {pid}")
    return pid, metrics


def parse_reply(msg: Message, sent: Sent, like: Mapping[str, Tensor]) -> Union[Reply, Rejection]:
    """A train reply as ``Reply(partition id, upload cast like like, num-examples)``, or a ``Rejection``.

    Args:
        msg: the reply.
        sent: message id → partition id of this round's train messages.
        like: the server's ``expected_upload`` (dtypes and devices to cast to; keys and shapes are screened later).
    """
    got = _answering(msg, sent)
    if isinstance(got, Rejection):
        return got
    pid, metrics = got
    if metrics.get("diverged"):
        info = msg.content.config_records.get(INFO)
        why = info.get("why") if info is not None else None
        return Rejection(pid, why if isinstance(why, str) and why.startswith(DIVERGED) else
                         f"{DIVERGED}; the client kept its previous personal state")
    try:
        upload = from_record(msg.content.array_records.get(ARRAYS, ArrayRecord()), like=like)
    except (TypeError, ValueError) as e:
        return Rejection(pid, f"unreadable reply: {e}")
    stamped = metrics.get("round")  # the round the client says it trained; the server refuses another one
    if stamped is not None and (isinstance(stamped, bool) or not isinstance(stamped, int)):
        return Rejection(pid, f"reply stamped with round {stamped!r}, not an integer")
    return Reply(pid, upload, metrics.get("num-examples"), stamped)


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
