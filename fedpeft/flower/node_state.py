"""Durable client state: each client's personal parameters in one safetensors file on its node's disk.

Flower keeps ``context.state`` in the SuperNode's memory only (FLOWER.md): a restarted SuperNode loses every client's
heads, personal prompts and U/V. With a state folder (``node_config["state-dir"]``, or ``client_app(state_dir=)``) the
ClientApp keeps them here instead::

    <state-dir>/fedpeft/personal/<run>/partition-<i>.safetensors

one file per (run, partition), replaced atomically (temporary file, fsync, rename, fsync of the folder:
:mod:`fedpeft._atomic`) after every training round, never pickled. ``<run>`` is the fedpeft run id the server sends
(``fedpeft.run``: kept in the server's checkpoint, so a resumed server finds its clients' files again; Flower's own run
id changes with every ``flwr run``). The file holds two versions of the personal state::

    current/<key>    the state written after training in round  r        (metadata "round")
    previous/<key>   the state that round r started from (absent if r was the client's first round)

and its metadata stamps it: ``format``, ``version``, ``run``, ``partition``, ``method``, ``frozen-sha256`` (the frozen
backbone's fingerprint, :func:`~fedpeft.flower.frozen_fingerprint`), ``round``, ``previous-round``.

A training message for round t (0-based, the protocol's round) is answered from:

- ``t > r``: ``current`` (the normal case; a restarted node continues from its last completed round);
- ``t == r``: ``previous`` (a *redo*: the server resumed from its checkpoint of round t − 1 and sends round t again;
  training is deterministic, so the redo writes the same ``current`` an uninterrupted run would hold);
- ``t < r``: refused (:class:`~fedpeft.flower.node.StaleMessage`): a late message never rolls newer state back.

A file whose stamp names another run, partition, method or frozen backbone, whose format is unknown, or whose tensors
do not fit the model (keys, shapes, non-finite values) is refused with :class:`NodeStateError` naming the file and the
field: it is never silently reinitialised (move or delete the file to start that client afresh).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

from safetensors import SafetensorError, safe_open
from torch import Tensor

from .._checks import check_state
from .._integrity import FolderLock, content_digest, remove_leftovers, write_safetensors
from .node import StaleMessage

__all__ = ["NodeState", "NodeStateError", "StoredState", "run_folder_name", "state_dir_of"]

FORMAT = "fedpeft.node-state"
VERSION = "2"  # 2: the header carries "sha256" over header and tensors; version 1 (0.2.0) is read with a warning
log = logging.getLogger("fedpeft.flower")
CURRENT, PREVIOUS = "current/", "previous/"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class NodeStateError(ValueError):
    """A state file that does not belong to this client, run, method or backbone, or is unreadable."""


def run_folder_name(run: str) -> str:
    """The folder name of fedpeft run ``run``: ``run`` itself if it is a safe file name (letters, digits, ``._-``,
    at most 64 characters, not starting with a dot), else ``run-<first 16 hex digits of sha256(run)>``."""
    if not isinstance(run, str) or not run:
        raise TypeError(f"run must be a non-empty str, got {type(run).__name__} {run!r}")
    return run if _SAFE.match(run) else "run-" + hashlib.sha256(run.encode()).hexdigest()[:16]


@dataclass
class StoredState:
    """What a client's file holds: ``current`` (written in ``round``) and ``previous`` (``previous_round``; ``None``
    when ``round`` was the client's first training round)."""

    round: int
    current: Dict[str, Tensor]
    previous: Optional[Dict[str, Tensor]]
    previous_round: Optional[int]


def _round_field(value: Optional[str], name: str, path: Path) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        r = int(value)
    except ValueError:
        raise NodeStateError(f"{path}: metadata {name!r} must be an integer, got {value!r}") from None
    if r < 0:
        raise NodeStateError(f"{path}: metadata {name!r} must be >= 0, got {r}")
    return r


