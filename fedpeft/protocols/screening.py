"""Screening replies before they touch server state: one bad client is dropped, never the round.

A reply ``(client_id, upload, weight)`` is accepted only if

- ``client_id`` is an ``int`` (not ``bool``) in ``[0, num_clients)`` when the server knows ``num_clients``, is one of
  the clients the round was sent to when the server knows that (pFedPG), and appears once in the batch (every reply of
  a duplicated id is dropped: which one to keep would depend on arrival order);
- ``upload`` is a ``Mapping[str, Tensor]`` with exactly the expected keys, and for each key the expected shape and
  dtype, and only finite values;
- ``weight`` is a finite real number > 0 (``fed`` rules: ``bool`` refused).

Accepted replies are returned sorted by client id, so two engines that deliver the same replies in different orders
aggregate in the same order and give bit-identical results. Each rejection is logged (logger ``fedpeft.protocols``)
and returned with its reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Collection, Iterable, List, Mapping, Optional, Tuple

from torch import Tensor

from .._checks import check_state, check_weight
from .records import Rejection, Reply

__all__ = ["screen_replies"]

log = logging.getLogger("fedpeft.protocols")


def _reason(reply: object, expected: Mapping[str, Tensor], num_clients: Optional[int],
            allowed: Optional[Collection[int]]) -> Tuple[Optional[str], Optional[Reply]]:
    try:
        client_id, upload, weight = reply  # type: ignore[misc]
    except (TypeError, ValueError):
        return f"a reply must be (client_id, upload, weight), got {type(reply).__name__}", None
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        return f"client_id must be an int, got {type(client_id).__name__} {client_id!r}", None
    if num_clients is not None and not 0 <= client_id < num_clients:
        return f"client_id {client_id} is outside [0, {num_clients})", None
    if allowed is not None and client_id not in allowed:
        return f"client {client_id} was not sent anything this round", None
    try:
        w = check_weight(weight, name="weight")
    except (TypeError, ValueError) as e:
        return f"{e} (a reply's weight must be finite and > 0)", None
    if w == 0:  # ``fed`` accepts a zero weight, a server does not: it would count a client that trained on nothing
        return "weight must be finite and > 0, got 0", None
    try:
        check_state(upload, like=expected, finite=True, name="upload")
    except (TypeError, ValueError) as e:
        return str(e), None
    for key, ref in expected.items():
        if upload[key].dtype != ref.dtype:
            return f"upload[{key!r}]: expected dtype {ref.dtype}, got {upload[key].dtype}", None
    return None, Reply(client_id, upload, w)


def screen_replies(
    replies: Iterable[object],
    expected: Mapping[str, Tensor],
    *,
    num_clients: Optional[int] = None,
    allowed: Optional[Collection[int]] = None,
) -> Tuple[List[Reply], List[Rejection]]:
    """Split ``replies`` into ``(accepted sorted by client id, rejections)`` (rules in the module docstring).

    Args:
        replies: ``(client_id, upload, weight)`` tuples or :class:`Reply`.
        expected: a state dict with the keys, shapes and dtypes an upload must have (values are not read).
        num_clients: ids must lie in ``[0, num_clients)`` when given.
        allowed: the ids the round was sent to, when the server tracks them.
    """
    replies = list(replies)
    ids = Counter(r[0] for r in replies if isinstance(r, tuple) and len(r) == 3
                  and isinstance(r[0], int) and not isinstance(r[0], bool))
    accepted: List[Reply] = []
    rejected: List[Rejection] = []
    for reply in replies:
        reason, ok = _reason(reply, expected, num_clients, allowed)
        if reason is None and ids[ok.client_id] > 1:
            reason = f"client {ok.client_id} replied {ids[ok.client_id]} times in one round; every copy is dropped"
        if reason is not None:
            cid = reply[0] if isinstance(reply, tuple) and reply else None
            log.warning("dropped the reply of client %r: %s", cid, reason)
            rejected.append(Rejection(cid, reason))
        else:
            accepted.append(ok)
    accepted.sort(key=lambda r: r.client_id)
    rejected.sort(key=lambda r: (not isinstance(r.client_id, int), r.client_id if isinstance(r.client_id, int) else 0))
    return accepted, rejected
