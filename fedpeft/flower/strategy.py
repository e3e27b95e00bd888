"""The Flower strategy that runs any fedpeft protocol's server: one message per node, replies read once, one record.

:class:`ProtocolStrategy` is a ``flwr.serverapp.strategy.Strategy`` around a protocol's server
(``protocol.make_server(model, num_clients=C, seed=server_seed)``, a :class:`~fedpeft.protocols.Server`). Per round r
(Flower counts from 1; the protocol's round index is r − 1, the in-process engine's)::

    register new nodes by partition id (once; Registry)            query messages
    S = sample_clients(C, fraction_train, seed, round=r−1)         seeded, ≥ 1 client; by partition id
    payloads = server.payloads(S)                                  one train message per node: its own arrays
    parse_reply(reply) → Reply | Rejection                         matched by reply_to_message_id (records.py)
    server.update(replies)                                         screens keys, shapes, dtypes, finite values, weight
    evaluate: server.deployment(E) to every node in E              per-client accuracy
    history.append(RoundRecord); round_log.append(RoundRecord)     the in-process engine's record, on disk

One message per node per round (``one_message=True``, what ``server_app`` uses): round r's evaluation travels with round r + 1's train
messages (a node in E ∩ S(r+1) gets its deployment next to its payload, evaluates it, then trains; a node in E only
gets an evaluate message in the same exchange); the last round's evaluation is an evaluate message of its own. The
deployment is taken before round r + 1's payloads, as the in-process engine does, so every number is the same;
round r's record is complete, and logged, when round r + 1's replies are in.

Everything a node sends is converted by key (``ArrayRecord``), float32 on the wire and cast back to the model's
dtypes. Replies are processed in partition-id order, so the aggregate is bit-identical to the in-process engine's.
FedAvg-like methods average the shared keys (``AveragingServer``: ``fed.Averager``); pFedPG holds its generator
(``PFedPGServer``): each node gets its own ``gen(n)``, ``fed.delta_backward`` runs on the accepted replies only.
:class:`PersonalizedFedAvg` and :class:`PFedPGStrategy` are the 0.1 names, kept as thin aliases.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor, nn

from ..protocols import (
    AveragingServer,
    PFedPGServer,
    Protocol,
    Rejection,
    Reply,
    RoundLog,
    RoundRecord,
    Server,
    ServerReport,
    load_checkpoint,
    sample_clients,
    save_checkpoint,
)
from ..protocols import get as get_protocol
from ..protocols.checkpoint import claim_folder
from ..protocols.screening import check_max_weight, screen_metric
from .client import frozen_fingerprint
from .durable import RUN
from .records import (
    ARRAYS,
    CONFIG,
    DEPLOY,
    DIVERGED,
    EVAL_ROUND,
    EVALUATION,
    METHOD,
    METRICS,
    ROUND,
    SEED,
    from_record,
    parse_evaluation,
    parse_reply,
    payload_bytes,
    to_record,
)
from .registry import Registry
from .resume import absent, cap_registered, restore_strategy, resumed_flags, strategy_checkpoint

__all__ = ["PFedPGStrategy", "PersonalizedFedAvg", "ProtocolStrategy"]

log = logging.getLogger("fedpeft.flower")


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _order(r: Rejection) -> Tuple[bool, Any]:
    return (not isinstance(r.client_id, int), r.client_id if isinstance(r.client_id, int) else str(r.client_id))


class ProtocolStrategy(Strategy):
    """Run ``method``'s server over Flower nodes (see the module docstring).

    Args:
        method: a protocol or a method name (``fedpeft.protocols.METHODS``).
        model: a model built exactly like the clients' (its frozen parameters are the reference every node must
            match; its initial values start the server).
        num_partitions: C, the number of clients (partition ids ``0 … C−1``).
        server: the protocol's server to use instead of ``method.make_server(model, num_clients=C, seed=server_seed)``.
        server_seed: seeds a server that draws random values (pFedPG's generator; ``None``: the global RNG, as the
            in-process engine).
        fraction_train: the share of clients trained per round, in (0, 1] (at least one client).
        fraction_evaluate: the share of clients evaluated per round (default every one).
        seed: the run's seed (sent to the clients: batch orders; client sampling).
        min_nodes: partitions to wait for before round 1 (default C).
        registration_timeout: seconds to wait for ``min_nodes`` nodes to connect and answer.
        check_frozen: refuse nodes whose frozen parameters differ from ``model``'s.
        on_round: called with each round's :class:`~fedpeft.protocols.RoundRecord` after its evaluation.
        round_log: a :class:`~fedpeft.protocols.RoundLog` or the path of a new one: every round's record is appended
            (one JSON line, atomic, fsync'ed; TensorBoard too when installed).
        checkpoint_dir: a folder for the server's checkpoint (:mod:`.resume`), rewritten after every round; if it
            holds one, :meth:`start` resumes from it (same method, seed, fractions and partitions, else
            ``CheckpointError``) and runs the rounds that are left.
        run_name: the fedpeft run id the nodes file their personal state under (default: the checkpoint's, else
            Flower's run id).
        max_weight: the largest ``num-examples`` a reply may claim (besides the node's registered dataset size,
            which always caps it).
        probe_timeout: seconds a node that holds a partition has to answer before a new node claiming that
            partition replaces it (:meth:`Registry.refresh`).
        one_message: with :meth:`start`, send each node one message per round (round r's evaluation travels with
            round r + 1's train message, and ``on_round`` sees round r then; see the module docstring; ``server_app``
            turns it on); ``False``: a train and an evaluate exchange per round, as Flower's own strategies do. Every
            number is the same either way. With ``checkpoint_dir`` the
            strategy keeps two exchanges (a checkpoint is written once a round's evaluation is in).
    """

    def __init__(
        self,
        method: Any,
        model: nn.Module,
        *,
        num_partitions: int,
        server: Optional[Server] = None,
        server_seed: Optional[int] = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        seed: int = 0,
        min_nodes: Optional[int] = None,
        registration_timeout: float = 600.0,
        check_frozen: bool = True,
        on_round: Optional[Callable[[RoundRecord], None]] = None,
        round_log: Union[str, Path, RoundLog, None] = None,
        checkpoint_dir: Union[str, Path, None] = None,
        run_name: Optional[str] = None,
        max_weight: Optional[float] = None,
        probe_timeout: float = 60.0,
        one_message: bool = False,
    ) -> None:
        self.method: Protocol = get_protocol(method)
        self.one_message = bool(one_message)
        self.on_round = on_round
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
            raise ValueError(f"num_partitions must be an int >= 1, got {num_partitions!r}")
        self.num_partitions = num_partitions
        self.fraction_train = _fraction("fraction_train", fraction_train)
        self.fraction_evaluate = _fraction("fraction_evaluate", fraction_evaluate)
        self.seed = int(seed)
        self.min_nodes = num_partitions if min_nodes is None else int(min_nodes)
        if not 1 <= self.min_nodes <= num_partitions:
            raise ValueError(f"min_nodes must be in [1, {num_partitions}], got {min_nodes!r}")
        self.registration_timeout = float(registration_timeout)
        self.server: Server = server if server is not None else self.method.make_server(
            model, num_clients=num_partitions, seed=server_seed)
        self.fingerprint = frozen_fingerprint(model)  # also stamped in the checkpoint: a resume needs the same backbone
        self.registry = Registry(num_partitions, self.method.name, self.fingerprint if check_frozen else None)
        self.round_log = round_log if isinstance(round_log, RoundLog) or round_log is None else RoundLog(round_log)
        self.history: List[RoundRecord] = []
        self._record = RoundRecord(round=-1, participants=[])
        self._sent: List[Tuple[Message, int]] = []  # this round's train messages and their partitions
        self._sent_eval: List[Tuple[Message, int]] = []  # the same for evaluate messages
        self._num_rounds: Optional[int] = None  # set by start(): evaluations travel with the next round's messages
        self._open: Optional[RoundRecord] = None  # the previous round's record, waiting for its evaluation
        self._open_eval: List[Tuple[Message, int]] = []  # the messages carrying its evaluation
        self._started = 0.0
        self._registered = False
        if max_weight is not None:
            self.server.max_weight = check_max_weight(max_weight)  # type: ignore[attr-defined]
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.run_name, self.probe_timeout = run_name, float(probe_timeout)
        self._offset = 0  # rounds done before this process started (a resumed run)
        self._pending_flags: Dict[str, List[int]] = {}

    @property
    def shared(self) -> Dict[str, Tensor]:
        """An averaging server's current shared state (the model's dtypes)."""
        return self.server.shared  # type: ignore[attr-defined]

    @property
    def generator(self) -> nn.Module:
        """pFedPG's ``PromptGenerator``."""
        return self.server.generator  # type: ignore[attr-defined]

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _ensure_registered(self, grid: Grid) -> None:
        """Register the nodes before the first round (and after a resume: see :mod:`.resume`)."""
        if not self._registered:
            self.registry.run = self.run_id(grid)
            self.registry.register(grid, min_nodes=self.min_nodes, timeout=self.registration_timeout)
            self._registered = True
            self._pending_flags = resumed_flags(self.registry)

    def run_id(self, grid: Optional[Grid] = None) -> str:
        """The fedpeft run id (see ``run_name``); fixed at the first call."""
        if self.run_name is None:
            self.run_name = str(grid.run.run_id) if grid is not None else "flower"
        return self.run_name

    def _sample(self, fraction: float, round_: int) -> List[int]:
        ids = sample_clients(self.num_partitions, fraction, seed=self.seed, round=round_)
        missing = [i for i in ids if i not in self.registry.node_of]
        if missing:
            log.warning("round %d: sampled partitions %s have no registered node; skipped", round_ + 1, missing)
        return [i for i in ids if i in self.registry.node_of]

    def _messages(self, payloads: Dict[int, Dict[str, Tensor]], config: ConfigRecord, server_round: int,
                  message_type: str) -> List[Tuple[Message, int]]:
        cfg = ConfigRecord({**dict(config), "server-round": server_round, ROUND: server_round - 1,
                            SEED: self.seed, METHOD: self.method.name, RUN: self.run_id()})
        records: Dict[int, ArrayRecord] = {}  # identical payloads (FedAvg) are serialized once
        out = []
        for pid in sorted(payloads):
            state = payloads[pid]
            rec = records.get(id(state))
            if rec is None:
                rec = records[id(state)] = to_record(state)
            out.append((Message(RecordDict({ARRAYS: rec, CONFIG: cfg}), self.registry.node_of[pid], message_type,
                                group_id=str(server_round)), pid))
        return out

    @staticmethod
    def _match(sent: List[Tuple[Message, int]], replies: List[Message]) -> Tuple[Dict[str, int], List[Rejection]]:
        """message id → partition of the messages sent (Flower set the ids when it pushed them), and a rejection
        for every partition whose message got no reply."""
        ids = {m.metadata.message_id: pid for m, pid in sent}
        answered = {r.metadata.reply_to_message_id for r in replies}
        return ids, [Rejection(pid, "no reply within the round's timeout") for mid, pid in ids.items()
                     if mid not in answered]

    # ---- Strategy: training ---------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One train message per sampled node, each with its own payload (``server.payloads``); with one message per
        round, also the previous round's deployment (to nodes that train: in the same message)."""
        server_round += self._offset
        fresh = not self._registered
        self._ensure_registered(grid)
        flags = {} if fresh else self.registry.refresh(grid, timeout=self.registration_timeout,
                                                       probe_timeout=self.probe_timeout)
        for key, parts in self._pending_flags.items():  # from the first registration of a resumed run
            flags[key] = sorted(set(flags.get(key, [])) | set(parts))
        self._pending_flags = {}
        self._started = time.perf_counter()
        deploy = self._deployments_due(server_round)  # before the payloads, as in-process
        ids = self._sample(self.fraction_train, server_round - 1)
        self._record = RoundRecord(round=server_round - 1, participants=ids,
                                   absent=absent(self.registry, self.num_partitions, self.fraction_train, self.seed,
                                                 server_round - 1),
                                   rejoined=flags.get("rejoined", []),
                                   restarted_without_state=flags.get("restarted_without_state", []))
        self._sent = self._messages(self.server.payloads(ids), config, server_round, MessageType.TRAIN) if ids else []
        if not ids:
            log.warning("round %d: no registered client to train", server_round)
        if self._open is not None:
            self._open_eval = self._attach_deployments(deploy, config, server_round)
        return [m for m, _ in self._sent] + [m for m, pid in self._open_eval if m.metadata.message_type ==
                                             MessageType.EVALUATE]

    def _deployments_due(self, server_round: int) -> Dict[int, Dict[str, Tensor]]:
        """The previous round's deployments, when its evaluation travels with this round's messages."""
        if self._open is None:
            return {}
        ids = self._sample(self.fraction_evaluate, server_round - 2)
        return self.server.deployment(ids) if ids else {}

    def _attach_deployments(self, deploy: Dict[int, Dict[str, Tensor]], config: ConfigRecord,
                            server_round: int) -> List[Tuple[Message, int]]:
        """Put each deployment into the node's train message, or into an evaluate message of its own."""
        train = {pid: m for m, pid in self._sent}
        own = {pid: state for pid, state in deploy.items() if pid not in train}
        out = self._messages(own, config, server_round - 1, MessageType.EVALUATE) if own else []
        records: Dict[int, ArrayRecord] = {}  # identical deployments (FedAvg) are serialized once
        for pid, state in deploy.items():
            if pid in train:
                msg = train[pid]
                rec = records.get(id(state))
                if rec is None:
                    rec = records[id(state)] = to_record(state)
                msg.content[DEPLOY] = rec
                msg.content[CONFIG] = ConfigRecord({**dict(msg.content.config_records[CONFIG]),
                                                    EVAL_ROUND: server_round - 2})
                out.append((msg, pid))
        return out

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Read each reply once (:func:`~fedpeft.flower.records.parse_reply`), let the server screen and aggregate."""
        server_round += self._offset
        replies = list(replies)
        if self._open is not None:
            replies = self._close_open(server_round, replies)
        sent, missing = self._match(self._sent, replies)
        parsed = [cap_registered(parse_reply(m, sent, like=self.server.expected_upload), self.registry)
                  for m in replies]
        report = self.server.update([p for p in parsed if isinstance(p, Reply)])
        dropped = [p for p in parsed if isinstance(p, Rejection)] + missing
        for rej in dropped:
            log.warning("round %d: dropped the reply of %s: %s", server_round, rej.client_id, rej.reason)
        rec = self._record
        rec.server = ServerReport(accepted=report.accepted, rejected=sorted(dropped + report.rejected, key=_order),
                                  diagnostics=report.diagnostics, updated=report.updated)
        for p, msg in zip(parsed, replies):
            if isinstance(p, Reply):
                metrics = msg.content.metric_records[METRICS]
                rec.upload_bytes[p.client_id] = payload_bytes(msg.content.array_records.get(ARRAYS, ArrayRecord()))
                for key, into in (("loss", rec.train_loss), ("accuracy", rec.after_local)):
                    value = screen_metric(key, metrics.get(key), p.client_id)
                    if value is not None:
                        into[p.client_id] = value
        rec.train_loss = {p: v for p, v in rec.train_loss.items() if p in set(report.accepted)}
        rec.diverged = sorted(p.client_id for p in parsed
                              if isinstance(p, Rejection) and p.reason.startswith(DIVERGED))
        for p in report.accepted:
            self.registry.last_trained[p] = server_round - 1
        losses = [rec.train_loss[p] for p in report.accepted if p in rec.train_loss]
        rec.wall_s = time.perf_counter() - self._started
        return self.server_arrays(), MetricRecord({
            "accepted": len(report.accepted), "rejected": len(rec.server.rejected),
            "loss-mean": sum(losses) / len(losses) if losses else float("nan"),
        })

    # ---- Strategy: evaluation -------------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every sampled node gets what it deploys with (``server.deployment``); it evaluates with its personal part.
        With one message per round, nothing before the last round: the next round's messages carry it."""
        server_round += self._offset
        self._ensure_registered(grid)
        if self._num_rounds is not None and server_round < self._num_rounds:
            self._open, self._sent_eval = self._record, []
            return []
        ids = self._sample(self.fraction_evaluate, server_round - 1)
        self._sent_eval = self._messages(self.server.deployment(ids), config, server_round,
                                         MessageType.EVALUATE) if ids else []
        return [m for m, _ in self._sent_eval]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Per-client accuracy into the round's record; the record goes to ``history``, the round log, ``on_round``,
        and the checkpoint (``checkpoint_dir``) (with one message per round, only after the last round: the others
        close with the next round's replies)."""
        server_round += self._offset
        if self._open is self._record:
            return None
        replies = list(replies)
        sent, missing = self._match(self._sent_eval, replies)
        return self._close(self._record, [parse_evaluation(m, sent) for m in replies], missing, final=True)

    def _close_open(self, server_round: int, replies: List[Message]) -> List[Message]:
        """Close the previous round's record with the evaluations among ``replies``; returns the train replies."""
        rec, self._open = self._open, None
        evaluate_only = {m.metadata.message_id for m, _ in self._open_eval
                         if m.metadata.message_type == MessageType.EVALUATE}
        sent, missing = self._match(self._open_eval, replies)
        got = []
        for m in replies:
            if m.metadata.reply_to_message_id in sent:
                evaluate = m.metadata.reply_to_message_id in evaluate_only
                got.append(parse_evaluation(m, sent, key=METRICS if evaluate else EVALUATION))
        self._open_eval = []
        self._close(rec, got, missing, final=False)
        return [m for m in replies if m.metadata.reply_to_message_id not in evaluate_only]

    def _close(self, rec: RoundRecord, got: List[Any], missing: List[Rejection], final: bool) -> Optional[MetricRecord]:
        acc: Dict[int, float] = {}
        for item in got:
            if isinstance(item, Rejection):
                rec.eval_dropped.append(item)
                log.warning("round %d: evaluation of %s dropped: %s", rec.round + 1, item.client_id, item.reason)
                continue
            pid, acc[pid], metrics = item
            if not metrics.get("has-personal", 0):
                rec.without_personal.append(pid)
        rec.eval_dropped = sorted(rec.eval_dropped + missing, key=_order)
        rec.without_personal.sort()
        rec.deployed = [acc.get(p) for p in range(self.num_partitions)]
        if final:
            rec.wall_s = time.perf_counter() - self._started
        self.history.append(rec)
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, strategy_checkpoint(self))
        if self.round_log is not None:
            self.round_log.append(rec)
        if self.on_round is not None:
            self.on_round(rec)
        if not acc:
            return None
        ids = sorted(acc)
        worst = min(ids, key=lambda p: (acc[p], p))
        return MetricRecord({
            "accuracy-mean": rec.mean, "accuracy-worst": acc[worst], "worst-partition": worst,
            "without-personal": len(rec.without_personal), "partition-ids": ids, "accuracy": [acc[p] for p in ids],
        })

    # ---- Strategy: the rest ---------------------------------------------------------------------------------------
    def server_arrays(self) -> ArrayRecord:
        """The server's tensors (``server.state_dict()[0]``: the shared state, or pFedPG's generator and optimizer
        state) as an ``ArrayRecord``: Flower's ``Result.arrays``."""
        return to_record(self.server.state_dict()[0])

    def summary(self) -> None:
        """Log the configuration."""
        log.info("%s running %s: %d partitions, fraction_train %.2f, fraction_evaluate %.2f, seed %d",
                 type(self).__name__, self.method.name, self.num_partitions, self.fraction_train,
                 self.fraction_evaluate, self.seed)

    def start(
        self,
        grid: Grid,
        initial_arrays: Optional[ArrayRecord] = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: Optional[ConfigRecord] = None,
        evaluate_config: Optional[ConfigRecord] = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Register the nodes (``registration_timeout``), then Flower's round loop (``timeout`` per round).

        ``initial_arrays``: ``None`` (the server starts from the model it was built with) or, for an averaging
        method, a shared state to start from instead (keys as :attr:`shared`, or as :meth:`server_arrays`).
        ``evaluate_fn`` is refused: a server has no personal parts, so a central evaluation means nothing for
        personalized models (clients evaluate).
        """
        if evaluate_fn is not None:
            raise ValueError("evaluate_fn: a personalized model has no central evaluation; the clients evaluate")
        if initial_arrays is not None:
            if not isinstance(self.server, AveragingServer):
                raise ValueError(f"initial_arrays: the {self.method.name} server starts from its own state; pass "
                                 "initial_arrays=None")
            meta = self.server.state_dict()[1]
            self.server.load_state_dict(from_record(initial_arrays, like=self.server.shared), meta)
        lock = None if self.checkpoint_dir is None else claim_folder(self.checkpoint_dir)  # one writer per folder
        try:
            ckpt = None if self.checkpoint_dir is None else load_checkpoint(self.checkpoint_dir)
            if ckpt is not None:
                restore_strategy(self, ckpt)  # the server, the history, the partitions' past; _offset = rounds done
                log.info("resuming run %s after round %d of %d", ckpt.run, ckpt.round, num_rounds)
                if self.round_log is not None:  # every round in the log exactly once, wherever the run was killed
                    self.round_log.reset(self.history)
            self._ensure_registered(grid)
            self._num_rounds = int(num_rounds) if self.one_message and self.checkpoint_dir is None else None
            left = num_rounds - self._offset
            if left < 1:
                log.info("the checkpoint already holds all %d rounds", num_rounds)
                return Result()
            return super().start(grid, self.server_arrays(), num_rounds=left, timeout=timeout,
                                 train_config=train_config, evaluate_config=evaluate_config)
        finally:
            if lock is not None:
                lock.close()


class PersonalizedFedAvg(ProtocolStrategy):
    """The 0.1 name of :class:`ProtocolStrategy` for an averaging method (every method but pFedPG); it only refuses
    a method whose server is not an ``AveragingServer``."""

    def __init__(self, method: Any, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(method, model, **kwargs)
        if not isinstance(self.server, AveragingServer):
            raise TypeError(f"PersonalizedFedAvg needs an averaging method; {self.method.name} makes a "
                            f"{type(self.server).__name__} (use ProtocolStrategy or PFedPGStrategy)")


class PFedPGStrategy(ProtocolStrategy):
    """The 0.1 name of :class:`ProtocolStrategy` for pFedPG: ``method`` defaults to ``"pFedPG"`` and
    ``generator_seed`` is ``server_seed``; a method whose server is not a ``PFedPGServer`` is refused."""

    def __init__(self, method: Any = "pFedPG", model: Optional[nn.Module] = None, *,
                 generator_seed: Optional[int] = None, **kwargs: Any) -> None:
        if model is None:
            raise TypeError("PFedPGStrategy needs model= (a client model: the generator takes its prompt shape)")
        super().__init__(method, model, server_seed=generator_seed, **kwargs)
        if not isinstance(self.server, PFedPGServer):
            raise TypeError(f"PFedPGStrategy runs pFedPG, got {self.method.name} (use ProtocolStrategy or "
                            "PersonalizedFedAvg)")
