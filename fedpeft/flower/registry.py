"""Which node is which client: registration by ``partition-id``, refusing nodes that cannot take part.

Node ids are random 64-bit integers; fedpeft identifies a client by ``node_config["partition-id"]`` only. Before its
first round a strategy sends each unknown node a ``query`` message (``ClientHandlers.query``) and registers the reply
unless

- the node failed to answer (an error reply),
- its partition id is not an int in ``[0, num_partitions)``,
- it runs another method than the server,
- its frozen parameters differ from the server's model (``frozen_fingerprint``: a different frozen backbone would
  make its prompts or adapters meaningless to the others), or
- its partition id is already taken by a registered node, or claimed by several new nodes at once (every claimant
  is refused then: which one to keep would depend on arrival order).

Refused nodes are logged with the reason and never asked again in this run. While registration waits, a line every
30 s names the partitions still missing. The registry's per-partition past (:meth:`Registry.meta`) goes into the
strategy's checkpoint; node ids do not (a restarted SuperNode or SuperLink hands out new ones).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..protocols import CheckpointError
from .wire import CONFIG, INFO, METHOD, METRICS, NUM_PARTITIONS, PARTITION_ID, RUN

__all__ = ["Registry", "discover_partitions"]

#: seconds between the log lines naming the partitions registration still waits for
WAIT_LOG_S = 30.0

log = logging.getLogger("fedpeft.flower")


def _count(value: object) -> Optional[int]:
    """``value`` as an int when it is an integer (an integral finite float too), else ``None``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Registry:
    """node id ↔ partition id for one run, with the refused nodes and their reasons."""

    def __init__(self, num_partitions: int, method: str, fingerprint: Optional[str]) -> None:
        self.num_partitions, self.method, self.fingerprint = num_partitions, method, fingerprint
        self.partition_of: Dict[int, int] = {}  # node id → partition id
        self.node_of: Dict[int, int] = {}  # partition id → node id
        self.num_examples: Dict[int, int] = {}  # partition id → training examples
        self.refused: Dict[int, str] = {}  # node id → reason
        self.run: Optional[str] = None  # the fedpeft run id, sent with every query (the node reports its state's round)
        self.personal_round: Dict[int, int] = {}  # partition id → round of the node's personal state (-1: none)
        self.retired: Dict[int, int] = {}  # node id → partition id it held before it left or was replaced
        self.last_trained: Dict[int, Optional[int]] = {}  # partition id → last round its upload was accepted

    def __len__(self) -> int:
        return len(self.node_of)

    def _check(self, reply: Message) -> Tuple[Optional[int], Optional[str], int]:
        """``(partition_id, reason_to_refuse, num_examples)`` of one query reply."""
        if reply.has_error():
            return None, f"registration failed on the node: {reply.error.reason}", 0
        metrics = reply.content.metric_records.get(METRICS)
        info = reply.content.config_records.get(INFO)
        if metrics is None or info is None or PARTITION_ID not in metrics:
            return None, "registration reply without partition-id (not a fedpeft ClientApp?)", 0
        pid, n = metrics[PARTITION_ID], metrics.get("num-examples", 0)
        if isinstance(pid, float) and pid.is_integer():
            pid = int(pid)
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < self.num_partitions:
            return None, f"partition-id {pid!r} is outside [0, {self.num_partitions})", 0
        if info.get("method") != self.method:
            return pid, f"the node runs method {info.get('method')!r}, the server {self.method!r}", 0
        if self.fingerprint is not None and info.get("frozen-sha256") != self.fingerprint:
            return pid, "its frozen parameters (backbone) differ from the server's model", 0
        count = _count(n)
        if count is None or count < 1:  # it would cap nothing: its replies' weights could be anything
            return pid, f"num-examples {n!r} is not an integer >= 1 (its training examples)", 0
        return pid, None, count

    def add(self, replies: List[Message]) -> None:
        """Register the nodes of ``replies`` (query replies) by the rules in the module docstring."""
        by_node = {r.metadata.src_node_id: r for r in replies}
        checked = [(r.metadata.src_node_id, *self._check(r)) for r in replies]
        claims = Counter(pid for _, pid, reason, _ in checked if reason is None)
        for node, pid, reason, n in sorted(checked, key=lambda c: (c[1] is None, c[1] or 0, c[0])):
            if reason is None and pid in self.node_of:
                reason = f"partition-id {pid} is already registered by node {self.node_of[pid]}"
            elif reason is None and claims[pid] > 1:
                reason = f"partition-id {pid} is claimed by {claims[pid]} nodes at once; all of them are refused"
            if reason is not None:
                self.refused[node] = reason
                log.warning("refused node %d: %s", node, reason)
                continue
            self.partition_of[node], self.node_of[pid], self.num_examples[pid] = pid, node, n
            got = by_node[node].content.metric_records[METRICS].get("personal-round", -1)
            self.personal_round[pid] = got if isinstance(got, int) and not isinstance(got, bool) else -1
            log.info("registered node %d as partition %d (%d training examples)", node, pid, n)

    def _query(self, node: int, group: str = "register") -> Message:
        cfg = {METHOD: self.method, **({RUN: self.run} if self.run else {})}
        return Message(RecordDict({CONFIG: ConfigRecord(cfg)}), node, MessageType.QUERY, group_id=group)

    def absent(self, sampled: List[int]) -> List[int]:
        """The ``sampled`` partitions that have no live registered node (they left, or never came)."""
        return [p for p in sampled if p not in self.node_of]

    def resumed_flags(self) -> Dict[str, List[int]]:
        """After the first registration of a resumed run: partitions whose node has no personal state although the
        partition trained before the crash (``restarted_without_state``)."""
        lost = sorted(p for p in self.node_of if self._lost(p))
        return {"restarted_without_state": lost} if lost else {}

    def _lost(self, pid: int) -> bool:
        """Its node holds no personal state although the partition trained before."""
        return self.last_trained.get(pid) is not None and self.personal_round.get(pid, -1) < 0

    def meta(self) -> Dict[str, Any]:
        """The checkpoint's part: ``{"registry": {partition: {"num-examples", "last-trained"}}}``."""
        parts = sorted(set(self.num_examples) | set(self.last_trained))
        return {"registry": {str(p): {"num-examples": self.num_examples.get(p),
                                      "last-trained": self.last_trained.get(p)} for p in parts}}

    def restorer(self, meta: Mapping[str, Any], rounds: int) -> Callable[[], None]:
        """Check the checkpoint's registry part (a checkpoint after ``rounds`` rounds): every key a partition in
        ``[0, C)``, every ``last-trained`` a round in ``[0, rounds)`` or null; return the function that loads them."""
        parts = meta.get("registry", {})
        if not isinstance(parts, Mapping):
            raise CheckpointError(f"checkpoint: 'registry' must be a JSON object, got {type(parts).__name__}")
        last: Dict[int, Optional[int]] = {}
        for p, info in parts.items():
            got = info.get("last-trained") if isinstance(info, Mapping) else info
            if not (isinstance(p, str) and p.isdigit() and int(p) < self.num_partitions) or not (got is None or (
                    isinstance(got, int) and not isinstance(got, bool) and 0 <= got < rounds)):
                raise CheckpointError(f"checkpoint: registry[{p!r}] = {info!r} is not a partition in "
                                      f"[0, {self.num_partitions}) with a 'last-trained' round in [0, {rounds}) or null")
            last[int(p)] = got
        return lambda: self.last_trained.update(last)

    def forget(self, node: int) -> None:
        """Unregister ``node`` (it left, or a new node replaced it); its partition is free for a node that rejoins."""
        pid = self.partition_of.pop(node)
        del self.node_of[pid]
        self.retired[node] = pid

    def refresh(self, grid: Grid, *, timeout: float, probe_timeout: float) -> Dict[str, List[int]]:
        """At a round's start: forget nodes that left, register new ones with the first registration's checks.

        A new node claiming a partition that a registered node still holds gets it only if that node no longer
        answers a query within ``probe_timeout`` seconds (Flower lists a killed SuperNode as online for up to two
        heartbeat intervals); if it answers, the newcomer is refused (two live nodes on one partition).

        Returns:
            ``{"rejoined": partitions registered again under a new node id, "restarted_without_state": those of
            them whose node reports no personal state although the partition trained before (:attr:`last_trained`)}``.
        """
        live = set(grid.get_node_ids())
        for node in [n for n in self.partition_of if n not in live]:
            log.warning("node %d (partition %d) left the federation", node, self.partition_of[node])
            self.forget(node)
        new = sorted(n for n in live if n not in self.partition_of and n not in self.refused and n not in self.retired)
        out: Dict[str, List[int]] = {"rejoined": [], "restarted_without_state": []}
        if not new:
            return out
        replies = list(grid.send_and_receive([self._query(n, "rejoin") for n in new], timeout=max(1.0, timeout)))
        checked = [self._check(r) for r in replies]
        contested = {pid: self.node_of[pid] for pid, reason, _ in checked if reason is None and pid in self.node_of}
        if contested:  # is the node holding the partition still alive?
            probes = [self._query(node, "probe") for node in contested.values()]
            answered = {r.metadata.src_node_id for r in grid.send_and_receive(probes, timeout=probe_timeout)
                        if not r.has_error()}
            for pid, node in contested.items():
                if node not in answered:
                    log.warning("node %d (partition %d) no longer answers; a new node claims its partition", node, pid)
                    self.forget(node)
        before = set(self.node_of)
        self.add(replies)
        for pid in sorted(set(self.node_of) - before):
            if pid in self.retired.values() or pid in self.last_trained:
                out["rejoined"].append(pid)
                out["restarted_without_state"] += [pid] if self._lost(pid) else []
        return out

    def register(self, grid: Grid, *, min_nodes: int, timeout: float, poll: float = 1.0) -> None:
        """Query every new node until ``min_nodes`` nodes have answered (registered or refused) or ``timeout``
        seconds have passed.

        Raises:
            RuntimeError: no node at all could be registered within ``timeout``.
        """
        said = time.monotonic()
        deadline = said + timeout
        while True:
            new = [n for n in grid.get_node_ids() if n not in self.partition_of and n not in self.refused]
            if new:
                replies = list(grid.send_and_receive([self._query(n) for n in new],
                                                     timeout=max(1.0, deadline - time.monotonic())))
                answered = {r.metadata.src_node_id for r in replies}
                self.add(replies)
                for n in set(new) - answered:
                    log.warning("node %d did not answer the registration query in time; will ask again", n)
            if len(self) + len(self.refused) >= min_nodes or time.monotonic() >= deadline:
                break  # every expected node has answered (registered or refused), or time is up
            if time.monotonic() - said >= WAIT_LOG_S:
                said = time.monotonic()
                missing = sorted(set(range(self.num_partitions)) - set(self.node_of))
                log.warning("waiting for nodes: %d of %d registered; partitions still missing: %s (%.0f s left)",
                            len(self), min_nodes, missing, deadline - said)
            time.sleep(poll)
        if not len(self):
            raise RuntimeError(f"no node could be registered within {timeout:.0f}s (refused: {self.refused or 'none'})")
        if len(self) < min_nodes:
            log.warning("only %d of %d partitions registered after %.0fs; continuing with %s",
                        len(self), min_nodes, timeout, sorted(self.node_of))


