"""Screening replies before they touch server state: one bad client is dropped, never the round.

A reply ``(client_id, upload, weight[, round])`` (a tuple, a list or a :class:`Reply`) is accepted only if

- ``client_id`` is an ``int`` (not ``bool``) in ``[0, num_clients)`` when the server knows ``num_clients``, is one of
  the clients the round was sent to when the server knows that (pFedPG), and appears once in the batch, whatever
  form each copy takes (every reply of a duplicated id is dropped: which one to keep would depend on arrival order);
- its ``round`` stamp, when it has one, is the round in flight (a late reply from a past round is refused);
- ``upload`` is a ``Mapping[str, Tensor]`` with exactly the expected keys, and for each key the expected shape and
  dtype, and only finite values;
- ``weight`` is a finite real number > 0 (``fed`` rules: ``bool`` refused), and at most ``max_weight`` when the server
  caps it (a self-reported ``num-examples`` of 1e300 would otherwise make one client the whole aggregate) and at most
  the reply's own ``Reply.max_weight`` when the engine set one (Flower: the examples the node registered with).

This is the one place a reply's content is checked; an engine only reads a reply (whose it is, its arrays). The
other direction, a client's download, is :func:`check_download`.

Accepted replies are returned sorted by client id, so two engines that deliver the same replies in different orders
aggregate in the same order and give bit-identical results. Each rejection is logged (logger ``fedpeft.protocols``)
and returned with its reason.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Collection, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_state, check_weight
from .records import Rejection, Reply, rejection_order

__all__ = ["check_download", "check_max_weight", "screen_metric", "screen_replies"]

log = logging.getLogger("fedpeft.protocols")


def check_max_weight(max_weight: Optional[float]) -> Optional[float]:
    """``max_weight`` as a float (``None`` kept).

    Raises:
        ValueError: not ``None`` or a finite number > 0.
    """
    if max_weight is None:
        return None
    if isinstance(max_weight, bool) or not isinstance(max_weight, (int, float)) or not (
            math.isfinite(float(max_weight)) and max_weight > 0):
        raise ValueError(f"max_weight must be None or a finite number > 0, got {max_weight!r}")
    return float(max_weight)


def _unpack(reply: object) -> Optional[tuple]:
    """``(client_id, upload, weight, round, max_weight)`` of a :class:`Reply` or a 3- or 4-element tuple/list, else
    ``None``."""
    if isinstance(reply, Reply):
        return tuple(reply)
    if isinstance(reply, (str, bytes, Mapping)) or not isinstance(reply, Sequence) or len(reply) not in (3, 4):
        return None
    return (*reply, None, None) if len(reply) == 3 else (*reply, None)


def _reason(reply: object, expected: Mapping[str, Tensor], num_clients: Optional[int],
            allowed: Optional[Collection[int]], round_: Optional[int],
            max_weight: Optional[float]) -> Tuple[Optional[str], Optional[Reply]]:
    parts = _unpack(reply)
    if parts is None:
        return (f"a reply must be (client_id, upload, weight) or (client_id, upload, weight, round), got "
                f"{type(reply).__name__}"), None
    client_id, upload, weight, stamped, cap = parts
    if isinstance(upload, Mapping):  # read once: the checks and the aggregation see the same tensors
        upload = dict(upload.items())
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        return f"client_id must be an int, got {type(client_id).__name__} {client_id!r}", None
    if num_clients is not None and not 0 <= client_id < num_clients:
        return f"client_id {client_id} is outside [0, {num_clients})", None
    if allowed is not None and client_id not in allowed:
        return f"client {client_id} was not sent anything this round", None
    if stamped is not None and round_ is not None and (isinstance(stamped, bool) or not isinstance(stamped, int)
                                                       or stamped != round_):
        return f"the reply answers round {stamped!r}, the server is in round {round_}", None
    try:
        w = check_weight(weight, name="weight")
    except (TypeError, ValueError) as e:
        return f"{e} (a reply's weight must be finite and > 0)", None
    if w == 0:  # ``fed`` accepts a zero weight, a server does not: it would count a client that trained on nothing
        return "weight must be finite and > 0, got 0", None
    if max_weight is not None and w > max_weight:
        return f"weight {w:g} is above max_weight {max_weight:g} (a self-reported num-examples is capped)", None
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0 and w > cap:
        return f"weight {w:g} is more than the {cap:g} training examples the node registered with", None
    try:
        check_state(upload, like=expected, finite=True, name="upload")
    except (TypeError, ValueError) as e:
        return str(e), None
    for key, ref in expected.items():
        if upload[key].dtype != ref.dtype:
            return f"upload[{key!r}]: expected dtype {ref.dtype}, got {upload[key].dtype}", None
    return None, Reply(client_id, upload, w, stamped)


def screen_replies(
    replies: Iterable[object],
    expected: Mapping[str, Tensor],
    *,
    num_clients: Optional[int] = None,
    allowed: Optional[Collection[int]] = None,
    round: Optional[int] = None,
    max_weight: Optional[float] = None,
) -> Tuple[List[Reply], List[Rejection]]:
    """Split ``replies`` into ``(accepted sorted by client id, rejections)`` (rules in the module docstring).

    Args:
        replies: ``(client_id, upload, weight)`` tuples or :class:`Reply`.
        expected: a state dict with the keys, shapes and dtypes an upload must have (values are not read).
        num_clients: ids must lie in ``[0, num_clients)`` when given.
        allowed: the ids the round was sent to, when the server tracks them.
        round: the round in flight: a reply stamped with another round is refused (unstamped ones pass).
        max_weight: the largest weight a reply may claim (``None``: no cap).

    Raises:
        TypeError: ``replies`` is not iterable (nothing is screened).
    """
    try:
        replies = list(replies)
    except TypeError:
        raise TypeError(f"replies must be an iterable of (client_id, upload, weight), got "
                        f"{type(replies).__name__}") from None
    ids = Counter(p[0] for p in map(_unpack, replies)  # every copy counts: tuples, lists and Replies alike
                  if p is not None and isinstance(p[0], int) and not isinstance(p[0], bool))
    accepted: List[Reply] = []
    rejected: List[Rejection] = []
    for reply in replies:
        reason, ok = _reason(reply, expected, num_clients, allowed, round, max_weight)
        if reason is None and ids[ok.client_id] > 1:
            reason = f"client {ok.client_id} replied {ids[ok.client_id]} times in one round; every copy is dropped"
        if reason is not None:
            parts = _unpack(reply)
            cid = parts[0] if parts is not None else None
            log.warning("dropped the reply of client %r: %s", cid, reason)
            rejected.append(Rejection(cid, reason))
        else:
            accepted.append(ok)
    accepted.sort(key=lambda r: r.client_id)
    rejected.sort(key=rejection_order)
    return accepted, rejected


def check_download(shared: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> None:
    """Refuse downloaded arrays that are not finite, or not floating where the model's parameter is (``ValueError``
    naming the key): a node never trains or deploys on them."""
    for k, v in shared.items():
        ref = like.get(k)
        if ref is not None and ref.is_floating_point() and not v.is_floating_point():
            raise ValueError(f"the server sent {k!r} as {v.dtype}; the model's parameter is {ref.dtype}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"the server sent non-finite values (NaN/Inf) in {k!r}; refusing to train or deploy on "
                             "them")


def screen_metric(name: str, value: object, client: object) -> Optional[float]:
    """A reply's ``loss`` (finite) or ``accuracy`` (in [0, 1]) as a float, or ``None`` (logged) when it is not one:
    a NaN loss or an accuracy of 7.5 never reaches a round record, the round log or a report."""
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    if ok and name.startswith("accuracy"):
        ok = 0.0 <= float(value) <= 1.0
    if not ok:
        log.warning("client %r reported %s = %r; left out of the round record (%s)", client, name, value,
                    "a number in [0, 1]" if name.startswith("accuracy") else "a finite number")
        return None
    return float(value)
