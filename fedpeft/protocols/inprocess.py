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

from .. import fed
from .._checks import check_positive_int
from .._integrity import FolderLock, tensor_digest
from .checkpoint import CheckpointError, claim_folder, load_checkpoint, save_checkpoint
from .methods import get
from .protocol import Protocol, _evaluator
from .records import Rejection, RoundRecord
from .resume import diverged, federation_checkpoint, restore_federation
from .roundlog import RoundLog
from .sampling import sample_clients
from .screening import check_max_weight, screen_metric
from .server import Server
from .training import LocalTrainer, Trainer

__all__ = ["Federation", "RoundRecord"]


def _order(r: Rejection) -> tuple:
    return (not isinstance(r.client_id, int), r.client_id if isinstance(r.client_id, int) else str(r.client_id))


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
        checkpoint_dir: a folder for the run's checkpoint (:mod:`~fedpeft.protocols.checkpoint`), rewritten after
            every round: the server, every client's personal state, the history. If it already holds one, the
            federation resumes from it (same method, seed, fraction and clients, else ``CheckpointError``), and
            :meth:`run` continues with the next round: bit-identical to a run that was never interrupted.
        run: the run id stamped in the checkpoint (default: the checkpoint's, or ``"inprocess"``).
        max_weight: the largest ``num_examples`` a reply may claim (the server refuses heavier ones).
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
        checkpoint_dir: Union[str, Path, None] = None,
        run: Optional[str] = None,
        max_weight: Optional[float] = None,
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
        if max_weight is not None:
            self.server.max_weight = check_max_weight(max_weight)  # type: ignore[attr-defined]
        self.history: List[RoundRecord] = []
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir).expanduser()
        self._lock: Optional[FolderLock] = None  # taken at the first checkpoint this engine writes
        self.fingerprint = None if self.checkpoint_dir is None else tensor_digest(
            {k: v for k, v in model.state_dict().items() if k not in set(fed.trainable_keys(model))})
        ckpt = None if self.checkpoint_dir is None else load_checkpoint(self.checkpoint_dir)
        if ckpt is not None and run is not None and run != ckpt.run:
            raise CheckpointError(f"{self.checkpoint_dir} holds run {ckpt.run!r}, this federation's run is {run!r}; "
                                  "use another checkpoint folder (or run=None to resume it)")
        self.run_id = run if run is not None else (ckpt.run if ckpt is not None else "inprocess")
        if ckpt is not None:
            restore_federation(self, ckpt)
            if self.round_log is not None:  # every round in the log exactly once, wherever the last run was killed
                self.round_log.reset(self.history)

    def run_round(self, round: int) -> RoundRecord:
        """Sample, train the participants, update the server, evaluate every client's deployed model.

        ``round`` must be the next one (``len(history)``): replies are stamped with it and the server refuses others.
        A client whose training diverges (:func:`~fedpeft.protocols.resume.diverged`) keeps its previous personal
        state; its upload is refused and it is listed in ``record.diverged``.
        """
        if round != len(self.history):
            raise ValueError(f"round must be the next round, {len(self.history)}, got {round!r}")
        started = time.perf_counter()
        ids = sample_clients(self.num_clients, self.fraction, seed=self.seed, round=round)
        record = RoundRecord(round=round, participants=ids)
        payloads = self.server.payloads(ids)
        replies, refused = [], []
        for n in ids:
            result = self.protocol.client_update(
                self.model, shared=payloads[n], personal=self.personal[n], data=self.train_data[n], round=round,
                client_id=n, seed=self.seed, trainer=self.trainer,
                eval_data=None if self.test_data is None else self.test_data[n],
            )
            why = diverged(result)
            if why is not None:
                record.diverged.append(n)
                refused.append(Rejection(n, why))
                continue
            self.personal[n] = result.personal
            for key, into in (("loss", record.train_loss), ("accuracy", record.after_local)):
                value = screen_metric(key, result.metrics.get(key), n)
                if value is not None:
                    into[n] = value
            replies.append(result.reply(n, round))
        record.server = self.server.update(replies)
        record.server.rejected = sorted(record.server.rejected + refused, key=_order)
        record.train_loss = {n: v for n, v in record.train_loss.items() if n in set(record.server.accepted)}
        if self.test_data is not None:
            record.deployed = [screen_metric("accuracy", a, n) for n, a in enumerate(self.evaluate(round))]
        record.wall_s = time.perf_counter() - started
        self.history.append(record)
        if self.checkpoint_dir is not None:  # the checkpoint first: a resume rewrites the log from its history
            self._save()
        if self.round_log is not None:
            self.round_log.append(record)
        return record

    def _save(self) -> None:
        """Write the checkpoint, holding the folder's lock from the first write on (a second writer is refused)."""
        if self._lock is None:
            self._lock = claim_folder(self.checkpoint_dir)
            on_disk = load_checkpoint(self.checkpoint_dir)
            if on_disk is not None and on_disk.round != len(self.history) - 1:
                self.close()
                raise CheckpointError(f"{self.checkpoint_dir} holds round {on_disk.round} now, this federation "
                                      f"resumed at round {len(self.history) - 1}: another writer used the folder")
        save_checkpoint(self.checkpoint_dir, federation_checkpoint(self, self.run_id))

    def close(self) -> None:
        """Release the checkpoint folder's lock (another federation may then write it); the log needs no closing."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

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