class NodeState:
    """One client's personal-state file (see the module docstring).

    Args:
        state_dir: the node's state folder (created if missing).
        run: the fedpeft run id (``fedpeft.run`` in the server's messages).
        partition: the client's partition id.
        method: the protocol's name.
        fingerprint: the frozen backbone's fingerprint (:func:`~fedpeft.flower.frozen_fingerprint`).
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
        self.path = Path(state_dir) / "fedpeft" / "personal" / run_folder_name(run) / f"partition-{partition}.safetensors"

    def __repr__(self) -> str:
        return f"NodeState({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.is_file()

    # ---- reading --------------------------------------------------------------------------------------------------
    def _stamp(self) -> Dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "run": self.run, "partition": str(self.partition),
                "method": self.method, "frozen-sha256": self.fingerprint}

    def load(self, like: Mapping[str, Tensor]) -> Optional[StoredState]:
        """The stored state cast like ``like`` (the model's personal parameters), or ``None`` if there is no file.

        Raises:
            NodeStateError: the file is unreadable, from another run/partition/method/backbone or format, or its
                tensors do not have exactly ``like``'s keys and shapes, or hold non-finite values.
        """
        if not self.path.is_file():
            if self.path.exists() or self.path.is_symlink():
                raise NodeStateError(f"{self.path}: not a regular file")
            return None
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise NodeStateError(f"{self.path}: not a readable safetensors file ({e}); move it away to start this "
                                 "client afresh") from None
        if meta.get("format") != FORMAT:
            raise NodeStateError(f"{self.path}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("version") not in (VERSION, "1"):
            raise NodeStateError(f"{self.path}: format version {meta.get('version')!r} is unknown (this fedpeft "
                                 f"reads version {VERSION})")
        if meta.get("version") == "1" and "sha256" not in meta:
            log.warning("%s: a version-1 state file (fedpeft 0.2.0) has no sha256; its content is not verified",
                        self.path)
        elif content_digest({k: v for k, v in meta.items() if k != "sha256"}, tensors) != meta.get("sha256"):
            raise NodeStateError(f"{self.path}: its tensors or header do not match its sha256 (edited or damaged); "
                                 "move it away to start this client afresh")
        for field, want in self._stamp().items():
            if field == "version":
                continue
            if meta.get(field) != want:
                got = meta.get(field)
                what = "frozen backbone" if field == "frozen-sha256" else field
                raise NodeStateError(
                    f"{self.path}: the file's {what} is {got!r}, this client's {want!r}; refusing to use or overwrite "
                    "it (move or delete it to start this client afresh)"
                )
        round_ = _round_field(meta.get("round"), "round", self.path)
        prev_round = _round_field(meta.get("previous-round"), "previous-round", self.path)
        if round_ is None:
            raise NodeStateError(f"{self.path}: metadata has no 'round'")
        current = {k[len(CURRENT):]: v for k, v in tensors.items() if k.startswith(CURRENT)}
        previous = {k[len(PREVIOUS):]: v for k, v in tensors.items() if k.startswith(PREVIOUS)}
        stray = [k for k in tensors if not k.startswith((CURRENT, PREVIOUS))]
        if stray:
            raise NodeStateError(f"{self.path}: unexpected tensors {sorted(stray)[:5]}")
        if prev_round is not None and prev_round >= round_:
            raise NodeStateError(f"{self.path}: previous-round {prev_round} is not before round {round_}")
        out = {}
        for name, state in (("current", current), ("previous", previous)):
            if name == "previous" and prev_round is None:
                if state:
                    raise NodeStateError(f"{self.path}: 'previous' tensors without a previous-round")
                out[name] = None
                continue
            try:
                check_state(state, like=like, finite=True, name=f"{self.path} [{name}]")
            except (TypeError, ValueError) as e:
                raise NodeStateError(str(e)) from None
            for k, v in state.items():
                if v.is_floating_point() != like[k].is_floating_point():
                    raise NodeStateError(f"{self.path} [{name}][{k!r}]: stored as {v.dtype}, the model's is "
                                         f"{like[k].dtype}")
            out[name] = {k: v.to(dtype=like[k].dtype, device=like[k].device) if v.is_floating_point() else v
                         for k, v in state.items()}
        return StoredState(round_, out["current"], out["previous"], prev_round)

    def start_state(self, round_: int, like: Mapping[str, Tensor]) -> Tuple[Optional[Dict[str, Tensor]], bool]:
        """``(personal state to train round round_ from, redo)``: ``None`` means the model's initial values.

        Raises:
            StaleMessage: the file is from a later round than ``round_``.
            NodeStateError: see :meth:`load`.
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

    def deployed_state(self, like: Mapping[str, Tensor]) -> Tuple[Optional[Dict[str, Tensor]], Optional[int]]:
        """``(latest personal state, its round)`` for evaluation; ``(None, None)`` if the client has none yet."""
        stored = self.load(like)
        return (None, None) if stored is None else (stored.current, stored.round)

    def stored_round(self) -> Optional[int]:
        """The round of the stored state (header only; ``None`` without a file). Raises :class:`NodeStateError` on a
        file of another run, partition, method or backbone."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise NodeStateError(f"{self.path}: not a readable safetensors file ({e})") from None
        for field, want in self._stamp().items():
            if meta.get(field) != want and field != "version":
                raise NodeStateError(f"{self.path}: the file's {field} is {meta.get(field)!r}, this client's {want!r}")
        return _round_field(meta.get("round"), "round", self.path)

    # ---- writing --------------------------------------------------------------------------------------------------
    def save(self, round_: int, personal: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> None:
        """Store ``personal`` as trained in ``round_`` (atomically; see the module docstring for ``previous``).

        Raises:
            StaleMessage: the file already holds a later round.
            NodeStateError: the existing file is not this client's (see :meth:`load`).
            ValueError: ``personal`` does not have ``like``'s keys and shapes, or holds non-finite values (nothing is
                written then).
        """
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise ValueError(f"round must be an int >= 0, got {round_!r}")
        check_state(personal, like=like, finite=True, name="personal")
        # one writer at a time per client file (two node processes on one state-dir wait for each other)
        with FolderLock(self.path.parent, what="client state folder", name=None, wait=True):
            self._save_locked(round_, personal, like)

    def _save_locked(self, round_: int, personal: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> None:
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
        tensors = {CURRENT + k: v.detach().to("cpu").contiguous().clone() for k, v in personal.items()}
        if previous is not None:
            tensors.update({PREVIOUS + k: v.detach().to("cpu").contiguous().clone() for k, v in previous.items()})
        meta = {**self._stamp(), "round": str(round_), "previous-round": "" if prev_round is None else str(prev_round)}
        meta["sha256"] = content_digest(meta, tensors)
        remove_leftovers(self.path.parent, self.path.name)  # what a killed writer of this file left
        write_safetensors(self.path, tensors, meta)

    def describe(self) -> str:
        """A one-line JSON description of the stamp (for logs)."""
        return json.dumps({**self._stamp(), "path": str(self.path)})


def state_dir_of(node_config: Mapping[str, object], default: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The node's state folder: ``node_config["state-dir"]`` if set (non-empty), else ``default`` (``None``: none).

    Raises:
        TypeError: ``node_config["state-dir"]`` is not a string.
    """
    value = node_config.get("state-dir") if isinstance(node_config, Mapping) else None
    if value is None or value == "":
        return None if default is None or str(default) == "" else Path(default).expanduser()
    if not isinstance(value, str):
        raise TypeError(f"node_config['state-dir'] must be a path string, got {type(value).__name__} {value!r}")
    return Path(value).expanduser()
