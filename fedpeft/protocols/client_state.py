"""A client's personal state on disk: one stamped safetensors file per (run, client), current and previous round.

    <state-dir>/fedpeft/personal/<run>/partition-<i>.safetensors

    current/<key>    the state written after training in round r          (metadata "round")
    previous/<key>   the state round r started from (absent if r was the client's first round)

The file is written through :mod:`fedpeft._stamped` (atomic, fsync'ed, never pickled) and stamped with ``format``,
``version``, ``run``, ``partition``, ``method``, ``frozen-sha256`` (:func:`fedpeft.fed.frozen_fingerprint`) and
``sha256`` over the stamp and the tensors (a flipped bit or an edited round is refused); saves of one folder take
turns (a ``flock`` on it). A
training message for round t is answered from ``current`` when t > r (a restarted node continues), from ``previous``
when t == r (a *redo*: the server resumed from its checkpoint and sends round t again) and refused with
:class:`StaleMessage` when t < r. A file of another run, partition, method, backbone or format, or whose tensors do not
fit the model, raises :class:`ClientStateError`: it is never silently reinitialised. See docs/flower.md.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

from torch import Tensor

from .._checks import check_state
from .._integrity import FolderLock
from .._stamped import read_stamped, write_stamped

__all__ = ["ClientStateError", "ClientStateFile", "StaleMessage", "StoredState", "run_folder_name"]

FORMAT, VERSION = "fedpeft.node-state", "2"  # 2: the stamp carries sha256 (fedpeft 0.2.0 wrote "1": refused)
CURRENT, PREVIOUS = "current/", "previous/"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HINT = "; refusing to use or overwrite it (move or delete it to start this client afresh)"


class StaleMessage(RuntimeError):
    """A message for a round older than the client's stored personal state (a late or repeated message)."""


class ClientStateError(ValueError):
    """A state file that does not belong to this client, run, method or backbone, or is unreadable."""


def run_folder_name(run: str) -> str:
    """``run`` itself if it is a safe file name (``[A-Za-z0-9._-]``, ≤ 64 characters, no leading dot), else
    ``run-<first 16 hex digits of sha256(run)>``."""
    if not isinstance(run, str) or not run:
        raise TypeError(f"run must be a non-empty str, got {type(run).__name__} {run!r}")
    return run if _SAFE.match(run) else "run-" + hashlib.sha256(run.encode()).hexdigest()[:16]


@dataclass
class StoredState:
    """``current`` (written in ``round``) and ``previous`` (``previous_round``; ``None`` after a first round)."""

    round: int
    current: Dict[str, Tensor]
    previous: Optional[Dict[str, Tensor]]
    previous_round: Optional[int]


def _round_field(meta: Mapping[str, str], name: str, path: Path) -> Optional[int]:
    value = meta.get(name)
    if value is None or value == "":
        return None
    try:
        r = int(value)
    except ValueError:
        raise ClientStateError(f"{path}: metadata {name!r} must be an integer, got {value!r}") from None
    if r < 0:
        raise ClientStateError(f"{path}: metadata {name!r} must be >= 0, got {r}")
    return r


