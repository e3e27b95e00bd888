"""Flower strategies that run a fedpeft protocol's server: one message per node, replies screened, reports per client.

:class:`ProtocolStrategy` is a ``flwr.serverapp.strategy.Strategy`` around a protocol's server
(``protocol.make_server(model, num_clients=C)``, see ``fedpeft.protocols``). Per round r (Flower counts from 1; the
protocol's round index is r − 1, the in-process engine's)::

    register new nodes by partition id (once; Registry)            query messages
    S = sample_clients(C, fraction_train, seed, round=r−1)         seeded, ≥ 1 client; by partition id
    payloads = server.payloads(S)                                  one train message per node: its own arrays
    replies → (partition id, upload, num-examples), sorted         a failed/late/malformed reply is dropped, logged
    server.update(replies)                                         screens keys, shapes, dtypes, finite values, weight
    evaluate: server.deployment(E) to every node in E              per-client accuracy, mean, worst, no personal yet

Everything a node sends is converted by key (``ArrayRecord``), float32 on the wire and cast back to the model's
dtypes. Replies are processed in partition-id order, so the aggregate is bit-identical to the in-process engine's.

:class:`PersonalizedFedAvg` averages the shared keys (``AveragingServer``: ``fed.Averager``); :class:`PFedPGStrategy`
holds pFedPG's ``PromptGenerator`` (``PFedPGServer``): each node gets its own ``gen(n)``, ``fed.delta_backward`` runs
on the accepted replies only. ``history`` keeps one dict per round (see :meth:`ProtocolStrategy.round_report`).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor, nn

from ..protocols import AveragingServer, PFedPG, PFedPGServer, Protocol, Reply, sample_clients
from ..protocols import get as get_protocol
from .client import ARRAYS, CONFIG, METHOD, METRICS, ROUND, SEED, frozen_fingerprint
from .records import from_record, payload_bytes, to_record
from .registry import Registry

__all__ = ["PFedPGStrategy", "PersonalizedFedAvg", "ProtocolStrategy"]

log = logging.getLogger("fedpeft.flower")


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class ProtocolStrategy(Strategy):
    """Run ``method``'s server over Flower nodes (see the module docstring).

    Args:
        method: a protocol or a method name (``fedpeft.protocols.METHODS``).
        model: a model built exactly like the clients' (its frozen parameters are the reference every node must
            match; its initial values start the server).
        num_partitions: C, the number of clients (partition ids ``0 … C−1``).
        server: the protocol's server to use instead of ``method.make_server(model, num_clients=C)``.
        fraction_train: the share of clients trained per round, in (0, 1] (at least one client).
        fraction_evaluate: the share of clients evaluated per round (default every one).
        seed: the run's seed (sent to the clients: batch orders; client sampling).
        min_nodes: partitions to wait for before round 1 (default C).
        registration_timeout: seconds to wait for ``min_nodes`` nodes to connect and answer.
        check_frozen: refuse nodes whose frozen parameters differ from ``model``'s.
        on_round: called with :meth:`round_report` after every round's evaluation (progress bars, live logs).
    """

    def __init__(
        self,
        method: Any,
        model: nn.Module,
        *,
        num_partitions: int,
        server: Any = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        seed: int = 0,
        min_nodes: Optional[int] = None,
        registration_timeout: float = 600.0,
        check_frozen: bool = True,
        on_round: Optional[Callable[[Dict[str, Any]], None]] = None,
    ) -> None:
        self.method: Protocol = get_protocol(method)
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
        self.server = server if server is not None else self._make_server(model)
        self.registry = Registry(num_partitions, self.method.name, frozen_fingerprint(model) if check_frozen else None)
        self.history: List[Dict[str, Any]] = []
        self._sent: Dict[int, int] = {}  # node id → partition id, this round's train messages
        self._sent_eval: Dict[int, int] = {}  # the same for evaluate messages
        self._round: Dict[str, Any] = {}
        self._registered = False

    def _make_server(self, model: nn.Module) -> Any:
        return self.method.make_server(model, num_clients=self.num_partitions)

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _ensure_registered(self, grid: Grid) -> None:
        """Register the nodes once, before the first round (later rounds use the nodes registered then)."""
        if not self._registered:
            self.registry.register(grid, min_nodes=self.min_nodes, timeout=self.registration_timeout)
            self._registered = True

    def _sample(self, fraction: float, round_: int) -> List[int]:
        ids = sample_clients(self.num_partitions, fraction, seed=self.seed, round=round_)
        missing = [i for i in ids if i not in self.registry.node_of]
        if missing:
            log.warning("round %d: sampled partitions %s have no registered node; skipped", round_ + 1, missing)
        return [i for i in ids if i in self.registry.node_of]

    def _messages(self, payloads: Dict[int, Dict[str, Tensor]], config: ConfigRecord, server_round: int,
                  message_type: str) -> List[Message]:
        cfg = ConfigRecord({**dict(config), "server-round": server_round, ROUND: server_round - 1,
                            SEED: self.seed, METHOD: self.method.name})
        records: Dict[int, ArrayRecord] = {}  # identical payloads (FedAvg) are serialized once
        out = []
        for pid in sorted(payloads):
            state = payloads[pid]
            rec = records.get(id(state))
            if rec is None:
                rec = records[id(state)] = to_record(state)
            out.append(Message(RecordDict({ARRAYS: rec, CONFIG: cfg}), self.registry.node_of[pid], message_type,
                               group_id=str(server_round)))
        return out

    def _reply_partition(self, reply: Message, sent: Dict[int, int]) -> Tuple[Optional[int], Optional[str]]:
        node = reply.metadata.src_node_id
        pid = sent.get(node)
        if pid is None:
            return None, f"reply from node {node}, which was not sent anything this round"
        if reply.has_error():
            return pid, f"the client failed: {reply.error.reason}"
        metrics = reply.content.metric_records.get(METRICS)
        if metrics is None:
            return pid, f"reply without a MetricRecord {METRICS!r}"
        claimed = metrics.get("partition-id")
        if claimed != pid:
            return pid, f"reply claims partition-id {claimed!r}, but node {node} is registered as {pid}"
        return pid, None

    # ---- Strategy: training ---------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One train message per sampled node, each with its own payload (``server.payloads``)."""
        self._ensure_registered(grid)
        self._round = {"round": server_round, "started": time.perf_counter(), "rejected": {}}
        ids = self._sample(self.fraction_train, server_round - 1)
        self._round["sampled"] = ids
        if not ids:
            log.warning("round %d: no registered client to train", server_round)
            self._sent = {}
            return []
        msgs = self._messages(self.server.payloads(ids), config, server_round, MessageType.TRAIN)
        self._sent = {m.metadata.dst_node_id: self.registry.partition_of[m.metadata.dst_node_id] for m in msgs}
        return msgs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Convert the replies by key, drop the failed and malformed ones, and run ``server.update`` on the rest."""
        replies = list(replies)
        rejected: Dict[int, str] = {}
        parsed: List[Reply] = []
        upload_bytes: Dict[int, int] = {}
        losses: Dict[int, float] = {}
        after_local: Dict[int, float] = {}
        like = self.server.expected_upload
        for reply in replies:
            pid, reason = self._reply_partition(reply, self._sent)
            if reason is None:
                try:
                    record = reply.content.array_records.get(ARRAYS, ArrayRecord())
                    upload = from_record(record, like=like)
                    weight = reply.content.metric_records[METRICS].get("num-examples")
                except (TypeError, ValueError, KeyError) as e:
                    reason = f"unreadable reply: {e}"
                else:
                    parsed.append(Reply(pid, upload, weight))
                    upload_bytes[pid] = payload_bytes(record)
                    m = reply.content.metric_records[METRICS]
                    if isinstance(m.get("loss"), (int, float)):
                        losses[pid] = float(m["loss"])
                    if isinstance(m.get("accuracy"), (int, float)):
                        after_local[pid] = float(m["accuracy"])
            if reason is not None:
                key = pid if pid is not None else -1
                rejected[key] = reason
                log.warning("round %d: dropped the reply of partition %s: %s", server_round, pid, reason)
        answered = {r.metadata.src_node_id for r in replies}
        for node, pid in sorted(self._sent.items(), key=lambda x: x[1]):
            if node not in answered:
                rejected[pid] = "no reply within the round's timeout"
                log.warning("round %d: partition %d sent no reply in time; dropped", server_round, pid)
        parsed.sort(key=lambda r: r.client_id)
        report = self.server.update(parsed)
        for rej in report.rejected:
            rejected[rej.client_id if isinstance(rej.client_id, int) else -1] = rej.reason
        self._round.update(accepted=list(report.accepted), rejected=rejected, upload_bytes=upload_bytes,
                           train_loss=losses, after_local=after_local, diagnostics=report.diagnostics,
                           updated=report.updated)
        accepted_losses = [losses[p] for p in report.accepted if p in losses]
        metrics = MetricRecord({
            "accepted": len(report.accepted),
            "rejected": len(rejected),
            "loss-mean": statistics.fmean(accepted_losses) if accepted_losses else float("nan"),
        })
        return self.server_arrays(), metrics

    # ---- Strategy: evaluation -------------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every sampled node gets what it deploys with (``server.deployment``); it evaluates with its personal part."""
        self._ensure_registered(grid)
        ids = self._sample(self.fraction_evaluate, server_round - 1)
        msgs = self._messages(self.server.deployment(ids), config, server_round, MessageType.EVALUATE) if ids else []
        self._sent_eval = {m.metadata.dst_node_id: self.registry.partition_of[m.metadata.dst_node_id] for m in msgs}
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Per-client accuracy (partition-id order), its mean, the worst client, clients without personal state."""
        acc: Dict[int, float] = {}
        without: List[int] = []
        dropped: Dict[int, str] = {}
        for reply in replies:
            pid, reason = self._reply_partition(reply, self._sent_eval)
            if reason is None:
                m = reply.content.metric_records[METRICS]
                a = m.get("accuracy")
                if isinstance(a, (int, float)) and 0.0 <= float(a) <= 1.0:
                    acc[pid] = float(a)
                    if not m.get("has-personal", 0):
                        without.append(pid)
                    continue
                reason = f"accuracy {a!r} is not a number in [0, 1]"
            dropped[pid if pid is not None else -1] = reason
            log.warning("round %d: evaluation of partition %s dropped: %s", server_round, pid, reason)
        ids = sorted(acc)
        worst = min(ids, key=lambda p: (acc[p], p)) if ids else -1
        summary = {
            "accuracy": {p: acc[p] for p in ids},
            "mean": statistics.fmean(acc.values()) if acc else float("nan"),
            "worst": acc[worst] if ids else float("nan"),
            "worst-partition": worst,
            "without-personal": sorted(without),
            "dropped": dropped,
        }
        self._round.update(evaluation=summary, wall_s=time.perf_counter() - self._round.get("started", 0.0))
        self.history.append(self.round_report())
        if self.on_round is not None:
            self.on_round(self.history[-1])
        if not ids:
            return None
        return MetricRecord({
            "accuracy-mean": summary["mean"], "accuracy-worst": summary["worst"], "worst-partition": worst,
            "without-personal": len(without), "partition-ids": ids, "accuracy": [acc[p] for p in ids],
        })

    def round_report(self) -> Dict[str, Any]:
        """The current round as a JSON-ready dict: ``round``, ``sampled``, ``accepted``, ``rejected`` {partition:
        reason}, ``upload_bytes`` {partition: bytes}, ``train_loss`` and ``after_local`` (accuracy right after local
        training) {partition: value}, ``diagnostics``, ``evaluation`` {accuracy per partition, mean, worst,
        worst-partition, without-personal, dropped}, ``wall_s``. ``round`` counts from 1 (Flower's server round)."""
        r = dict(self._round)
        r.pop("started", None)
        return r

    # ---- Strategy: the rest ---------------------------------------------------------------------------------------
    def server_arrays(self) -> ArrayRecord:
        """The server's state as an ``ArrayRecord`` (subclasses say what that is)."""
        return ArrayRecord()

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

        ``initial_arrays``: ``None`` (the server starts from the model it was built with) or, for
        :class:`PersonalizedFedAvg`, a shared state to start from instead. ``evaluate_fn`` is refused: a server has
        no personal parts, so a central evaluation means nothing for personalized models (clients evaluate).
        """
        if evaluate_fn is not None:
            raise ValueError("evaluate_fn: a personalized model has no central evaluation; the clients evaluate")
        if initial_arrays is not None:
            self._set_initial(initial_arrays)
        self._ensure_registered(grid)
        return super().start(grid, self.server_arrays(), num_rounds=num_rounds, timeout=timeout,
                             train_config=train_config, evaluate_config=evaluate_config)

    def _set_initial(self, arrays: ArrayRecord) -> None:
        raise ValueError(f"{type(self).__name__} starts from its server's state; pass initial_arrays=None")


class PersonalizedFedAvg(ProtocolStrategy):
    """FedAvg over a protocol's shared keys; personal keys stay in each node's ``context.state``.

    Streams the accepted replies through ``fed.Averager`` (weighted by ``num-examples``) in partition-id order. A reply
    with other keys (a leaked ``head.weight``), other shapes or dtypes, a NaN/Inf, or a bad weight is dropped with a
    logged reason; the round goes on with the rest, and with no accepted reply the shared state stays as it was.
    Arguments: :class:`ProtocolStrategy`; ``method`` must have an averaging server (every method but pFedPG).
    """

    def _make_server(self, model: nn.Module) -> Any:
        server = super()._make_server(model)
        if not isinstance(server, AveragingServer):
            raise TypeError(f"PersonalizedFedAvg needs an averaging method; {self.method.name} makes a "
                            f"{type(server).__name__} (use PFedPGStrategy for pFedPG)")
        return server

    @property
    def shared(self) -> Dict[str, Tensor]:
        """The current shared state (the model's dtypes)."""
        return self.server.shared

    def server_arrays(self) -> ArrayRecord:
        return to_record(self.server.shared)

    def _set_initial(self, arrays: ArrayRecord) -> None:
        from .._checks import check_state

        state = from_record(arrays, like=self.server.shared)
        check_state(state, like=self.server.shared, finite=True, name="initial_arrays")
        self.server = AveragingServer(state, num_clients=self.num_partitions)


class PFedPGStrategy(ProtocolStrategy):
    """pFedPG: a ``PromptGenerator`` and its optimizer on the server, each node trained on its own ``gen(n)``.

    Nodes map to descriptor rows by partition id (duplicates, out-of-range ids and nodes whose frozen backbone differs
    from ``model``'s are refused at registration). ``fed.delta_backward`` runs on the accepted replies only, then the
    optimizer steps: absent and dropped clients' descriptors get no gradient (under plain SGD they do not move). A NaN
    or raising client is dropped and leaves the generator untouched.

    Args:
        method: a :class:`~fedpeft.protocols.PFedPG` (default ``PFedPG()``) or ``"pFedPG"``.
        generator_seed: seeds the generator's initialization (``None``: the global RNG, as the in-process engine).
        Others: :class:`ProtocolStrategy`.
    """

    def __init__(self, method: Any = "pFedPG", model: Optional[nn.Module] = None, *,
                 generator_seed: Optional[int] = None, **kwargs: Any) -> None:
        if model is None:
            raise TypeError("PFedPGStrategy needs model= (a client model: the generator takes its prompt shape)")
        if not isinstance(get_protocol(method), PFedPG):
            raise TypeError(f"PFedPGStrategy runs pFedPG, got {get_protocol(method).name} (use PersonalizedFedAvg)")
        self.generator_seed = generator_seed
        super().__init__(method, model, **kwargs)
        if not isinstance(self.server, PFedPGServer):
            raise TypeError(f"PFedPGStrategy needs a PFedPGServer, got {type(self.server).__name__}")

    def _make_server(self, model: nn.Module) -> Any:
        return self.method.make_server(model, num_clients=self.num_partitions, seed=self.generator_seed)

    @property
    def generator(self) -> nn.Module:
        """The server's ``PromptGenerator``."""
        return self.server.generator

    def server_arrays(self) -> ArrayRecord:
        return to_record({k: v.detach() for k, v in self.server.generator.state_dict().items()})

