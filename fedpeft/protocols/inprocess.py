"""The in-process engine: a whole federation in one Python process, one model reused for every client.

Per round t::

    S_t = sample_clients(C, fraction, seed=seed, round=t)            every client when fraction = 1
    payloads = server.payloads(S_t)
    for n in S_t (ascending):   result_n = protocol.client_update(model, shared=payloads[n], personal=personal[n], …)
                                personal[n] = result_n.personal
    report = server.update([result_n.reply(n) for n in S_t])
    deployed accuracy of every client: protocol.deploy(model, shared=server.deployment(…)[n], personal=personal[n])

Reusing one model is equivalent to building it fresh per client (as a Flower ClientApp does): every call loads every
trainable key (shared + personal), frozen parameters never change, and the starting personal state of every client is
the model's initial personal values copied once at construction, i.e. what a fresh model built the same seeded way
holds. Nothing random happens outside the seeded batch orders (see :func:`~fedpeft.protocols.batch_seed`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from torch import nn

from .._checks import check_positive_int
from .methods import get
from .protocol import Protocol, _evaluator
from .records import RoundRecord
from .roundlog import RoundLog
from .sampling import sample_clients
from .server import Server
from .training import LocalTrainer, Trainer

__all__ = ["Federation", "RoundRecord"]


class Federation:
    """Run ``protocol`` over clients in this process (see the module docstring).

    Args:
        protocol: a :class:`Protocol` or a method name (:data:`~fedpeft.protocols.METHODS`).
        model: the client model, built like every client's (it is reused for all of them).
        train_data: one training set per client (client id = index).
        test_data: one test set per client, for the after-local-training and deployed accuracies.
        trainer: the local trainer (default :class:`LocalTrainer` ``()``); its ``evaluate`` is used when it has one.
        seed: the run's seed (batch orders, client sampling).
        fraction: the share of clients per round, in (0, 1] (:func:`~fedpeft.protocols.sample_clients`).
        server: a server to use instead of ``protocol.make_server(model, num_clients=len(train_data))``.
        round_log: a :class:`~fedpeft.protocols.RoundLog` or the path of a new one: every finished round is appended
            to it (one JSON line, written atomically with fsync; TensorBoard too when installed).
    """

    def __init__(
        self,
        protocol: Any,
        model: nn.Module,
        train_data: Sequence[Any],
        *,
        test_data: Optional[Sequence[Any]] = None,
        trainer: Optional[Trainer] = None,
        seed: int = 0,
        fraction: float = 1.0,
        server: Optional[Server] = None,
        round_log: Union[str, Path, RoundLog, None] = None,
    ) -> None:
        self.protocol: Protocol = get(protocol)
        self.model = model
        self.train_data = list(train_data)
        self.num_clients = check_positive_int("number of clients (len(train_data))", len(self.train_data))
        if test_data is not None and len(test_data) != self.num_clients:
            raise ValueError(f"test_data has {len(test_data)} sets for {self.num_clients} clients")
        self.test_data = None if test_data is None else list(test_data)
        self.trainer = trainer or LocalTrainer()
        self.seed, self.fraction = int(seed), fraction
        sample_clients(self.num_clients, fraction, seed=self.seed, round=0)  # validates fraction now
        initial = self.protocol.initial_personal(model)
        self.personal = [{k: v.clone() for k, v in initial.items()} for _ in range(self.num_clients)]
        self.server = server if server is not None else self.protocol.make_server(model, num_clients=self.num_clients)
        self.round_log = round_log if isinstance(round_log, RoundLog) or round_log is None else RoundLog(round_log)
        self.history: List[RoundRecord] = []

    def run_round(self, round: int) -> RoundRecord:
        """Sample, train the participants, update the server, evaluate every client's deployed model."""
        started = time.perf_counter()
        ids = sample_clients(self.num_clients, self.fraction, seed=self.seed, round=round)
        record = RoundRecord(round=round, participants=ids)
        payloads = self.server.payloads(ids)
        replies = []
        for n in ids:
            result = self.protocol.client_update(
                self.model, shared=payloads[n], personal=self.personal[n], data=self.train_data[n], round=round,
                client_id=n, seed=self.seed, trainer=self.trainer,
                eval_data=None if self.test_data is None else self.test_data[n],
            )
            self.personal[n] = result.personal
            record.train_loss[n] = result.metrics["loss"]
            if "accuracy" in result.metrics:
                record.after_local[n] = result.metrics["accuracy"]
            replies.append(result.reply(n))
        record.server = self.server.update(replies)
        if self.test_data is not None:
            record.deployed = self.evaluate(round)
        record.wall_s = time.perf_counter() - started
        self.history.append(record)
        if self.round_log is not None:
            self.round_log.append(record)
        return record
    def evaluate(self, round: int = 0) -> List[float]:
        """Every client's deployed-model accuracy on its test set (FedAvg-FT fine-tunes here, seeded by ``round``)."""
        if self.test_data is None:
            raise ValueError("Federation.evaluate() needs test_data")
        evaluate = _evaluator(self.trainer)
        shared = self.server.deployment(range(self.num_clients))
        accs = []
        for n in range(self.num_clients):
            self.protocol.deploy(self.model, shared=shared[n], personal=self.personal[n], data=self.train_data[n],
                                 round=round, client_id=n, seed=self.seed, trainer=self.trainer)
            accs.append(evaluate(self.model, self.test_data[n]))
        return accs

    def run(self, rounds: int) -> List[RoundRecord]:
        """``rounds`` rounds after those already run; returns their records."""
        start = len(self.history)
        return [self.run_round(start + r) for r in range(check_positive_int("rounds", rounds))]