class ClientStateFile:
    """One client's personal-state file (see the module docstring).

    Args:
        state_dir: the node's state folder (created on the first write).
        run: the fedpeft run id; partition: the client's id; method: the protocol's name;
        fingerprint: the frozen backbone's fingerprint (:func:`fedpeft.fed.frozen_fingerprint`).
    """

    def __init__(self, state_dir: Union[str, Path], *, run: str, partition: int, method: str,
                 fingerprint: str) -> None:
        if not isinstance(state_dir, (str, Path)) or str(state_dir) == "":
            raise TypeError(f"state_dir must be a non-empty str or Path, got {type(state_dir).__name__} {state_dir!r}")
        if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
            raise ValueError(f"partition must be an int >= 0, got {partition!r}")
        for name, value in (("method", method), ("fingerprint", fingerprint)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty str, got {type(value).__name__} {value!r}")
        self.run, self.partition, self.method, self.fingerprint = run, partition, method, fingerprint
        folder = Path(state_dir) / "fedpeft" / "personal" / run_folder_name(run)
        self.path = folder / f"partition-{partition}.safetensors"
        self._cache: Optional[Tuple[tuple, Optional[StoredState]]] = None  # (file's identity, what it held)

    def __repr__(self) -> str:
        return f"ClientStateFile({str(self.path)!r})"

    def _stamp(self) -> Dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "run": self.run, "partition": str(self.partition),
                "method": self.method, "frozen-sha256": self.fingerprint}

    def _read(self, tensors: bool) -> Optional[Tuple[Dict[str, str], Dict[str, Tensor]]]:
        if not self.path.is_file():
            if self.path.exists() or self.path.is_symlink():
                raise ClientStateError(f"{self.path}: not a regular file")
            return None
        return read_stamped(self.path, self._stamp(), error=ClientStateError, tensors=tensors,
                            names={"frozen-sha256": "frozen backbone"}, hint=_HINT)

    def load(self, like: Mapping[str, Tensor]) -> Optional[StoredState]:
        """The stored state cast like ``like`` (the model's personal parameters), or ``None`` without a file; read
        once per object while the file is unchanged.

        Raises:
            ClientStateError: unreadable, another stamp, or tensors without exactly ``like``'s keys and shapes, or
                with non-finite values.
        """
        st = self.path.stat() if self.path.is_file() else None
        seen = () if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is not None and self._cache[0] == seen:
            return self._cache[1]
        read = self._read(tensors=True)
        stored = None if read is None else self._parse(*read, like)
        self._cache = (seen, stored)
        return stored

    def _parse(self, meta: Dict[str, str], tensors: Dict[str, Tensor], like: Mapping[str, Tensor]) -> StoredState:
        round_ = _round_field(meta, "round", self.path)
        prev_round = _round_field(meta, "previous-round", self.path)
        if round_ is None:
            raise ClientStateError(f"{self.path}: metadata has no 'round'")
        stray = [k for k in tensors if not k.startswith((CURRENT, PREVIOUS))]
        if stray:
            raise ClientStateError(f"{self.path}: unexpected tensors {sorted(stray)[:5]}")
        if prev_round is not None and prev_round >= round_:
            raise ClientStateError(f"{self.path}: previous-round {prev_round} is not before round {round_}")
        out: Dict[str, Optional[Dict[str, Tensor]]] = {}
        for name, prefix in (("current", CURRENT), ("previous", PREVIOUS)):
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if name == "previous" and prev_round is None:
                if state:
                    raise ClientStateError(f"{self.path}: 'previous' tensors without a previous-round")
                out[name] = None
                continue
            try:
                check_state(state, like=like, finite=True, name=f"{self.path} [{name}]")
            except (TypeError, ValueError) as e:
                raise ClientStateError(str(e)) from None
            for k, v in state.items():
                if v.is_floating_point() != like[k].is_floating_point():
                    raise ClientStateError(f"{self.path} [{name}][{k!r}]: stored as {v.dtype}, the model's is "
                                           f"{like[k].dtype}")
            out[name] = {k: v.to(dtype=like[k].dtype, device=like[k].device) if v.is_floating_point() else v
                         for k, v in state.items()}
        return StoredState(round_, out["current"], out["previous"], prev_round)  # type: ignore[arg-type]

    def start_state(self, round_: int, like: Mapping[str, Tensor]) -> Tuple[Optional[Dict[str, Tensor]], bool]:
        """``(personal state to train round_ from, redo)``; ``None``: the model's initial values.

        Raises:
            StaleMessage: the file holds a later round.
        """
        stored = self.load(like)
        if stored is None:
            return None, False
        if round_ > stored.round:
            return stored.current, False
        if round_ == stored.round:
            return stored.previous, True
        raise StaleMessage(f"message for round {round_} is stale: {self.path} holds this client's personal state "
                           f"from round {stored.round}")

    def deployed_state(self, like: Mapping[str, Tensor],
                       round_: Optional[int] = None) -> Tuple[Optional[Dict[str, Tensor]], Optional[int]]:
        """``(personal state, its round)`` to deploy with for round ``round_``: the newest one written in a round
        ``<= round_`` (``None``: the newest); ``(None, None)`` when there is none (the model's initial values). A node
        that trained round t + 1 before the server resumed from its checkpoint of round t deploys ``previous``."""
        stored = self.load(like)
        if stored is None:
            return None, None
        if round_ is None or stored.round <= round_:
            return stored.current, stored.round
        if stored.previous_round is not None and stored.previous_round <= round_:
            return stored.previous, stored.previous_round
        return None, None

    def stored_round(self) -> Optional[int]:
        """The stored round from the header only (``None`` without a file); checks the stamp."""
        read = self._read(tensors=False)
        return None if read is None else _round_field(read[0], "round", self.path)

    def save(self, round_: int, personal: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> None:
        """Store ``personal`` as trained in ``round_``, atomically (``previous`` as in the module docstring).

        Raises:
            StaleMessage: the file holds a later round. ClientStateError: the file is not this client's.
            ValueError: ``personal`` does not fit ``like`` or is not finite (nothing is written).
        """
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise ValueError(f"round must be an int >= 0, got {round_!r}")
        check_state(personal, like=like, finite=True, name="personal")
        # one writer at a time per folder (two node processes on one state-dir wait for each other)
        with FolderLock(self.path.parent, what="client state folder", name=None, wait=True):
            self._save(round_, personal, like)

    def _save(self, round_: int, personal: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> None:
        stored = self.load(like)
        previous: Optional[Mapping[str, Tensor]] = None
        prev_round: Optional[int] = None
        if stored is not None:
            if round_ < stored.round:
                raise StaleMessage(f"refusing to write round {round_} over {self.path}, which holds round "
                                   f"{stored.round}")
            if round_ > stored.round:
                previous, prev_round = stored.current, stored.round
            else:  # a redo of the stored round: keep what it started from
                previous, prev_round = stored.previous, stored.previous_round
        tensors = {CURRENT + k: v for k, v in personal.items()}
        tensors.update({PREVIOUS + k: v for k, v in (previous or {}).items()})
        write_stamped(self.path, tensors, {**self._stamp(), "round": str(round_),
                                           "previous-round": "" if prev_round is None else str(prev_round)})
        self._cache = None
