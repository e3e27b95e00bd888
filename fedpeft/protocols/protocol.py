"""The ``Protocol`` interface: what a client loads, trains, uploads and keeps, and which server answers it.

A protocol never holds a model or a client's state: every call gets the model and returns plain dicts of tensors, so
one protocol object serves any number of clients, on any engine (the in-process loop, a Flower ClientApp that builds
the model fresh on every message). Per round and client::

    model ← load(shared from the server, personal from the client's own store, or the model's initial values)
    for phase, keys, epochs in protocol.phases(model):            # one "local" phase, or FedRep's head then body
        trainer(model, data, LocalTask(...)) with only `keys` trainable
    upload   = trainable_state(model)[upload_keys]                # leaves the client
    personal = trainable_state(model)[personal_keys]              # stays on the client, never sent

Key sets, all subsets of ``fed.trainable_keys(model)`` (frozen parameters and buffers never travel):

- ``personal_keys(model)``: stays on the client, never sent (e.g. the head).
- ``upload_keys(model)``: the trainable rest, sent every round (pFedPG: the trained prompts P̃;
  Local/SingleSet-VPT: nothing). ``personal_keys ∪ upload_keys = trainable_keys``, disjoint.
- ``download_keys(model)``: what the server sends (the same keys as the upload for every method here; for pFedPG
  the values are the client's own generated prompts).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from .. import fed
from .._checks import check_state, format_keys
from .privacy import Privacy, clip_upload
from .records import ClientResult
from .server import Server
from .training import LocalTask, LocalTrainer, LossFn, Trainer, batch_seed, cross_entropy_loss, evaluate

__all__ = ["Phase", "Protocol"]

#: ``(phase name, trainable keys in this phase, epochs or None = the trainer's)``
Phase = Tuple[str, Tuple[str, ...], Optional[int]]


def _subset(state: Mapping[str, Tensor], keys: Sequence[str]) -> Dict[str, Tensor]:
    return {k: state[k] for k in keys}


@contextmanager
def _only_trainable(model: nn.Module, keys: Sequence[str]) -> Iterator[None]:
    """Within the block, of the currently trainable parameters only ``keys`` keep ``requires_grad=True``."""
    keep = set(keys)
    touched = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad and n not in keep]
    try:
        for _, p in touched:
            p.requires_grad_(False)
        yield
    finally:
        for _, p in touched:
            p.requires_grad_(True)


def _loss_of(out: Any) -> Dict[str, float]:
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise ValueError(f"a trainer returning a mapping must include 'loss', got keys {sorted(out)}")
        return {str(k): float(v) for k, v in out.items()}
    return {"loss": float(out)}


class Protocol:
    """Base of every method's federated protocol (see the module docstring); subclasses define the key split.

    Subclasses implement :meth:`personal_keys` and :meth:`make_server`, and may override :meth:`phases`
    (multi-phase local training) and :meth:`deploy` (e.g. FedAvg-FT's local fine-tuning).

    Args:
        name: a label for logs and reports.
        loss_fn: the local objective ``(model, x, y) -> scalar`` handed to the trainer as ``task.loss_fn``
            (default: cross-entropy on ``model(x)``).
    """

    def __init__(self, *, name: str, loss_fn: Optional[LossFn] = None) -> None:
        self.name = name
        self.loss_fn: LossFn = loss_fn or cross_entropy_loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # ---- keys --------------------------------------------------------------------------------------------------

    def personal_keys(self, model: nn.Module) -> List[str]:
        """Sorted trainable keys that stay on the client and are never sent."""
        raise NotImplementedError

    def upload_keys(self, model: nn.Module) -> List[str]:
        """Sorted trainable keys that leave the client every round (``trainable_keys − personal_keys``)."""
        personal = set(self.personal_keys(model))
        return [k for k in fed.trainable_keys(model) if k not in personal]

    def download_keys(self, model: nn.Module) -> List[str]:
        """Sorted keys the server sends each round (the upload's keys for every method in fedpeft)."""
        return self.upload_keys(model)

    def initial_personal(self, model: nn.Module) -> Dict[str, Tensor]:
        """Detached copies of ``model``'s current personal values (a freshly built model: the initial ones)."""
        return _subset(fed.trainable_state(model), self.personal_keys(model))

    def initial_shared(self, model: nn.Module) -> Dict[str, Tensor]:
        """Detached copies of ``model``'s current values of the download keys (the server's starting point)."""
        return _subset(fed.trainable_state(model), self.download_keys(model))

    def phases(self, model: nn.Module) -> List[Phase]:
        """The local training phases: by default one ``"local"`` phase over every trainable key."""
        return [("local", tuple(fed.trainable_keys(model)), None)]

    # ---- client ------------------------------------------------------------------------------------------------

    def load(self, model: nn.Module, shared: Mapping[str, Tensor], personal: Optional[Mapping[str, Tensor]]) -> None:
        """Load the server's ``shared`` state and the client's ``personal`` state (``None``: keep the model's).

        Raises:
            ValueError: ``shared`` does not have exactly :meth:`download_keys`, ``personal`` not exactly
                :meth:`personal_keys`, or a shape differs from the model's; the model is untouched then.
        """
        params = dict(model.named_parameters(remove_duplicate=False))
        want_shared = self.download_keys(model)
        check_state(shared, like={k: params[k] for k in want_shared}, name="shared")
        merged = dict(shared)
        if personal is not None:
            check_state(personal, like={k: params[k] for k in self.personal_keys(model)}, name="personal")
            merged = fed.merge(shared, personal)
        _, unexpected = model.load_state_dict(merged, strict=False)
        if unexpected:  # cannot happen after the checks above; kept as a guard for exotic modules
            raise ValueError(f"{self.name}: keys the model does not have: {format_keys(unexpected)}")

    def train(self, model: nn.Module, data: Any, *, round: int, client_id: int, seed: int = 0,
              trainer: Optional[Trainer] = None, phases: Optional[List[Phase]] = None) -> Dict[str, float]:
        """Run the training ``phases`` (default :meth:`phases`) with ``trainer``; returns the loss metrics."""
        trainer = trainer or LocalTrainer()
        metrics: Dict[str, float] = {}
        phases = self.phases(model) if phases is None else phases
        for phase, keys, epochs in phases:
            task = LocalTask(client_id=client_id, round=round, seed=seed, phase=phase,
                             batch_seed=batch_seed(seed, round, client_id, phase), keys=tuple(keys),
                             loss_fn=self.loss_fn, epochs=epochs)
            with _only_trainable(model, keys):
                out = _loss_of(trainer(model, data, task))
            metrics.update(out if len(phases) == 1 else {**out, **{f"{k}_{phase}": v for k, v in out.items()}})
        return metrics

    def client_update(
        self,
        model: nn.Module,
        *,
        shared: Mapping[str, Tensor],
        personal: Optional[Mapping[str, Tensor]],
        data: Any,
        round: int,
        client_id: int,
        seed: int = 0,
        trainer: Optional[Trainer] = None,
        eval_data: Any = None,
        num_examples: Optional[int] = None,
        clip_norm: Optional[float] = None,
    ) -> ClientResult:
        """One client's round: load, train, return the upload and the new personal state.

        Args:
            model: the client's model (built fresh, or reused: every trainable key is loaded before training).
            shared: what the server sent this client (:meth:`Server.payloads`), keys :meth:`download_keys`.
            personal: the client's own state from its last round, or ``None`` for the model's initial values.
            data: the client's training data, handed to ``trainer`` as is.
            round, client_id, seed: identify the work; they seed the batch order (:func:`batch_seed`).
            trainer: ``trainer(model, data, task)`` (see :mod:`fedpeft.protocols.training`);
                default :class:`LocalTrainer` ``()``.
            eval_data: if given, ``metrics["accuracy"]`` is the accuracy of the model right after local training
                (``trainer.evaluate(model, eval_data)`` when the trainer has it, else :func:`evaluate`).
            num_examples: the aggregation weight; default ``len(data)``.
            clip_norm: under user-level DP (``server.client_clip_norm``), the update ``upload − shared`` is clipped
                to this L2 norm over all uploaded tensors jointly before it leaves the client
                (:func:`~fedpeft.protocols.privacy.clip_upload`); the personal state keeps the unclipped values.

        Returns:
            :class:`ClientResult` with ``upload`` (keys :meth:`upload_keys`), ``num_examples``, ``personal`` (keys
            :meth:`personal_keys`) and ``metrics``.
        """
        if num_examples is None:
            try:
                num_examples = len(data)
            except TypeError as e:
                raise TypeError(f"data has no len(); pass num_examples= ({e})") from None
        self.load(model, shared, personal)
        metrics = self.train(model, data, round=round, client_id=client_id, seed=seed, trainer=trainer)
        state = fed.trainable_state(model)  # detached copies
        upload, new_personal = _subset(state, self.upload_keys(model)), _subset(state, self.personal_keys(model))
        if clip_norm is not None:
            upload = clip_upload(upload, shared, clip_norm)
        metrics["num_examples"] = float(num_examples)
        if eval_data is not None:
            metrics["accuracy"] = _evaluator(trainer)(model, eval_data)
        return ClientResult(upload=upload, num_examples=int(num_examples), personal=new_personal, metrics=metrics)

    def deploy(
        self,
        model: nn.Module,
        *,
        shared: Mapping[str, Tensor],
        personal: Optional[Mapping[str, Tensor]],
        data: Any = None,
        round: int = 0,
        client_id: int = 0,
        seed: int = 0,
        trainer: Optional[Trainer] = None,
    ) -> None:
        """Put the client's *deployed* model into ``model``: the latest shared state (:meth:`Server.deployment`)
        merged with its personal state, then the :meth:`deploy_phases` of local training, if any (FedAvg-FT's
        fine-tuning: ``data`` is required then)."""
        self.load(model, shared, personal)
        phases = self.deploy_phases(model)
        if phases:
            if data is None:
                raise ValueError(f"{self.name}'s deployed model is trained locally ({[p[0] for p in phases]}): "
                                 "deploy() needs the client's data=")
            self.train(model, data, round=round, client_id=client_id, seed=seed, trainer=trainer, phases=phases)

    def deploy_phases(self, model: nn.Module) -> List[Phase]:
        """Local training that makes the deployed model from the loaded one (default none; FedAvg-FT fine-tunes).
        Engines and cost models read it: every evaluation of a deployed model runs these phases first."""
        return []

    # ---- server ------------------------------------------------------------------------------------------------

    def make_server(self, model: nn.Module, *, num_clients: Optional[int] = None, seed: Optional[int] = None,
                    privacy: Optional[Privacy] = None) -> Server:
        """The server for this protocol, initialised from ``model`` (a model built like the clients').

        One signature for every protocol: ``num_clients`` C (client ids lie in ``[0, C)``; required by pFedPG),
        ``seed`` for a server that draws random values (pFedPG's generator, the DP noise; ``None``: the global
        RNG), ``privacy`` for user-level DP (:class:`~fedpeft.protocols.Privacy`; docs/privacy.md)."""
        raise NotImplementedError


def _evaluator(trainer: Optional[Trainer]):
    own = getattr(trainer, "evaluate", None) if trainer is not None else LocalTrainer().evaluate
    return own if callable(own) else evaluate
