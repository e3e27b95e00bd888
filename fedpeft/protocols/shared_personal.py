"""Partial personalization: a personal part kept by each client, the shared rest averaged by the server (FedAvg).

``SharedPersonal(patterns)`` splits a model's *trainable* parameters with ``fed.personal_keys(model, patterns)``:
matched keys are personal (never sent), the rest is uploaded every round and averaged, weighted by the clients'
example counts (McMahan et al., 2017)::

    shared_{t+1}[k] = Σ_{n ∈ accepted} w_n · upload_n[k] / Σ_{n ∈ accepted} w_n

The paper methods are presets of it (``fedavg``, ``fedvpt``, ``fedperfix``, ``fedpgp``, ``vanilla_attention``, ``*``
for no sharing at all, ``fedrep``), and a user picks any split for their own model, e.g.
``SharedPersonal(["head", "*blocks.11.*"])``. With ``personal_first=True`` each local round trains the personal
part first, then the shared part (FedRep, Collins et al., 2021: head epochs, then body epochs);
:class:`FedAvgFT` deploys the global model fine-tuned on each client.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from .. import fed
from .._checks import check_positive_int, check_state
from .protocol import Phase, Protocol
from .records import ServerReport
from .screening import check_max_weight, screen_replies
from .training import LossFn

__all__ = ["AveragingServer", "FedAvgFT", "SharedPersonal"]


def _check_ids(client_ids: Iterable[int], num_clients: Optional[int]) -> List[int]:
    ids = list(client_ids)
    for cid in ids:
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise TypeError(f"client ids must be ints, got {type(cid).__name__} {cid!r}")
        if num_clients is not None and not 0 <= cid < num_clients:
            raise ValueError(f"client id {cid} is outside [0, {num_clients})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"client ids must be distinct, got {ids}")
    return ids


class AveragingServer:
    """FedAvg over the shared keys: every client gets the same shared state; replies are averaged.

    Args:
        initial: the starting shared state (``protocol.initial_shared(model)``); its keys, shapes and dtypes are
            what every upload must have. ``{}`` (nothing shared: Local, SingleSet-VPT) accepts only empty uploads.
        num_clients: if given, client ids must lie in ``[0, num_clients)``.

    ``update`` screens the replies (:func:`~fedpeft.protocols.screening.screen_replies`), then streams the accepted
    ones through ``fed.Averager`` in client-id order; with no accepted reply the shared state stays as it was. Once
    :meth:`payloads` has opened a round, ``update`` accepts only the clients it was sent to, and refuses every reply
    when no round is in flight (its round closed), as ``PFedPGServer`` does; a server never asked for payloads (a
    sub-server fed replies directly) screens every call as a round of its own.
    """

    def __init__(self, initial: Mapping[str, Tensor], *, num_clients: Optional[int] = None,
                 max_weight: Optional[float] = None) -> None:
        check_state(initial, name="initial")
        self.num_clients = None if num_clients is None else check_positive_int("num_clients", num_clients)
        self.max_weight = check_max_weight(max_weight)
        self._shared: Dict[str, Tensor] = {k: v.detach().clone() for k, v in initial.items()}
        self.round = 0  # update() calls so far
        self._in_flight: Optional[List[int]] = None  # the ids payloads() sent this round; None: no round open
        self._driven = False  # payloads() was called at least once: update() then needs a round in flight

    @property
    def shared(self) -> Dict[str, Tensor]:
        """The current shared state (the server's own tensors: do not modify them in place)."""
        return self._shared

    @property
    def expected_upload(self) -> Dict[str, Tensor]:
        """Keys, shapes and dtypes every upload must have (the current shared state)."""
        return self._shared

    @property
    def own_params(self) -> int:
        """0: an averaging server trains no parameters of its own."""
        return 0

    def payloads(self, client_ids: Iterable[int]) -> Dict[int, Dict[str, Tensor]]:
        """``{client_id: shared state}`` for this round's clients (one dict, the same for all of them); opens the
        round, or adds the clients to the round in flight."""
        out = {cid: self._shared for cid in _check_ids(client_ids, self.num_clients)}
        self._in_flight, self._driven = sorted(set(self._in_flight or ()) | set(out)), True
        return out

    def deployment(self, client_ids: Iterable[int]) -> Dict[int, Dict[str, Tensor]]:
        """What each client deploys with: the latest shared state (no side effect)."""
        return {cid: self._shared for cid in _check_ids(client_ids, self.num_clients)}

    def update(self, replies: Iterable[Any]) -> ServerReport:
        """Screen ``replies`` (``(client_id, upload, weight)``) and average the accepted ones into the shared state."""
        if self._driven and self._in_flight is None:  # its round closed: refuse everything, change nothing
            return ServerReport(rejected=screen_replies(replies, self._shared, num_clients=self.num_clients,
                                                        allowed=(), round=self.round, max_weight=self.max_weight)[1])
        accepted, rejected = screen_replies(replies, self._shared, num_clients=self.num_clients, round=self.round,
                                            allowed=self._in_flight, max_weight=self.max_weight)
        self.round, self._in_flight = self.round + 1, None
        report = ServerReport(accepted=[r.client_id for r in accepted], rejected=rejected)
        report.diagnostics["total_weight"] = float(sum(r.weight for r in accepted))
        if accepted and self._shared:
            acc = fed.Averager()
            for r in accepted:
                acc.add(r.upload, weight=r.weight)
            self._shared = acc.result()
            report.updated = True
        return report

    def state_dict(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """``({"shared.<key>": tensor}, {"kind": "averaging", "round": r})`` (see :mod:`.server`)."""
        tensors = {f"shared.{k}": v.detach().to("cpu").clone().contiguous() for k, v in self._shared.items()}
        return tensors, {"kind": "averaging", "round": self.round}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ``ValueError`` (server untouched) on another kind, keys or shapes."""
        if not isinstance(meta, Mapping) or meta.get("kind") != "averaging":
            raise ValueError(f"meta: expected an averaging server's checkpoint, got kind "
                             f"{meta.get('kind') if isinstance(meta, Mapping) else type(meta).__name__!r}")
        round_ = meta.get("round")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise ValueError(f"meta['round'] must be an int >= 0, got {round_!r}")
        state = {k[len("shared."):] if k.startswith("shared.") else k: v for k, v in tensors.items()}
        check_state(state, like=self._shared, finite=True, name="tensors")
        for k, v in state.items():
            if v.dtype != self._shared[k].dtype:
                raise ValueError(f"tensors['shared.{k}']: expected dtype {self._shared[k].dtype}, got {v.dtype}")
        self._shared = {k: v.detach().to(self._shared[k].device).clone() for k, v in state.items()}
        self.round, self._in_flight = round_, None


class SharedPersonal(Protocol):
    """Personal keys by pattern, the shared trainable rest averaged (see the module docstring).

    Args:
        patterns: ``fed.personal_keys`` patterns (globs, words, presets), resolved on the *trainable* parameters.
        name: a label (default: the patterns).
        loss_fn: the local objective (default cross-entropy), e.g. :func:`~fedpeft.protocols.fedpgp_loss`.
        personal_first: train the personal keys first, then the shared ones, in two phases (FedRep).
        personal_epochs, shared_epochs: the epochs of each phase when ``personal_first`` (``None``: the trainer's).
    """

    def __init__(
        self,
        patterns: Union[str, Sequence[str]],
        *,
        name: Optional[str] = None,
        loss_fn: Optional[LossFn] = None,
        personal_first: bool = False,
        personal_epochs: Optional[int] = None,
        shared_epochs: Optional[int] = None,
    ) -> None:
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        for p in self.patterns:
            if not isinstance(p, str):
                raise TypeError(f"patterns must be str, got {type(p).__name__} {p!r}")
        super().__init__(name=name or f"SharedPersonal({self.patterns})", loss_fn=loss_fn)
        if not isinstance(personal_first, bool):
            raise TypeError(f"personal_first must be a bool, got {personal_first!r}")
        self.personal_first = personal_first
        self.personal_epochs = None if personal_epochs is None else check_positive_int("personal_epochs",
                                                                                       personal_epochs)
        self.shared_epochs = None if shared_epochs is None else check_positive_int("shared_epochs", shared_epochs)

    def __repr__(self) -> str:
        extra = ", personal_first=True" if self.personal_first else ""
        return f"{type(self).__name__}({self.patterns!r}, name={self.name!r}{extra})"

    def personal_keys(self, model: nn.Module) -> List[str]:
        trainable = {k: p for k, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        return fed.personal_keys(trainable, self.patterns)

    def phases(self, model: nn.Module) -> List[Phase]:
        if not self.personal_first:
            return super().phases(model)
        return [("personal", tuple(self.personal_keys(model)), self.personal_epochs),
                ("shared", tuple(self.upload_keys(model)), self.shared_epochs)]

    def make_server(self, model: nn.Module, *, num_clients: Optional[int] = None,
                    seed: Optional[int] = None) -> AveragingServer:
        """An :class:`AveragingServer` starting from ``model``'s current shared values (``seed`` is accepted for the
        common signature; averaging draws nothing at random)."""
        return AveragingServer(self.initial_shared(model), num_clients=num_clients)


class FedAvgFT(SharedPersonal):
    """FedAvg-FT: FedAvg training; the deployed model is the latest global model fine-tuned on the client.

    Training and uploads are FedAvg's (everything shared, nothing personal). :meth:`deploy` loads the global model
    and trains it locally for ``finetune_epochs`` epochs (``None``: the trainer's), in the ``"finetune"`` phase (its
    own batch seed); that fine-tuned model is what the client uses and what is evaluated.
    """

    def __init__(self, *, name: str = "FedAvg-FT", finetune_epochs: Optional[int] = None,
                 loss_fn: Optional[LossFn] = None) -> None:
        super().__init__(["fedavg"], name=name, loss_fn=loss_fn)
        self.finetune_epochs = None if finetune_epochs is None else check_positive_int("finetune_epochs",
                                                                                       finetune_epochs)

    def deploy_phases(self, model: nn.Module) -> List[Phase]:
        """One ``"finetune"`` phase over every trainable key, ``finetune_epochs`` epochs."""
        return [("finetune", tuple(fed.trainable_keys(model)), self.finetune_epochs)]
