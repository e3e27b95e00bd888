"""The client side: a Flower ``ClientApp`` that runs one fedpeft protocol on each node.

    app = client_app(method, build_model, load_data, trainer=LocalTrainer(epochs=2, lr=5e-3))

Every message builds the model with ``build_model(context)`` and loads, by key, the shared state from the message and
the node's personal state (:mod:`.node_store`: a state file with a ``state-dir``, else ``context.state``). Handlers:
``query`` (registration: partition, training examples, frozen-backbone hash, stored round), ``train`` (evaluate the
previous round's deployment when the message carries one, then ``method.client_update``; replies with exactly the
upload keys; a diverged client stores nothing) and ``evaluate`` (``method.deploy``, then the accuracy). A stale round,
a message without config or round, or non-finite/integer arrays are refused with an error reply, the state untouched.
See docs/flower.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from .. import fed
from ..protocols import Protocol
from ..protocols import get as get_protocol
from ..protocols.node_cache import NodeCache
from ..protocols.screening import check_download
from ..protocols.training import evaluate as plain_evaluate
from ..protocols.training import kept
from . import wire
from .node_store import MemoryStore, Store, cache_for, store_for

__all__ = ["ClientHandlers", "client_app"]

#: ``build_model(context) -> nn.Module``: the client's wrapped model, built the same way on every node
BuildModel = Callable[[Context], nn.Module]
#: ``load_data(context) -> (train_data, test_data)``; ``test_data`` may be ``None`` (no evaluation)
LoadData = Callable[[Context], Tuple[Any, Any]]


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
            (:mod:`.node_store`; ``None``: Flower's in-memory ``context.state``).
        cache: reuse the node's data and frozen-state hash from ``<state-dir>/cache`` when the node has a state
            folder (:class:`~fedpeft.protocols.node_cache.NodeCache`); no effect without one.
    """

    def __init__(self, method: Union[str, Protocol], build_model: BuildModel, load_data: LoadData, *,
                 trainer: Optional[Callable] = None, evaluate: Optional[Callable[[nn.Module, Any], float]] = None,
                 threads: Optional[int] = 1, after_local_eval: bool = True, state_dir: Union[str, Path, None] = None,
                 cache: bool = True) -> None:
        method = get_protocol(method)  # TypeError for anything but a name or a Protocol
        for name, fn in (("build_model", build_model), ("load_data", load_data)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable (context) -> ..., got {type(fn).__name__}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
        self.method, self.build_model, self.load_data, self.trainer = method, build_model, load_data, trainer
        own = getattr(trainer, "evaluate", None)
        self.evaluate_fn = evaluate or (own if callable(own) else plain_evaluate)
        self.threads, self.after_local_eval = threads, bool(after_local_eval)
        self.state_dir, self.cache = state_dir, bool(cache)

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _cache(self, context: Context) -> Optional[NodeCache]:
        return cache_for(context, self.state_dir) if self.cache else None

    def _data(self, context: Context) -> Tuple[Any, Any]:
        """``load_data(context)``, reused from ``<state-dir>/cache`` when the node has one."""
        cache = self._cache(context)
        return self.load_data(context) if cache is None else cache.data(context, self.load_data)

    def _fingerprint(self, context: Context, model: nn.Module) -> str:
        """The frozen backbone's hash: from the node cache when there is one, else computed (once per message)."""
        cache = self._cache(context)
        return fed.frozen_fingerprint(model) if cache is None else cache.frozen_hash(context, self.build_model, model)

    def _store(self, context: Context, model: nn.Module, pid: int, run: Optional[str],
               fingerprint: Optional[str] = None) -> Store:
        return store_for(context, run=run, method=self.method.name, partition=pid, fallback=self.state_dir,
                         fingerprint=lambda: fingerprint or self._fingerprint(context, model))

    def _setup(self, msg: Message, context: Context) -> Tuple[nn.Module, int, wire.Task]:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        task = wire.read_task(msg)  # refuses a message without config, or with a negative round
        if (task.method or self.method.name) != self.method.name:
            raise ValueError(f"this ClientApp runs {self.method.name!r}, the server asked for {task.method!r}")
        return self.build_model(context), wire.partition(context)[0], task

    def _shared(self, msg: Message, model: nn.Module, key: str = wire.ARRAYS) -> Dict[str, Tensor]:
        params = dict(model.named_parameters(remove_duplicate=False))
        like = {k: params[k] for k in self.method.download_keys(model)}
        shared = wire.from_record(msg.content.array_records.get(key, ArrayRecord()), like=like)
        check_download(shared, like)  # NaN/Inf or integer arrays from the server are refused
        return shared

    def _deployed(self, msg: Message, model: nn.Module, pid: int, round_: int, seed: int, store: Store,
                  data: Tuple[Any, Any], key: str = wire.ARRAYS) -> MetricRecord:
        """Deploy the state under ``key`` with the node's personal state and measure it on the test data."""
        shared = self._shared(msg, model, key)
        personal, written = store.deployed_state(self.method.initial_personal(model), round_)
        train, test = data
        if test is None:
            raise ValueError(f"load_data() returned no test data for partition {pid}: nothing to evaluate")
        self.method.deploy(model, shared=shared, personal=personal, data=train, round=round_, client_id=pid,
                           seed=seed, trainer=self.trainer)
        return MetricRecord({"accuracy": float(self.evaluate_fn(model, test)), "num-examples": len(test),
                             "partition-id": pid, "has-personal": int(personal is not None),
                             "personal-round": -1 if written is None else int(written)})

    def _evaluate_first(self, msg: Message, model: nn.Module, pid: int, task: wire.Task, store: Store,
                        data: Tuple[Any, Any]) -> Optional[MetricRecord]:
        """One message per round: the attached deployment, evaluated before training; the model is then as it was
        (:func:`~fedpeft.protocols.training.kept`: trainable parameters, buffers, flags and RNG)."""
        if wire.DEPLOY not in msg.content.array_records:
            return None
        with kept(model):
            return self._deployed(msg, model, pid, int(task.config.get(wire.EVAL_ROUND, 0)), task.seed, store, data,
                                  key=wire.DEPLOY)

    # ---- handlers -------------------------------------------------------------------------------------------------
    def query(self, msg: Message, context: Context) -> Message:
        """Registration: partition id, number of partitions, training examples, frozen-state fingerprint."""
        pid, num = wire.partition(context)
        model = self.build_model(context)
        train, _ = self._data(context)
        fingerprint = self._fingerprint(context, model)
        store = self._store(context, model, pid, wire.read_run(msg), fingerprint)
        stored = store.stored_round()
        metrics = MetricRecord({"partition-id": pid, "num-partitions": -1 if num is None else num,
                                "num-examples": len(train), "personal-round": -1 if stored is None else stored})
        info = ConfigRecord({"method": self.method.name, "frozen-sha256": fingerprint,
                             "durable": int(not isinstance(store, MemoryStore))})
        return Message(RecordDict({wire.METRICS: metrics, wire.INFO: info}), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        """One round of local training (see the module docstring)."""
        model, pid, task = self._setup(msg, context)
        data = self._data(context)
        store = self._store(context, model, pid, task.run)  # one store, one hash, one file read per message
        evaluation = self._evaluate_first(msg, model, pid, task, store, data)  # before this round's state
        like = self.method.initial_personal(model)
        personal = store.start_state(task.round, like)[0]  # refuses a stale round; a state file redoes a repeated one
        extra = {} if evaluation is None else {wire.EVALUATION: evaluation}
        result = self.method.client_update(model, shared=self._shared(msg, model), personal=personal, data=data[0],
                                           round=task.round, client_id=pid, seed=task.seed, trainer=self.trainer,
                                           eval_data=data[1] if self.after_local_eval else None)
        why = result.diverged()
        if why is not None:  # keep the previous personal state, send nothing trained, say why
            metrics = MetricRecord({"partition-id": pid, "round": task.round, "diverged": 1,
                                    "num-examples": int(result.num_examples)})
            return Message(RecordDict({wire.ARRAYS: ArrayRecord(), wire.METRICS: metrics,
                                       wire.INFO: ConfigRecord({"why": why}), **extra}), reply_to=msg)
        store.save(task.round, result.personal, like)  # only after the work succeeded
        arrays = wire.to_record(result.upload)
        metrics = {k: float(v) for k, v in result.metrics.items() if k != "num_examples"}
        metrics.update({"num-examples": int(result.num_examples), "partition-id": pid, "round": task.round,
                        "upload-bytes": wire.payload_bytes(arrays)})
        return Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord(metrics), **extra}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """The deployed model's accuracy on the node's test data (nothing is written)."""
        model, pid, task = self._setup(msg, context)
        store = self._store(context, model, pid, task.run)
        metrics = self._deployed(msg, model, pid, task.round, task.seed, store, self._data(context))
        return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)


def client_app(method: Union[str, Protocol], build_model: BuildModel, load_data: LoadData, *,
               trainer: Optional[Callable] = None, evaluate: Optional[Callable[[nn.Module, Any], float]] = None,
               threads: Optional[int] = 1, after_local_eval: bool = True, state_dir: Union[str, Path, None] = None,
               cache: bool = True) -> ClientApp:
    """A Flower ``ClientApp`` running ``method`` on every node (arguments: :class:`ClientHandlers`)."""
    handlers = ClientHandlers(method, build_model, load_data, trainer=trainer, evaluate=evaluate, threads=threads,
                              after_local_eval=after_local_eval, state_dir=state_dir, cache=cache)
    app = ClientApp()
    app.query()(handlers.query)
    app.train()(handlers.train)
    app.evaluate()(handlers.evaluate)
    return app
