"""The Flower strategy that runs any fedpeft protocol's server, one message per node per round.

:meth:`ProtocolStrategy.start` owns its loop. Round t (0-based; Flower's server round t + 1)::

    deploy = server.deployment(E(t−1))          the open round's deployment: a pure function of the server state
    S = sample_clients(C, fraction_train, seed, t)
    send  train t (server.payloads(S)) ⊕ deploy  one message per node (a node only in E(t−1): an evaluate message)
    close round t−1 with the evaluations         history, round log               (protocols.RoundBook)
    server.update(parse_reply(r) for r in replies)                                 screened once, by the server
    close round t's training: it is the open record; checkpoint (open record included), then on_round(t−1)

and after the last round one evaluate exchange closes it. The numbers are those of the in-process engine, bit for bit;
``one_message=False`` runs a train and an evaluate exchange per round instead. ``configure_*``/``aggregate_*`` are the
same steps as a two-exchange adapter, for a custom Flower workflow. See docs/flower.md.
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

from .. import fed
from .._checks import check_positive_int
from ..protocols import Protocol, Rejection, Reply, RoundBook, RoundLog, RoundRecord, Server, sample_clients
from ..protocols import get as get_protocol
from ..protocols.privacy import Privacy
from ..protocols.sampling import check_fraction
from ..protocols.screening import check_max_weight, screen_metric
from ..protocols.server_privacy import make_private_server, note_sample
from . import wire
from .registry import Registry

__all__ = ["PFedPGStrategy", "PersonalizedFedAvg", "ProtocolStrategy"]

log = logging.getLogger("fedpeft.flower")
Sent = List[Tuple[Message, int]]  # messages and the partition each went to


def _records(states: Dict[int, Dict[str, Tensor]]) -> Dict[int, ArrayRecord]:
    """``to_record`` of each partition's state, once per distinct state (FedAvg sends one state to everyone)."""
    done: Dict[int, ArrayRecord] = {}
    for s in states.values():
        done[id(s)] = done.get(id(s)) or wire.to_record(s)
    return {pid: done[id(s)] for pid, s in states.items()}


def _exchange(grid: Grid, sent: Sent, timeout: float) -> List[Message]:
    return list(grid.send_and_receive([m for m, _ in sent], timeout=timeout)) if sent else []


def _split(sent: Sent, replies: List[Message]) -> Tuple[List[Message], List[Message]]:
    """``(the replies to the sent messages, the others)``."""
    ids = {m.metadata.message_id for m, _ in sent}
    return ([r for r in replies if r.metadata.reply_to_message_id in ids],
            [r for r in replies if r.metadata.reply_to_message_id not in ids])


def _missing(sent: Sent, replies: List[Message]) -> List[Rejection]:
    answered = {r.metadata.reply_to_message_id for r in replies}
    return [Rejection(pid, "no reply within the round's timeout") for m, pid in sent
            if m.metadata.message_id not in answered]


