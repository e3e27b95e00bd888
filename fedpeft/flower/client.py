"""The client side: a Flower ``ClientApp`` that runs one fedpeft protocol on each node.

    app = client_app(method, build_model, load_data, trainer=LocalTrainer(epochs=2, lr=5e-3))

Every message builds the model afresh with ``build_model(context)`` (Flower may serve many nodes from one process, and
the deployment engine starts a fresh process per message, so nothing is cached between calls) and then loads, by key:

- the shared state from the message (``"arrays"``, float32 on the wire, cast back to the model's dtypes), and
- the node's personal state, or the model's initial values the first time: from the node's disk when it has a
  state folder (``node_config["state-dir"]`` or ``state_dir=``; one safetensors file per (run, partition), so a
  restarted SuperNode continues), else from Flower's in-memory ``context.state`` (:mod:`.durable`).

Handlers (the message types fedpeft's strategies send):

``query``     registration: the node's ``partition-id`` (from ``node_config``), its number of training examples and a
              fingerprint of its frozen parameters (so a server can refuse a node whose frozen backbone differs).
``train``     ``method.client_update``; replies with exactly ``method.upload_keys(model)`` (the shared trainable part,
              pFedPG's trained prompts P̃) under ``"arrays"`` and ``num-examples``/``partition-id``/``loss`` (and
              ``accuracy`` right after local training) and the ``round`` it trained under ``"metrics"``; the personal
              part is stored stamped with the round, never sent. A client whose training diverges (non-finite values)
              stores nothing and replies ``diverged`` without arrays. One message per round: when the message also
              carries ``"fedpeft.deploy"`` (the previous round's deployment), the node first evaluates that
              deployment exactly as ``evaluate`` would (model state, requires_grad flags and torch's RNG restored
              afterwards, so training is unchanged) and adds the result to the reply under ``"evaluation"``.
``evaluate``  ``method.deploy`` (the shared state the server sends + the personal state), then the accuracy on the
              node's test data: ``accuracy``, ``num-examples``, ``partition-id``, ``has-personal`` (0 before the node
              has trained once), ``personal-round``.

A message for a round older than the node's stored personal state is refused (an error reply; the state is
untouched): a late message never rolls newer personal state back (without a state folder a repeated round is refused
too; with one it is redone from the state that round started from, as after a server resume). A message without a
config or round, with a negative round, or with non-finite or integer arrays for floating parameters is refused. See
docs/flower.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from .. import fed
from ..protocols import Protocol
from ..protocols import get as get_protocol
from ..protocols.resume import diverged
from ..protocols.training import evaluate as plain_evaluate
from .cache import NodeCache
from .durable import check_download, message_round, personal_store
from .node import partition
from .records import (  # noqa: F401
    ARRAYS,
    CONFIG,
    DEPLOY,
    EVAL_ROUND,
    EVALUATION,
    INFO,
    METHOD,
    METRICS,
    ROUND,
    SEED,
    from_record,
    payload_bytes,
    to_record,
)

__all__ = ["ClientHandlers", "client_app", "frozen_fingerprint"]

#: ``build_model(context) -> nn.Module``: the client's wrapped model, built the same way on every node
BuildModel = Callable[[Context], nn.Module]
#: ``load_data(context) -> (train_data, test_data)``; ``test_data`` may be ``None`` (no evaluation)
LoadData = Callable[[Context], Tuple[Any, Any]]


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of ``model``'s frozen state (every state-dict entry that is
    not a trainable parameter), in sorted key order: equal on two nodes iff their frozen backbones are equal."""
    trainable = set(fed.trainable_keys(model))
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        if k in trainable:
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ClientHandlers:
    """The three handlers of :func:`client_app` for one protocol (use them to build a ClientApp of your own).

    Args:
        method: the protocol (``fedpeft.protocols``), e.g. ``SharedPersonal(["fedvpt"])``, or a method name
            (``fedpeft.protocols.METHODS``, default options).
        build_model: ``build_model(context) -> model``; must build the same model (same initial values) every call.
        load_data: ``load_data(context) -> (train_data, test_data)`` for this node.
        trainer: the local training callable (default: the protocol's default :class:`LocalTrainer`).
        evaluate: ``evaluate(model, test_data) -> accuracy``; default ``trainer.evaluate`` if it has one, else
            :func:`fedpeft.protocols.training.evaluate`.
        threads: ``torch.set_num_threads`` for each call (``None``: leave torch's setting).
        after_local_eval: also measure the accuracy right after local training on the test data (the reply's
            ``accuracy`` metric), as the in-process engine does.
        state_dir: the node's state folder for durable personal state when ``node_config`` has no ``state-dir``
            (:mod:`.durable`; ``None``: Flower's in-memory ``context.state``).
        cache: reuse the node's data and frozen-state hash from ``<state-dir>/cache`` when the node has a state
            folder (:mod:`fedpeft.flower.cache`); no effect without one.
    """

    def __init__(
        self,
        method: Union[str, Protocol],
        build_model: BuildModel,
        load_data: LoadData,
        *,
        trainer: Optional[Callable] = None,
        evaluate: Optional[Callable[[nn.Module, Any], float]] = None,
        threads: Optional[int] = 1,
        after_local_eval: bool = True,
        state_dir: Union[str, Path, None] = None,
        cache: bool = True,
    ) -> None:
        if not isinstance(method, (str, Protocol)):
            raise TypeError(f"method must be a fedpeft.protocols.Protocol or a method name, got {type(method).__name__}")
        method = get_protocol(method)
        for name, fn in (("build_model", build_model), ("load_data", load_data)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable (context) -> ..., got {type(fn).__name__}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
        self.method, self.build_model, self.load_data = method, build_model, load_data
        self.trainer = trainer
        own = getattr(trainer, "evaluate", None)
        self.evaluate_fn = evaluate or (own if callable(own) else plain_evaluate)
        self.threads = threads
        self.after_local_eval = bool(after_local_eval)
        self.state_dir = state_dir
        self.cache = bool(cache)

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _setup(self, msg: Message, context: Context) -> Tuple[nn.Module, int, int, int]:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        cfg, round_, seed = message_round(msg)  # refuses a message without config, or with a negative round
        name = cfg.get(METHOD, self.method.name)
        if name != self.method.name:
            raise ValueError(f"this ClientApp runs {self.method.name!r}, the server asked for {name!r}")
        pid, _ = partition(context)
        model = self.build_model(context)
        return model, pid, round_, seed

    def _shared(self, msg: Message, model: nn.Module, key: str = ARRAYS) -> dict:
        params = dict(model.named_parameters(remove_duplicate=False))
        like = {k: params[k] for k in self.method.download_keys(model)}
        record = msg.content.array_records.get(key, ArrayRecord())
        shared = from_record(record, like=like)
        check_download(shared, like)  # NaN/Inf or integer arrays from the server are refused
        return shared

    def _store(self, msg: Message, context: Context, model: nn.Module, pid: int, fingerprint: Optional[str] = None):
        return personal_store(context, msg.content.config_records.get(CONFIG, ConfigRecord()),
                              method=self.method.name, partition=pid, like=self.method.initial_personal(model),
                              fingerprint=fingerprint or (lambda: frozen_fingerprint(model)),
                              state_dir=self.state_dir)

    def _cache(self, context: Context) -> Optional[NodeCache]:
        return NodeCache.of(context, fallback=self.state_dir) if self.cache else None

    def _data(self, context: Context) -> Tuple[Any, Any]:
        """``load_data(context)``, reused from ``<state-dir>/cache`` when the node has one (:mod:`.cache`)."""
        cache = self._cache(context)
        return self.load_data(context) if cache is None else cache.data(context, self.load_data)

    def _deployed(self, msg: Message, context: Context, model: nn.Module, pid: int, round_: int, seed: int,
                  key: str = ARRAYS, data: Optional[Tuple[Any, Any]] = None) -> MetricRecord:
        """Deploy the state under ``key`` with the node's personal state and measure it on the test data."""
        shared = self._shared(msg, model, key)
        personal, written = self._store(msg, context, model, pid).deployed()
        train, test = self._data(context) if data is None else data
        if test is None:
            raise ValueError(f"load_data() returned no test data for partition {pid}: nothing to evaluate")
        self.method.deploy(model, shared=shared, personal=personal, data=train, round=round_, client_id=pid,
                           seed=seed, trainer=self.trainer)
        acc = float(self.evaluate_fn(model, test))
        return MetricRecord({"accuracy": acc, "num-examples": len(test), "partition-id": pid,
                             "has-personal": int(personal is not None),
                             "personal-round": -1 if written is None else int(written)})

    def _evaluate_first(self, msg: Message, context: Context, model: nn.Module, pid: int, seed: int,
                        data: Tuple[Any, Any]) -> Optional[MetricRecord]:
        """One message per round: the previous round's deployment, evaluated before training when the message
        carries one; ``model``, its requires_grad flags and torch's RNG are left as they were."""
        if DEPLOY not in msg.content.array_records:
            return None
        cfg = msg.content.config_records.get(CONFIG, ConfigRecord())
        state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        flags = {k: p.requires_grad for k, p in model.named_parameters()}
        rng = torch.random.get_rng_state()
        try:
            return self._deployed(msg, context, model, pid, int(cfg.get(EVAL_ROUND, 0)), seed, key=DEPLOY,
                                  data=data)
        finally:
            model.load_state_dict(state)
            for k, p in model.named_parameters():
                p.requires_grad_(flags[k])
            torch.random.set_rng_state(rng)

    # ---- handlers -------------------------------------------------------------------------------------------------
    def query(self, msg: Message, context: Context) -> Message:
        """Registration: partition id, number of partitions, training examples, frozen-state fingerprint."""
        pid, num = partition(context)
        model = self.build_model(context)
        train, _ = self._data(context)
        metrics = MetricRecord({"partition-id": pid, "num-partitions": -1 if num is None else num,
                                "num-examples": len(train)})
        cache = self._cache(context)
        fingerprint = frozen_fingerprint(model) if cache is None else \
            cache.frozen_hash(context, self.build_model, model, frozen_fingerprint)
        store = self._store(msg, context, model, pid, fingerprint)
        stored = store.stored_round()
        metrics["personal-round"] = -1 if stored is None else stored  # -1: this node holds no personal state
        info = ConfigRecord({"method": self.method.name, "frozen-sha256": fingerprint,
                             "durable": int(store.durable)})
        return Message(RecordDict({METRICS: metrics, INFO: info}), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        """One round of local training (see the module docstring)."""
        model, pid, round_, seed = self._setup(msg, context)
        train, test = self._data(context)
        evaluation = self._evaluate_first(msg, context, model, pid, seed, (train, test))  # before this round's state
        store = self._store(msg, context, model, pid)
        personal = store.start(round_)  # refuses a stale round; a durable store redoes a repeated one
        shared = self._shared(msg, model)
        extra = {} if evaluation is None else {EVALUATION: evaluation}
        result = self.method.client_update(model, shared=shared, personal=personal, data=train, round=round_,
                                           client_id=pid, seed=seed, trainer=self.trainer,
                                           eval_data=test if self.after_local_eval else None)
        why = diverged(result)
        if why is not None:  # keep the previous personal state, send nothing trained, say why
            metrics = MetricRecord({"partition-id": pid, "round": round_, "diverged": 1,
                                    "num-examples": int(result.num_examples)})
            return Message(RecordDict({ARRAYS: ArrayRecord(), METRICS: metrics, INFO: ConfigRecord({"why": why}),
                                       **extra}), reply_to=msg)
        store.save(round_, result.personal)  # only after the work succeeded
        arrays = to_record(result.upload)
        metrics = {k: float(v) for k, v in result.metrics.items() if k != "num_examples"}
        metrics.update({"num-examples": int(result.num_examples), "partition-id": pid, "round": round_,
                        "upload-bytes": payload_bytes(arrays)})
        return Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics), **extra}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """The deployed model's accuracy on the node's test data (nothing is written to ``context.state``)."""
        model, pid, round_, seed = self._setup(msg, context)
        return Message(RecordDict({METRICS: self._deployed(msg, context, model, pid, round_, seed)}), reply_to=msg)


def client_app(
    method: Union[str, Protocol],
    build_model: BuildModel,
    load_data: LoadData,
    *,
    trainer: Optional[Callable] = None,
    evaluate: Optional[Callable[[nn.Module, Any], float]] = None,
    threads: Optional[int] = 1,
    after_local_eval: bool = True,
    state_dir: Union[str, Path, None] = None,
    cache: bool = True,
) -> ClientApp:
    """A Flower ``ClientApp`` running ``method`` on every node (arguments: :class:`ClientHandlers`)."""
    handlers = ClientHandlers(method, build_model, load_data, trainer=trainer, evaluate=evaluate, threads=threads,
                              after_local_eval=after_local_eval, state_dir=state_dir, cache=cache)
    app = ClientApp()
    app.query()(handlers.query)
    app.train()(handlers.train)
    app.evaluate()(handlers.evaluate)
    return app
