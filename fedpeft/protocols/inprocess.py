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
from typing import Any, Callable, List, Optional, Sequence, Union

from torch import nn

from .. import fed
from .._checks import check_positive_int
from .checkpoint import CheckpointError
from .methods import get
from .privacy import Privacy
from .protocol import Protocol, _evaluator
from .records import Diverged, RoundRecord
from .roundlog import RoundLog
from .rounds import RoundBook
from .sampling import sample_clients
from .screening import check_max_weight, screen_metric
from .server import Server
from .server_privacy import client_clip, make_private_server
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
        checkpoint_dir: a folder for the run's checkpoint (:mod:`~fedpeft.protocols.checkpoint`), rewritten after
            every round: the server, every client's personal state, the history. If it already holds one, the
            federation resumes from it (same method, seed, fraction and clients, else ``CheckpointError``), and
            :meth:`run` continues with the next round: bit-identical to a run that was never interrupted.
        run: the run id stamped in the checkpoint (default: the checkpoint's, or ``"inprocess"``).
        max_weight: the largest ``num_examples`` a reply may claim (the server refuses heavier ones).
        privacy: user-level DP (:class:`~fedpeft.protocols.Privacy`): passed to ``protocol.make_server``; clients clip
            their update to ``server.client_clip_norm`` before it leaves them; each record carries ε (docs/privacy.md).
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
        privacy: Optional[Privacy] = None,
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
        if server is not None and privacy is not None:
            raise ValueError("privacy: pass it to the server you built (protocol.make_server(..., privacy=)) and leave "
                             "Federation's privacy=None")
        self.server = server if server is not None else make_private_server(self.protocol, model, self.num_clients,
                                                                            privacy)
        if max_weight is not None:
            self.server.max_weight = check_max_weight(max_weight)
        config = {"method": self.protocol.name, "seed": self.seed, "fraction": float(self.fraction),
                  "num_clients": self.num_clients, "engine": "inprocess",
                  "frozen-sha256": None if checkpoint_dir is None else fed.frozen_fingerprint(model)}
        self.book = RoundBook(self.server, self.num_clients, config=config, run=run, round_log=round_log,
                              checkpoint_dir=checkpoint_dir)
        self.book.resume(self._restore)
        self.run_id = self.book.run = run if run is not None else (self.book.run or "inprocess")

    @property
    def history(self) -> List[RoundRecord]:
        """Every finished round's record."""
        return self.book.history

    @property
    def round_log(self) -> Optional[RoundLog]:
        return self.book.round_log

    @property
    def checkpoint_dir(self) -> Optional[Path]:
        return self.book.checkpoint_dir

    def _restore(self, ckpt: Any) -> Callable[[], None]:
        """Check the clients' personal states in ``ckpt`` (``personal.<client>.<key>``); return their loader."""
        like = self.protocol.initial_personal(self.model)
        personal = []
        for n in range(self.num_clients):
            prefix = f"personal.{n}."
            state = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
            if set(state) != set(like) or any(state[k].shape != like[k].shape or state[k].dtype != like[k].dtype
                                              for k in like):
                raise CheckpointError(f"checkpoint: client {n}'s personal state does not fit the model (keys "
                                      f"{sorted(state)[:4]}..., expected {sorted(like)[:4]}...)")
            bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
            if bad is not None:
                raise CheckpointError(f"checkpoint: client {n}'s personal state [{bad!r}] holds NaN/Inf")
            personal.append({k: v.to(like[k].device) for k, v in state.items()})

        def apply() -> None:
            self.personal = personal

        return apply

    def run_round(self, round: int, *, evaluate: bool = True) -> RoundRecord:
        """Sample, train the participants, update the server, evaluate every client's deployed model.

        ``round`` must be the next one (``len(history)``): replies are stamped with it and the server refuses others.
        ``evaluate=False`` skips both measurements of this round (after local training and deployed; the record's
        ``after_local`` stays empty and ``deployed`` ``None``): evaluation only reads the models, so the training, the
        server and every later round are exactly those of a run that measured every round.
        A client whose training diverges (:meth:`ClientResult.diverged`) keeps its previous personal state; its upload
        is refused and it is listed in ``record.diverged``. The record goes through :class:`RoundBook` (history, round
        log, checkpoint).
        """
        if round != len(self.history):
            raise ValueError(f"round must be the next round, {len(self.history)}, got {round!r}")
        if not isinstance(evaluate, bool):
            raise TypeError(f"evaluate must be True or False, got {evaluate!r}")
        measure = evaluate and self.test_data is not None
        started = time.perf_counter()
        ids = sample_clients(self.num_clients, self.fraction, seed=self.seed, round=round)
        record = self.book.open_round(round, ids)
        payloads = self.server.payloads(ids)
        replies, refused, loss, after_local = [], [], {}, {}
        for n in ids:
            result = self.protocol.client_update(
                self.model, shared=payloads[n], personal=self.personal[n], data=self.train_data[n], round=round,
                client_id=n, seed=self.seed, trainer=self.trainer,
                eval_data=self.test_data[n] if measure else None, **client_clip(self.server),
            )
            why = result.diverged()
            if why is not None:  # keep the previous personal state
                refused.append(Diverged(n, why))
                continue
            self.personal[n] = result.personal
            for key, into in (("loss", loss), ("accuracy", after_local)):
                value = screen_metric(key, result.metrics.get(key), n)
                if value is not None:
                    into[n] = value
            replies.append(result.reply(n, round))
        self.book.close_training(record, self.server.update(replies), refused=refused, train_loss=loss,
                                 after_local=after_local)
        deployed = {n: screen_metric("accuracy", a, n) for n, a in enumerate(self.evaluate(round))} if measure else None
        self.book.close_evaluation(record, deployed, wall_s=time.perf_counter() - started)
        self.book.commit({f"personal.{n}.{k}": v for n, state in enumerate(self.personal) for k, v in state.items()})
        return record

    def close(self) -> None:
        """Free the checkpoint folder for another writer (held from the first round on; the end of the process
        frees it too) and close the round log's TensorBoard writer."""
        self.book.release()
        self.book.close()

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