class ProtocolStrategy(Strategy):
    """Run ``method``'s server over Flower nodes (see the module docstring).

    Args:
        method: a protocol or a method name (``fedpeft.protocols.METHODS``).
        model: a model built exactly like the clients' (its frozen state is the reference every node must match;
            its initial values start the server).
        num_partitions: C (partition ids ``0 … C−1``).
        server: a server to use instead of ``method.make_server(model, num_clients=C, seed=server_seed)``.
        server_seed: seeds a server that draws random values (pFedPG's generator).
        fraction_train, fraction_evaluate: the share of clients trained / evaluated per round, in (0, 1].
        seed: the run's seed (batch orders, client sampling).
        min_nodes: partitions to wait for before round 1 (default C); registration_timeout: for how long.
        check_frozen: refuse nodes whose frozen parameters differ from ``model``'s.
        on_round: called with each round's closed :class:`~fedpeft.protocols.RoundRecord`.
        round_log: a :class:`~fedpeft.protocols.RoundLog` or a path (appended to when the run resumes).
        checkpoint_dir: the server's checkpoint folder, written after every round (the open record included); if it
            holds one, :meth:`start` resumes from it (same method, seed, fractions and partitions).
        run_name: the run id the nodes file their personal state under (default: the checkpoint's, else Flower's).
        max_weight: the largest ``num-examples`` a reply may claim (the registered count always caps it).
        probe_timeout: seconds a node holding a partition has to answer before a newcomer may take it over.
        one_message: one message per node per round (default); ``False``: a train and an evaluate exchange.
        privacy: user-level DP (:class:`~fedpeft.protocols.Privacy`, docs/privacy.md): passed to ``make_server``;
            every train message asks the node to clip its update; each record carries ε.
    """

    def __init__(self, method: Any, model: nn.Module, *, num_partitions: int, server: Optional[Server] = None,
                 server_seed: Optional[int] = None, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 seed: int = 0, min_nodes: Optional[int] = None, registration_timeout: float = 600.0,
                 check_frozen: bool = True, on_round: Optional[Callable[[RoundRecord], None]] = None,
                 round_log: Union[str, Path, RoundLog, None] = None, checkpoint_dir: Union[str, Path, None] = None,
                 run_name: Optional[str] = None, max_weight: Optional[float] = None, probe_timeout: float = 60.0,
                 one_message: bool = True, privacy: Optional[Privacy] = None) -> None:
        self.method: Protocol = get_protocol(method)
        self.num_partitions, self.seed = check_positive_int("num_partitions", num_partitions), int(seed)
        self.fraction_train = check_fraction(fraction_train, "fraction_train")
        self.fraction_evaluate = check_fraction(fraction_evaluate, "fraction_evaluate")
        self.min_nodes = num_partitions if min_nodes is None else int(min_nodes)
        if not 1 <= self.min_nodes <= num_partitions:
            raise ValueError(f"min_nodes must be in [1, {num_partitions}], got {min_nodes!r}")
        self.registration_timeout, self.probe_timeout = float(registration_timeout), float(probe_timeout)
        if server is not None and privacy is not None:
            raise ValueError("privacy: pass it to the server you built (protocol.make_server(..., privacy=)) and leave "
                             "ProtocolStrategy's privacy=None")
        self.server: Server = server if server is not None else make_private_server(
            self.method, model, num_partitions, privacy, seed=server_seed)
        if max_weight is not None:
            self.server.max_weight = check_max_weight(max_weight)
        fingerprint = fed.frozen_fingerprint(model)  # also in the checkpoint: a resume needs the same backbone
        self.registry = Registry(num_partitions, self.method.name, fingerprint if check_frozen else None)
        config = {"method": self.method.name, "seed": self.seed, "fraction_train": self.fraction_train,
                  "fraction_evaluate": self.fraction_evaluate, "num_partitions": num_partitions, "engine": "flower",
                  "frozen-sha256": fingerprint}
        self.book = RoundBook(self.server, num_partitions, config=config, run=run_name, round_log=round_log,
                              checkpoint_dir=checkpoint_dir, on_round=on_round)
        self.run_name, self.one_message, self._prepared = run_name, bool(one_message), False
        self._flags: Dict[str, List[int]] = {}  # the first registration's flags of a resumed run
        self._eval_sent: Sent = []  # adapter: the evaluate messages in flight

    @property
    def history(self) -> List[RoundRecord]:
        """Every closed round's record."""
        return self.book.history

    @property
    def on_round(self) -> Optional[Callable[[RoundRecord], None]]:
        """The callback each closed round's record goes to; it lives on the round book, so setting it here sets it
        there (one home, no silently unused attribute)."""
        return self.book.on_round

    @on_round.setter
    def on_round(self, fn: Optional[Callable[[RoundRecord], None]]) -> None:
        self.book.on_round = fn

    def run_id(self, grid: Optional[Grid] = None) -> str:
        """The fedpeft run id (``run_name``, the checkpoint's, else Flower's run id); fixed at the first call."""
        if self.run_name is None:
            self.run_name = str(grid.run.run_id) if grid is not None else "flower"
        self.book.run = self.run_name
        return self.run_name

    # ---- steps ----------------------------------------------------------------------------------------------------
    def _prepare(self, grid: Grid) -> None:
        """Once: resume from the checkpoint (server, history, open record, registry), then register the nodes."""
        if self._prepared:
            return
        self.book.claim()  # one server per checkpoint folder, before anything is sent to a node
        ckpt = self.book.resume(lambda c: self.registry.restorer(c.meta, c.round))
        if ckpt is not None:
            self.run_name = ckpt.run
            log.info("resuming run %s after round %d", ckpt.run, ckpt.round)
        self.registry.run = self.run_id(grid)
        self.registry.register(grid, min_nodes=self.min_nodes, timeout=self.registration_timeout)
        self._flags, self._prepared = self.registry.resumed_flags(), True

    def _sample(self, fraction: float, round_: int) -> Tuple[List[int], List[int]]:
        """``(the sampled partitions with a registered node, those without: absent)``."""
        ids = sample_clients(self.num_partitions, fraction, seed=self.seed, round=round_)
        absent = self.registry.absent(ids)
        if absent:
            log.warning("round %d: sampled partitions %s have no registered node; skipped", round_ + 1, absent)
        return [i for i in ids if i not in absent], absent

    def _messages(self, states: Dict[int, Dict[str, Tensor]], kind: str, round_: int,
                  config: Optional[ConfigRecord]) -> Sent:
        c = getattr(self.server, "client_clip_norm", None)
        clip = {} if c is None else {wire.CLIP_NORM: c}  # DP: the node clips its update before sending it
        cfg = ConfigRecord({**dict(config or {}), "server-round": round_ + 1, wire.ROUND: round_,
                            wire.SEED: self.seed, wire.METHOD: self.method.name, wire.RUN: self.run_id(), **clip})
        records = _records(states)
        return [(Message(RecordDict({wire.ARRAYS: records[pid], wire.CONFIG: cfg}), self.registry.node_of[pid], kind,
                         group_id=str(round_ + 1)), pid) for pid in sorted(states)]

    def _refresh(self, grid: Grid) -> Dict[str, List[int]]:
        """At a round's start: forget nodes that left, register new ones; the round's ``rejoined``/... flags."""
        flags = self.registry.refresh(grid, timeout=self.registration_timeout, probe_timeout=self.probe_timeout)
        for key, parts in self._flags.items():
            flags[key] = sorted(set(flags.get(key, [])) | set(parts))
        self._flags = {}
        return flags

    def _open_round(self, round_: int, flags: Dict[str, List[int]],
                    config: Optional[ConfigRecord]) -> Tuple[RoundRecord, Sent]:
        """Sample, open the record, one train message per node with its payload."""
        ids, absent = self._sample(self.fraction_train, round_)
        record = self.book.open_round(round_, ids, absent=absent, **flags)
        note_sample(self.server, len(ids) + len(absent))  # DP: absent clients add 0, they do not shrink m
        if not ids:
            log.warning("round %d: no registered client to train", round_ + 1)
        return record, self._messages(self.server.payloads(ids), MessageType.TRAIN, round_, config) if ids else []

    def _attach(self, train: Sent, deploy: Dict[int, Dict[str, Tensor]], round_: int,
                config: Optional[ConfigRecord]) -> Sent:
        """Round ``round_``'s deployments into the train messages of the nodes that train, else their own message."""
        trains = {pid: m for m, pid in train}
        out = self._messages({p: s for p, s in deploy.items() if p not in trains}, MessageType.EVALUATE, round_, config)
        records = _records({p: s for p, s in deploy.items() if p in trains})
        for pid in sorted(records):
            msg = trains[pid]
            msg.content[wire.DEPLOY] = records[pid]
            msg.content[wire.CONFIG] = ConfigRecord({**dict(msg.content[wire.CONFIG]), wire.EVAL_ROUND: round_})
            out.append((msg, pid))
        return out

    def _close_training(self, record: RoundRecord, sent: Sent, replies: List[Message], started: float) -> None:
        """Read each reply once, let the server screen and step, and close the record's training part."""
        ids = {m.metadata.message_id: pid for m, pid in sent}
        like, registered = self.server.expected_upload, self.registry.num_examples
        parsed = [(wire.parse_reply(m, ids, like=like, registered=registered), m) for m in replies]
        refused = [p for p, _ in parsed if isinstance(p, Rejection)] + _missing(sent, replies)
        for rej in refused:
            log.warning("round %d: dropped the reply of %s: %s", record.round + 1, rej.client_id, rej.reason)
        report = self.server.update([p for p, _ in parsed if isinstance(p, Reply)])
        loss, after_local, nbytes = {}, {}, {}  # by partition
        for p, m in parsed:
            if isinstance(p, Reply):
                metrics = m.content.metric_records[wire.METRICS]
                nbytes[p.client_id] = wire.payload_bytes(m.content.array_records.get(wire.ARRAYS, ArrayRecord()))
                for key, into in (("loss", loss), ("accuracy", after_local)):
                    value = screen_metric(key, metrics.get(key), p.client_id)
                    if value is not None:
                        into[p.client_id] = value
        for pid in report.accepted:
            self.registry.last_trained[pid] = record.round
        self.book.close_training(record, report, refused=refused, train_loss=loss, after_local=after_local,
                                 upload_bytes=nbytes)
        record.wall_s = time.perf_counter() - started

    def _evaluation_messages(self, record: RoundRecord, config: Optional[ConfigRecord]) -> Sent:
        ids = self._sample(self.fraction_evaluate, record.round)[0]
        return self._messages(self.server.deployment(ids), MessageType.EVALUATE, record.round, config) if ids else []

    def _close_evaluation(self, record: RoundRecord, sent: Sent, replies: List[Message],
                          extra_s: float = 0.0) -> Optional[MetricRecord]:
        """Per-client accuracies into ``record`` (from evaluate replies, or the ``EVALUATION`` a train reply carries);
        the record is then closed (history, round log)."""
        ids = {m.metadata.message_id: pid for m, pid in sent}
        carried = {m.metadata.message_id for m, _ in sent if m.metadata.message_type == MessageType.TRAIN}
        acc: Dict[int, float] = {}
        without, dropped = [], _missing(sent, replies)
        for m in replies:
            key = wire.EVALUATION if m.metadata.reply_to_message_id in carried else wire.METRICS
            got = wire.parse_evaluation(m, ids, key=key)
            if isinstance(got, Rejection):
                log.warning("round %d: evaluation of %s dropped: %s", record.round + 1, got.client_id, got.reason)
                dropped.append(got)
                continue
            pid, acc[pid], metrics = got
            if not metrics.get("has-personal", 0):
                without.append(pid)
        self.book.close_evaluation(record, acc, without_personal=without, dropped=dropped,
                                   wall_s=(record.wall_s or 0.0) + extra_s)
        if not acc:
            return None
        worst = min(acc, key=lambda p: (acc[p], p))
        return MetricRecord({"accuracy-mean": record.mean, "accuracy-worst": acc[worst], "worst-partition": worst,
                             "without-personal": len(without), "partition-ids": sorted(acc),
                             "accuracy": [acc[p] for p in sorted(acc)]})

    def _evaluate(self, grid: Grid, record: RoundRecord, config: Optional[ConfigRecord], timeout: float) -> None:
        """An evaluate exchange of its own for ``record`` (the last round; every round with two exchanges)."""
        t0 = time.perf_counter()
        sent = self._evaluation_messages(record, config)
        self._close_evaluation(record, sent, _exchange(grid, sent, timeout), extra_s=time.perf_counter() - t0)

    # ---- the loop -------------------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: Optional[ArrayRecord] = None, num_rounds: int = 3,
              timeout: float = 3600, train_config: Optional[ConfigRecord] = None,
              evaluate_config: Optional[ConfigRecord] = None, evaluate_fn: Any = None) -> Result:
        """Register the nodes, then run the rounds left (``timeout`` per exchange); see the module docstring.

        ``initial_arrays``: ``None`` (the server starts from the model it was built with) or tensors keyed as
        :meth:`server_arrays` (an averaging server also takes its shared keys). ``evaluate_fn`` is refused: a server
        has no personal parts, so a central evaluation means nothing for personalized models (clients evaluate).
        """
        if evaluate_fn is not None:
            raise ValueError("evaluate_fn: a personalized model has no central evaluation; the clients evaluate")
        if initial_arrays is not None:
            self._load_initial(initial_arrays)
        try:
            self._prepare(grid)
            return self._loop(grid, num_rounds, timeout, train_config, evaluate_config)
        finally:
            self.book.release()  # the checkpoint folder is free for the next server

    def _loop(self, grid: Grid, num_rounds: int, timeout: float, train_config: Optional[ConfigRecord],
              evaluate_config: Optional[ConfigRecord]) -> Result:
        book = self.book
        for round_ in range(book.next_round, int(num_rounds)):
            started, due, flags = time.perf_counter(), book.open, self._refresh(grid)
            ids = [] if due is None else self._sample(self.fraction_evaluate, due.round)[0]
            deploy = self.server.deployment(ids) if ids else {}  # the open round's, before this round's payloads
            record, train = self._open_round(round_, flags, train_config)
            evals = [] if due is None else self._attach(train, deploy, due.round, evaluate_config)
            own = [(m, p) for m, p in evals if m.metadata.message_type == MessageType.EVALUATE]
            replies = _exchange(grid, train + own, timeout)
            if due is not None:
                self._close_evaluation(due, evals, _split(evals, replies)[0])
            self._close_training(record, train, _split(own, replies)[1], started)
            if not self.one_message:
                self._evaluate(grid, record, evaluate_config, timeout)
            book.commit(meta=self.registry.meta())
        if book.open is not None:
            self._evaluate(grid, book.open, evaluate_config, timeout)
            book.commit(meta=self.registry.meta())
        return Result(arrays=self.server_arrays())

    def _load_initial(self, arrays: ArrayRecord) -> None:
        tensors, meta = self.server.state_dict()
        like = {**{k.split(".", 1)[-1]: v for k, v in tensors.items()}, **tensors}
        self.server.load_state_dict(wire.from_record(arrays, like=like), meta)  # ValueError: it does not fit

    def server_arrays(self) -> ArrayRecord:
        """The server's tensors (``server.state_dict()[0]``) as an ``ArrayRecord``: Flower's ``Result.arrays``."""
        return wire.to_record(self.server.state_dict()[0])

    def summary(self) -> None:
        """Log the configuration."""
        log.info("%s: %s over %d partitions, seed %d", type(self).__name__, self.method.name, self.num_partitions, self.seed)

    # ---- Flower's callbacks: the same steps, two exchanges per round, for a custom workflow -----------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The next round's train messages (``server_round`` only labels them: rounds continue from the book)."""
        self._prepare(grid)
        started = time.perf_counter()
        record, sent = self._open_round(self.book.next_round, self._refresh(grid), config)
        self._round: Tuple[RoundRecord, Sent, float] = (record, sent, started)  # the round in flight
        return [m for m, _ in sent]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Screen and step on the replies (the server's update); the record waits for its evaluation."""
        record, sent, started = self._round  # set by configure_train
        self._close_training(record, sent, list(replies), started)
        losses = list(record.train_loss.values())
        return self.server_arrays(), MetricRecord({"accepted": len(record.server.accepted),
                                                   "rejected": len(record.server.rejected),
                                                   "loss-mean": sum(losses) / len(losses) if losses else float("nan")})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every sampled node gets what it deploys with (``server.deployment``)."""
        self._eval_sent = [] if self.book.open is None else self._evaluation_messages(self.book.open, config)
        return [m for m, _ in self._eval_sent]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Close the round (history, round log, checkpoint, ``on_round``); the accuracies as Flower metrics."""
        if self.book.open is None:
            return None
        out = self._close_evaluation(self.book.open, self._eval_sent, list(replies))
        self.book.commit(meta=self.registry.meta())
        return out


class PersonalizedFedAvg(ProtocolStrategy):
    """The 0.1 name of :class:`ProtocolStrategy` for an averaging method (every method but pFedPG)."""

    def __init__(self, method: Any, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(method, model, **kwargs)
        if self.server.own_params:
            raise TypeError(f"PersonalizedFedAvg averages; {self.method.name} is not (use PFedPGStrategy)")


class PFedPGStrategy(ProtocolStrategy):
    """The 0.1 name of :class:`ProtocolStrategy` for pFedPG (``generator_seed`` is ``server_seed``)."""

    def __init__(self, method: Any = "pFedPG", model: Optional[nn.Module] = None, *,
                 generator_seed: Optional[int] = None, **kwargs: Any) -> None:
        if model is None:
            raise TypeError("PFedPGStrategy needs model= (a client model: the generator takes its prompt shape)")
        super().__init__(method, model, server_seed=generator_seed, **kwargs)
        if not self.server.own_params:
            raise TypeError(f"PFedPGStrategy runs pFedPG, got {self.method.name} (use PersonalizedFedAvg)")