def discover_partitions(grid: Grid, *, timeout: float, poll: float = 1.0, replies: Optional[List[Message]] = None) -> int:
    """``num-partitions`` as the connected nodes report it (``node_config``), for a server not told C.

    Waits until at least one node is connected and answers a query. ``replies``: a list that receives the query
    replies, so that a :class:`Registry` can register those nodes without asking them again (``Registry.add``): on
    a deployed federation every query costs each node a ClientApp process.

    Raises:
        RuntimeError: no node answered within ``timeout``, or the nodes disagree.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        if nodes:
            msgs = [Message(RecordDict({CONFIG: ConfigRecord()}), n, MessageType.QUERY, group_id="discover")
                    for n in nodes]
            got = list(grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())))
            if replies is not None:
                replies.extend(got)
            seen = set()
            for r in got:
                value = r.content[METRICS].get(NUM_PARTITIONS) if r.has_content() and \
                    METRICS in r.content.metric_records else -1
                count = _count(value)
                if count is None or (count < 1 and count != -1):
                    log.warning("node %d reported num-partitions %r (not an integer >= 1); ignored",
                                r.metadata.src_node_id, value)
                elif count != -1:
                    seen.add(count)
            if len(seen) > 1:
                raise RuntimeError(f"the nodes disagree on num-partitions: {sorted(seen)}")
            if seen:
                return seen.pop()
        time.sleep(poll)
    raise RuntimeError(f"no node reported num-partitions within {timeout:.0f}s; pass num_partitions=")
