"""The plain records that cross the client/server boundary: replies, client results, rejections, server reports.

Everything here is a small dataclass or named tuple of plain Python values and ``Dict[str, Tensor]``, so an engine can
put it on any wire (Flower's ``ArrayRecord``/``MetricRecord``, a queue, a file) and rebuild it by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ClientResult", "Diverged", "Rejection", "Reply", "RoundRecord", "ServerReport", "diverged",
           "rejection_order"]


class Reply(NamedTuple):
    """One client's answer to a round, as the server receives it: ``(client_id, upload, weight, round)``.

    ``client_id`` is the client's index in ``[0, num_clients)`` (Flower: ``node_config["partition-id"]``, never the
    node id), ``upload`` the state dict it sent (:attr:`ClientResult.upload`), ``weight`` its aggregation weight
    (its number of training examples, FedAvg's ``n_k``), ``round`` the 0-based round it answers (a server refuses a
    reply stamped with another round than the one in flight; ``None``: unstamped). A plain
    ``(client_id, upload, weight)`` tuple or list works too. ``max_weight``: a cap the *engine* knows for this client
    (Flower: the training examples its node registered with), checked with the server's own ``max_weight``.
    """

    client_id: int
    upload: Mapping[str, Tensor]
    weight: float
    round: Optional[int] = None
    max_weight: Optional[float] = None  # the engine's cap for this client (Flower: the examples it registered with)


class Rejection(NamedTuple):
    """A reply the server dropped, and why (the message also goes to the ``fedpeft.protocols`` logger).

    ``client_id`` is the client's id when it is known; otherwise what identifies the sender: a Flower engine writes
    ``"node <node id>"`` for a reply it cannot attribute to a partition, and a server keeps an invalid id as received.
    """

    client_id: Any  # as received: it may be the invalid part
    reason: str


class Diverged(Rejection):
    """A rejection because the client's own training diverged (non-finite values): the client kept its previous
    personal state. The typed flag behind ``RoundRecord.diverged``."""

    __slots__ = ()


def rejection_order(r: Rejection) -> Tuple[bool, Any]:
    """Sort key of rejections: partition ids ascending, then the unattributed ones (``"node <id>"``) by text."""
    return (not isinstance(r.client_id, int), r.client_id if isinstance(r.client_id, int) else str(r.client_id))


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

    def reply(self, client_id: int, round: Optional[int] = None) -> Reply:
        """This result as the server's :class:`Reply` (the upload, weighted by ``num_examples``, stamped with
        ``round``)."""
        return Reply(client_id, self.upload, self.num_examples, round)

    def diverged(self) -> Optional[str]:
        """Why this result must not count (a key of its upload or personal state holds NaN/Inf), or ``None``. The
        client then keeps its previous personal state and its upload is refused (:class:`Diverged`)."""
        for name, state in (("upload", self.upload), ("personal state", self.personal)):
            for k, v in state.items():
                if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
                    return (f"local training diverged: its {name}[{k!r}] holds non-finite values; the upload is "
                            "refused and the client keeps its previous personal state")
        return None


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
        train_loss: ``{client: mean training loss}`` of the clients whose reply the server accepted (a rejected
            client's loss is not there: it did not enter the round).
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
        absent: sampled clients with no live node this round (Flower: the node left and has not come back).
        rejoined: clients whose node came back under a new node id and was registered again at this round's start.
        restarted_without_state: rejoined clients whose node had lost its personal state (they continue from the
            initial personal values).
        diverged: clients whose local training produced non-finite values: their upload is refused and they keep
            their previous personal state.
        (The last four appear in :meth:`as_dict` only when non-empty.)
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
    absent: List[int] = field(default_factory=list)
    rejoined: List[int] = field(default_factory=list)
    restarted_without_state: List[int] = field(default_factory=list)
    diverged: List[int] = field(default_factory=list)

    @property
    def mean(self) -> Optional[float]:
        """The mean deployed accuracy over the evaluated clients (``None`` without any)."""
        got = [a for a in (self.deployed or []) if a is not None]
        return sum(got) / len(got) if got else None

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
            **{k: list(getattr(self, k)) for k in ("absent", "rejoined", "restarted_without_state", "diverged")
               if getattr(self, k)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        """The inverse of :meth:`as_dict` (a line of the round log, a checkpoint's history): ``as_dict`` of the result
        equals ``d``."""
        def ints(m: Mapping[str, Any]) -> Dict[int, Any]:
            return {int(k): v for k, v in m.items()}

        def rejections(items: List[Mapping[str, Any]]) -> List[Rejection]:
            return [Rejection(r["client_id"], r["reason"]) for r in items]

        return cls(
            round=int(d["round"]), participants=list(d["participants"]), train_loss=ints(d.get("train_loss", {})),
            after_local=ints(d.get("after_local", {})), deployed=d.get("deployed"),
            server=ServerReport(accepted=list(d.get("accepted", [])), rejected=rejections(d.get("rejected", [])),
                                diagnostics=dict(d.get("diagnostics", {})), updated=bool(d.get("updated", False))),
            upload_bytes=ints(d.get("upload_bytes", {})), without_personal=list(d.get("without_personal", [])),
            eval_dropped=rejections(d.get("eval_dropped", [])), wall_s=d.get("wall_s"),
            absent=list(d.get("absent", [])), rejoined=list(d.get("rejoined", [])),
            restarted_without_state=list(d.get("restarted_without_state", [])), diverged=list(d.get("diverged", [])),
        )


def diverged(result: ClientResult) -> Optional[str]:
    """``result.diverged()``: why a client's own round must not count, or ``None``."""
    return result.diverged()
