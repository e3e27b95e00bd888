"""The round book: how a round becomes a record, on disk and in the history, written once for every engine.

    book = RoundBook(server, C, config={...}, round_log=path, checkpoint_dir=folder, on_round=fn)
    book.resume(restore)                       # the checkpoint, if any: server, history, the open record
    rec = book.open_round(t, ids, ...)         # round t starts
    book.close_training(rec, report, refused=…, train_loss=…, after_local=…)    # open: trained, not evaluated
    book.close_evaluation(rec, deployed, …)    # history, then the round log
    book.commit(tensors, meta)                 # the checkpoint (open record included), then on_round

Both engines feed it: the in-process :class:`~fedpeft.protocols.Federation` closes a round's evaluation in the same
round, Flower's ``ProtocolStrategy`` (one message per round) in the next one, so a checkpoint may hold one *open*
record: its round trained, the server stepped, the evaluation of ``server.deployment`` still to come. A resumed run
sends that same deployment (a pure function of the server state) and closes it. The engine adds only what is its own
(personal states in-process, the registry on Flower) as checkpoint tensors and meta, and restores them through the
``restore`` callback, which checks everything before anything changes. See docs/protocols.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

from torch import Tensor

from .._integrity import FolderLock
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    check_matches,
    claim_folder,
    load_checkpoint,
    save_checkpoint,
)
from .records import Diverged, Rejection, RoundRecord, ServerReport, rejection_order
from .roundlog import RoundLog
from .server import Server

__all__ = ["RoundBook"]

#: ``restore(checkpoint) -> apply``: check the engine's own part of ``checkpoint`` (raise ``CheckpointError``), and
#: return a function that loads it, called once the server's state has been accepted too
Restore = Callable[[Checkpoint], Callable[[], None]]


def _record(d: Any, round_: int, where: str) -> RoundRecord:
    """``RoundRecord.from_dict(d)``, checked to be round ``round_``; ``CheckpointError`` naming ``where``."""
    try:
        record = RoundRecord.from_dict(d)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint: {where} is not a round record ({type(e).__name__}: {e})") from None
    if record.round != round_:
        raise CheckpointError(f"checkpoint: {where} is the record of round {record.round!r}, expected {round_}")
    return record


class RoundBook:
    """One run's rounds: assembly of each :class:`RoundRecord` and its side effects (see the module docstring).

    Args:
        server: the run's server (its state goes into the checkpoint as ``server.<name>``).
        num_clients: C (``deployed`` has one entry per client).
        config: what a resumed run must share (method, seed, fractions, clients, engine): ``check_matches``.
        run: the run id stamped in the checkpoint (``None``: the checkpoint's, else set by the engine).
        round_log: a :class:`RoundLog` or its path; opened by :meth:`resume`, for append when the run resumes.
        checkpoint_dir: the checkpoint folder (``None``: no checkpoint).
        on_round: called with each closed record after its checkpoint is written.
    """

    def __init__(self, server: Server, num_clients: int, *, config: Mapping[str, Any], run: Optional[str] = None,
                 round_log: Union[str, Path, RoundLog, None] = None, checkpoint_dir: Union[str, Path, None] = None,
                 on_round: Optional[Callable[[RoundRecord], None]] = None) -> None:
        if round_log is not None and not isinstance(round_log, (str, Path, RoundLog)):
            raise TypeError(f"round_log must be a RoundLog, a path or None, got {type(round_log).__name__}")
        self.server, self.num_clients, self.config, self.run = server, num_clients, dict(config), run
        self._log_spec = round_log
        self.round_log: Optional[RoundLog] = round_log if isinstance(round_log, RoundLog) else None
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.on_round = on_round
        self.history: List[RoundRecord] = []
        self.open: Optional[RoundRecord] = None  # trained and stepped, its evaluation still to come
        self._closed: List[RoundRecord] = []  # closed since the last commit: their on_round calls
        self._lock: Optional[FolderLock] = None  # the checkpoint folder's, from claim() on
        self._resumed = False

    @property
    def next_round(self) -> int:
        """The 0-based index of the next round to train."""
        return len(self.history) + (self.open is not None)

    # ---- resume ---------------------------------------------------------------------------------------------------
    def resume(self, restore: Optional[Restore] = None) -> Optional[Checkpoint]:
        """Load the checkpoint of ``checkpoint_dir`` if it holds one (every check before any change), then open the
        round log (kept, minus the rounds that will run again, when resuming). Returns the checkpoint or ``None``.

        Raises:
            CheckpointError: another configuration or run, a history that does not match the round, a server or
                engine state that is refused.
        """
        ckpt = None if self.checkpoint_dir is None else load_checkpoint(self.checkpoint_dir)
        if ckpt is not None:
            self._restore(ckpt, restore)
        if isinstance(self._log_spec, (str, Path)) and self.round_log is None:
            self.round_log = RoundLog(self._log_spec, append=ckpt is not None)
        if ckpt is not None and self.round_log is not None:  # every round once, wherever the last run was killed
            self.round_log.reset(self.history)
        self._resumed = True
        return ckpt

    def claim(self) -> None:
        """Become the checkpoint folder's one writer (:func:`~fedpeft.protocols.checkpoint.claim_folder`: locked,
        a killed writer's leftovers removed); the first :meth:`open_round` does it when the engine did not.

        Raises:
            RuntimeError: another writer holds the folder (its pid and host), or wrote it since :meth:`resume`.
        """
        if self.checkpoint_dir is None or self._lock is not None:
            return
        self._lock = claim_folder(self.checkpoint_dir)
        on_disk = load_checkpoint(self.checkpoint_dir) if self._resumed else None
        if on_disk is not None and on_disk.round != self.next_round:
            self.release()
            raise RuntimeError(f"{self.checkpoint_dir} holds round {on_disk.round} now, this run resumed at round "
                               f"{self.next_round}: another writer used the folder meanwhile")

    def release(self) -> None:
        """Free the checkpoint folder for another writer (a process that ends frees it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _restore(self, ckpt: Checkpoint, restore: Optional[Restore]) -> None:
        check_matches(ckpt, **self.config)
        if self.run is not None and self.run != ckpt.run:
            raise CheckpointError(f"the checkpoint is of run {ckpt.run!r}, this run is {self.run!r}")
        history, open_ = ckpt.meta.get("history"), ckpt.meta.get("open")
        closed = ckpt.round - (open_ is not None)
        if not isinstance(history, list) or len(history) != closed:
            raise CheckpointError(f"checkpoint of round {ckpt.round}: its history has "
                                  f"{len(history) if isinstance(history, list) else history!r} rounds, not {closed}")
        records = [_record(d, i, f"history[{i}]") for i, d in enumerate(history)]
        pending = None if open_ is None else _record(open_, closed, "the open record")
        server = ckpt.meta.get("server")
        got = server.get("round") if isinstance(server, Mapping) else server
        if got != ckpt.round:
            raise CheckpointError(f"checkpoint of round {ckpt.round}: meta['server']['round'] is {got!r}; a server "
                                  f"that ran {ckpt.round} rounds would refuse every later reply")
        apply = restore(ckpt) if restore is not None else None
        tensors = {k[len("server."):]: v for k, v in ckpt.tensors.items() if k.startswith("server.")}
        try:
            self.server.load_state_dict(tensors, ckpt.meta.get("server", {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint: the server refused its state ({e})") from None
        if apply is not None:
            apply()
        self.history, self.open, self.run = records, pending, ckpt.run

    # ---- a round --------------------------------------------------------------------------------------------------
    def open_round(self, round_: int, participants: Sequence[int], **flags: List[int]) -> RoundRecord:
        """A new record for round ``round_`` (``flags``: ``absent``, ``rejoined``, ``restarted_without_state``)."""
        if round_ != self.next_round:
            raise ValueError(f"round must be the next round, {self.next_round}, got {round_!r}")
        self.claim()
        return RoundRecord(round=round_, participants=list(participants),
                           **{k: sorted(v) for k, v in flags.items() if v})

    def close_training(self, record: RoundRecord, report: ServerReport, *, refused: Sequence[Rejection] = (),
                       train_loss: Mapping[int, float], after_local: Mapping[int, float],
                       upload_bytes: Optional[Mapping[int, int]] = None) -> None:
        """The server's ``report`` and what the engine refused itself (:class:`Diverged` clients, unreadable or
        missing replies) into ``record``: rejections merged in one order, the loss of accepted clients only."""
        accepted = set(report.accepted)
        record.server = ServerReport(accepted=list(report.accepted),
                                     rejected=sorted([*refused, *report.rejected], key=rejection_order),
                                     diagnostics=report.diagnostics, updated=report.updated,
                                     privacy=report.privacy)
        record.diverged = sorted(r.client_id for r in refused if isinstance(r, Diverged))
        record.train_loss = {n: float(v) for n, v in sorted(train_loss.items()) if n in accepted}
        record.after_local = {n: float(v) for n, v in sorted(after_local.items())}
        record.upload_bytes = dict(sorted((upload_bytes or {}).items()))
        self.open = record

    def close_evaluation(self, record: RoundRecord, deployed: Optional[Mapping[int, float]], *,
                         without_personal: Sequence[int] = (), dropped: Sequence[Rejection] = (),
                         wall_s: Optional[float] = None) -> None:
        """Per-client deployed accuracy (``None``: no evaluation) into ``record``; then the history and the log."""
        if record is not self.open:
            raise ValueError(f"round {record.round} is not the open round")
        if deployed is not None:
            record.deployed = [deployed.get(n) for n in range(self.num_clients)]
        record.without_personal = sorted(without_personal)
        record.eval_dropped = sorted(dropped, key=rejection_order)
        if wall_s is not None:
            record.wall_s = wall_s
        self.open = None
        self.history.append(record)
        if self.round_log is not None:
            self.round_log.append(record)
        self._closed.append(record)

    def checkpoint(self, tensors: Optional[Mapping[str, Tensor]] = None,
                   meta: Optional[Mapping[str, Any]] = None) -> Checkpoint:
        """The run after its last trained round: the server, the history, the open record, and the engine's own
        ``tensors`` and ``meta``."""
        server_tensors, server_meta = self.server.state_dict()
        return Checkpoint(
            round=self.next_round, run=self.run or "run",
            tensors={**{f"server.{k}": v for k, v in server_tensors.items()}, **dict(tensors or {})},
            meta={**self.config, "server": server_meta, "history": [r.as_dict() for r in self.history],
                  "open": None if self.open is None else self.open.as_dict(), **dict(meta or {})})

    def commit(self, tensors: Optional[Mapping[str, Tensor]] = None, meta: Optional[Mapping[str, Any]] = None) -> None:
        """End of a round's work: the checkpoint (when ``checkpoint_dir``), then ``on_round`` for each record closed
        since the last commit."""
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.checkpoint(tensors, meta))
        closed, self._closed = self._closed, []
        if self.on_round is not None:
            for record in closed:
                self.on_round(record)

    def close(self) -> None:
        """Close the round log's TensorBoard writer (the lines need no closing)."""
        if self.round_log is not None:
            self.round_log.close()

