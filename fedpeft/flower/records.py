"""State dicts on Flower's wire: ``ArrayRecord`` by key, half precision sent as float32 and cast back on arrival.

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

from typing import Dict, Mapping, Optional

import numpy as np
from flwr.app import Array, ArrayRecord
from torch import Tensor

from .. import fed

__all__ = ["from_record", "payload_bytes", "to_record"]


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
        record[k] = Array(np.ascontiguousarray(a))
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
