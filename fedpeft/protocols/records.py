"""The plain records that cross the client/server boundary: replies, client results, rejections, server reports.

Everything here is a small dataclass or named tuple of plain Python values and ``Dict[str, Tensor]``, so an engine can
put it on any wire (Flower's ``ArrayRecord``/``MetricRecord``, a queue, a file) and rebuild it by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

from torch import Tensor

__all__ = ["ClientResult", "Rejection", "Reply", "RoundRecord", "ServerReport"]


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
    """A reply the server dropped, and why (the message also goes to the ``fedpeft.protocols`` logger).

    ``client_id`` is the client's id when it is known; otherwise what identifies the sender: a Flower engine writes
    ``"node <node id>"`` for a reply it cannot attribute to a partition, and a server keeps an invalid id as received.
    """

    client_id: Any  # as received: it may be the invalid part
    reason: str


def _who(client_id: Any) -> Any:
    return client_id if isinstance(client_id, (int, str)) and not isinstance(client_id, bool) else repr(client_id)


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
            "rejected": [{"client_id": _who(r.client_id), "reason": r.reason} for r in self.rejected],
            "diagnostics": self.diagnostics,
            "updated": self.updated,
        }


@dataclass
class RoundRecord:
    """One round, as every engine records it (the in-process :class:`~fedpeft.protocols.Federation` and Flower's
    :class:`~fedpeft.flower.ProtocolStrategy` fill the same fields; :meth:`as_dict` is one line of the round log).

    Attributes:
        round: the round index, 0-based (Flower's server round minus one).
        participants: the sampled client ids, sorted.
        train_loss: ``{client: mean training loss}`` of the clients whose reply the server accepted or screened.
        after_local: ``{client: accuracy right after its local training}`` (needs test data).
        deployed: every client's deployed-model accuracy after the server step, by client id (needs test data);
            ``None`` for a client that was not evaluated (Flower: no node, a failed or late evaluation).
        server: the server's report: ``accepted``, ``rejected`` — one :class:`Rejection` ``(client or node, reason)``
            per dropped reply, including replies an engine could not read or that never came — ``diagnostics``
            (e.g. pFedPG's distances) and ``updated``.
        upload_bytes: ``{client: bytes of array data it sent}`` (Flower; empty in-process, where nothing is sent).
        without_personal: evaluated clients that had no personal state of their own yet.
        eval_dropped: evaluations that could not be used, ``(client or node, reason)``.
        wall_s: seconds the round took (training, server step and evaluation).
    """

    round: int
    participants: List[int]
    train_loss: Dict[int, float] = field(default_factory=dict)
    after_local: Dict[int, float] = field(default_factory=dict)
    deployed: Optional[List[Optional[float]]] = None
    server: ServerReport = field(default_factory=ServerReport)
    upload_bytes: Dict[int, int] = field(default_factory=dict)
    without_personal: List[int] = field(default_factory=list)
    eval_dropped: List[Rejection] = field(default_factory=list)
    wall_s: Optional[float] = None

    @property
    def mean(self) -> Optional[float]:
        """The mean deployed accuracy over the evaluated clients (``None`` without any)."""
        got = [a for a in (self.deployed or []) if a is not None]
        return sum(got) / len(got) if got else None

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> RoundRecord:
        """The inverse of :meth:`as_dict` (e.g. a line of the round log, to rebuild a resumed run's history)."""
        def ints(m: Mapping[str, Any]) -> Dict[int, Any]:
            return {int(c): v for c, v in m.items()}

        def rejections(rows: List[Mapping[str, Any]]) -> List[Rejection]:
            return [Rejection(r["client_id"], r["reason"]) for r in rows]

        server = ServerReport(accepted=list(row["accepted"]), rejected=rejections(row["rejected"]),
                              diagnostics=dict(row["diagnostics"]), updated=bool(row["updated"]))
        return cls(round=int(row["round"]), participants=list(row["participants"]),
                   train_loss=ints(row["train_loss"]), after_local=ints(row["after_local"]),
                   deployed=None if row["deployed"] is None else list(row["deployed"]), server=server,
                   upload_bytes=ints(row["upload_bytes"]), without_personal=list(row["without_personal"]),
                   eval_dropped=rejections(row["eval_dropped"]), wall_s=row["wall_s"])

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready (client ids as str keys in the per-client maps), the round log's line."""
        return {
            "round": self.round,
            "participants": list(self.participants),
            "train_loss": {str(c): v for c, v in sorted(self.train_loss.items())},
            "after_local": {str(c): v for c, v in sorted(self.after_local.items())},
            "deployed": None if self.deployed is None else list(self.deployed),
            "mean": self.mean,
            **self.server.as_dict(),
            "upload_bytes": {str(c): v for c, v in sorted(self.upload_bytes.items())},
            "without_personal": list(self.without_personal),
            "eval_dropped": [{"client_id": _who(r.client_id), "reason": r.reason} for r in self.eval_dropped],
            "wall_s": self.wall_s,
        }
