"""The plain records that cross the client/server boundary: replies, client results, rejections, server reports.

Everything here is a small dataclass or named tuple of plain Python values and ``Dict[str, Tensor]``, so an engine can
put it on any wire (Flower's ``ArrayRecord``/``MetricRecord``, a queue, a file) and rebuild it by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple

from torch import Tensor

__all__ = ["ClientResult", "Rejection", "Reply", "ServerReport"]


class Reply(NamedTuple):
    """One client's answer to a round, as the server receives it: ``(client_id, upload, weight)``.

    ``client_id`` is the client's index in ``[0, num_clients)`` (Flower: ``node_config["partition-id"]``, never the
    node id), ``upload`` the state dict it sent (:attr:`ClientResult.upload`), ``weight`` its aggregation weight
    (its number of training examples, FedAvg's ``n_k``). A plain ``(client_id, upload, weight)`` tuple works too.
    """

    client_id: int
    upload: Mapping[str, Tensor]
    weight: float


class Rejection(NamedTuple):
    """A reply the server dropped, and why (the message also goes to the ``fedpeft.protocols`` logger)."""

    client_id: Any  # as received: it may be the invalid part
    reason: str


@dataclass
class ClientResult:
    """What :meth:`Protocol.client_update` returns.

    Attributes:
        upload: what leaves the client this round (detached copies; the keys of ``protocol.upload_keys(model)``):
            the shared trainable part, pFedPG's trained prompts P̃, ``{}`` for Local / SingleSet-VPT.
        num_examples: the client's number of training examples, the aggregation weight it should be sent with.
        personal: the client's new personal state (detached copies of ``protocol.personal_keys(model)``): keep it on
            the client (Flower: ``context.state``) and pass it back as ``personal=`` next round. Never sent.
        metrics: ``"loss"`` (mean training loss of the last phase; ``"loss_<phase>"`` per phase when there are
            several), ``"num_examples"``, and ``"accuracy"`` (the model right after its local training) when
            evaluation data was given.
    """

    upload: Dict[str, Tensor]
    num_examples: int
    personal: Dict[str, Tensor]
    metrics: Dict[str, float] = field(default_factory=dict)

    def reply(self, client_id: int) -> Reply:
        """This result as the server's :class:`Reply` (the upload, weighted by ``num_examples``)."""
        return Reply(client_id, self.upload, self.num_examples)


@dataclass
class ServerReport:
    """What a server's ``update(replies)`` returns.

    Attributes:
        accepted: client ids whose replies were used, sorted.
        rejected: the dropped replies with the reason of each (server state untouched by them).
        diagnostics: method-specific numbers (JSON-ready: str keys, floats and lists), e.g. pFedPG's distances
            ``‖gen(n) − P̃_n‖`` before and after the generator step.
        updated: whether the server state changed (False when no reply was accepted or nothing is shared).
    """

    accepted: List[int] = field(default_factory=list)
    rejected: List[Rejection] = field(default_factory=list)
    diagnostics: Dict[str, Any] = field(default_factory=dict)
    updated: bool = False

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready: ``{"accepted": [...], "rejected": [{"client_id", "reason"}], "diagnostics": {...}, ...}``."""
        return {
            "accepted": list(self.accepted),
            "rejected": [{"client_id": repr(r.client_id) if not isinstance(r.client_id, int) else r.client_id,
                          "reason": r.reason} for r in self.rejected],
            "diagnostics": self.diagnostics,
            "updated": self.updated,
        }
