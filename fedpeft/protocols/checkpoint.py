"""Server checkpoints, engine-agnostic: a whole run's server side in one safetensors file and one JSON file.

After every round an engine (the in-process :class:`~fedpeft.protocols.Federation`, Flower's ``ProtocolStrategy``)
writes a :class:`Checkpoint`: the number of completed rounds, the server's tensors (``server.state_dict()``: the
shared state, or pFedPG's generator and optimizer state; the in-process engine adds its clients' personal states) and
a JSON-ready ``meta`` (the server's own meta, the run id, method, seed, sampling fraction, registry by partition,
history of round records). On disk, in ``directory``::

    tensors-r<round>.safetensors     the tensors (metadata: format, round, run)
    checkpoint.json                  meta + {"format", "version", "round", "run", "tensors": file name, "sha256",
                                     "meta-sha256": SHA-256 of the rest of this JSON}

Writing is crash-safe: the tensor file of round r is written atomically first (temporary file, fsync, rename, fsync
of the folder; :mod:`fedpeft._atomic`), then ``checkpoint.json`` is replaced atomically — the commit point — and only
then the previous round's tensor file is deleted. A process killed at any instant leaves either round r − 1's pair
or round r's, both complete. Reading verifies the JSON's ``sha256`` of the tensor file, the
``meta-sha256`` of the JSON itself (so the tensors and the meta are both covered), the round and run stamped in both
files, and refuses an unknown format version, a ``checkpoint.json`` that is a dangling link or a folder, and a
``checkpoint_dir`` that is a file. One writer per folder: :func:`claim_folder` locks it (a second server is refused
with the first one's pid and host) and deletes what a killed writer left behind. No pickle anywhere; floats in JSON round-trip exactly
(``repr``), NaN/Inf are written as ``{"float": "nan"}``.

Resuming from round r: sampling is a pure function of (seed, round) (:func:`~fedpeft.protocols.sample_clients`),
so the sampling position is the round itself; the engines check that the seed, fraction, method and number of
clients match (:func:`check_matches`) before loading anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from torch import Tensor

from .. import _atomic
from .._integrity import FolderLock, remove_leftovers
from .._stamped import read_stamped, write_stamped

__all__ = ["Checkpoint", "CheckpointError", "check_matches", "claim_folder", "load_checkpoint", "save_checkpoint"]

FORMAT = "fedpeft.server-checkpoint"
VERSION = 2  # 2: checkpoint.json carries meta-sha256; version 1 (fedpeft 0.2.0) is read with a warning
JSON_NAME = "checkpoint.json"
log = logging.getLogger("fedpeft.protocols")


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, damaged, or belongs to another run or configuration."""


@dataclass
class Checkpoint:
    """One engine's whole server side after ``round`` completed rounds.

    Attributes:
        round: completed rounds (the next round to run has 0-based index ``round``).
        run: the run id (stable across resumes; clients' state files are kept per run).
        tensors: ``{name: tensor}`` (CPU; any dtype safetensors holds).
        meta: JSON-ready data (dicts with str keys, lists, str, int, float, bool, None).
    """

    round: int
    run: str
    tensors: Dict[str, Tensor] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be str for JSON, got {type(k).__name__} {k!r}")
            out[k] = _encode(v, f"{where}[{k!r}]")
        if set(out) == {"float"}:
            raise TypeError(f"{where}: a dict with the single key 'float' is reserved")
        return out
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} cannot be written as JSON")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"float"} and isinstance(value["float"], str):
            return float(value["float"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_name(round_: int) -> str:
    return f"tensors-r{round_:06d}.safetensors"


def _doc_sha256(doc: Mapping[str, Any]) -> str:
    """SHA-256 of ``checkpoint.json``'s content (canonical JSON) without its own ``meta-sha256`` field."""
    body = {k: v for k, v in doc.items() if k != "meta-sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _folder(directory: Union[str, Path]) -> Path:
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint_dir {directory} exists and is not a folder")
    return directory


def claim_folder(directory: Union[str, Path]) -> FolderLock:
    """Lock ``directory`` for this writer (:class:`~fedpeft._integrity.FolderLock`) and delete what a killed writer
    left there: temporary files, and tensor files ``checkpoint.json`` does not name. Keep the lock while writing.

    Raises:
        RuntimeError: another process (or another engine in this one) writes the folder: names its pid and host.
        CheckpointError: ``directory`` is a file.
    """
    directory = _folder(directory)
    lock = FolderLock(directory, what="checkpoint folder")
    remove_leftovers(directory)
    path = directory / JSON_NAME
    try:
        keep = _read_json(path).get("tensors") if path.is_file() else None
    except CheckpointError:
        keep = None  # a damaged checkpoint: leave every tensor file for the operator
        if path.exists():
            return lock
    for orphan in directory.glob("tensors-r*.safetensors"):
        if orphan.name != keep:
            orphan.unlink()
    return lock


def save_checkpoint(directory: Union[str, Path], checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``directory`` (created if missing) crash-safely; returns the JSON file's path.

    Raises:
        TypeError: a tensor is not a ``torch.Tensor``, or ``meta`` holds something JSON cannot (nothing is written).
        ValueError: ``round`` is not an int >= 0 or ``run`` is empty.
    """
    if not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"checkpoint must be a Checkpoint, got {type(checkpoint).__name__}")
    r = checkpoint.round
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"checkpoint.round must be an int >= 0, got {r!r}")
    if not isinstance(checkpoint.run, str) or not checkpoint.run:
        raise ValueError(f"checkpoint.run must be a non-empty str, got {checkpoint.run!r}")
    for k, v in checkpoint.tensors.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(f"checkpoint.tensors must map str to torch.Tensor, got {type(k).__name__} -> "
                            f"{type(v).__name__}")
    meta = _encode(dict(checkpoint.meta), "checkpoint.meta")
    directory = _folder(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final_json = directory / JSON_NAME
    old = _read_json(final_json) if final_json.is_file() else None
    name = _tensor_name(r)
    tensor_path = directory / name
    write_stamped(tensor_path, checkpoint.tensors,
                  {"format": FORMAT, "version": str(VERSION), "round": str(r), "run": checkpoint.run})
    doc = {"format": FORMAT, "version": VERSION, "round": r, "run": checkpoint.run, "tensors": name,
           "sha256": _sha256(tensor_path), "meta": meta}
    doc["meta-sha256"] = _doc_sha256(doc)
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    _atomic.remove_stale(directory, JSON_NAME)

    def write(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic.replace(_atomic.write_temp(final_json, write), final_json)
    if old is not None and isinstance(old.get("tensors"), str) and old["tensors"] != name:
        stale = directory / Path(old["tensors"]).name
        if stale.is_file():
            stale.unlink()
            _atomic.fsync_dir(directory)
    return final_json


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def load_checkpoint(directory: Union[str, Path]) -> Optional[Checkpoint]:
    """The checkpoint in ``directory``, or ``None`` if it holds none (no ``checkpoint.json``).

    Raises:
        CheckpointError: an unknown format or version, a tensor file that is missing, damaged (sha256) or stamped with
            another round or run, or unreadable JSON.
    """
    directory = _folder(directory)
    path = directory / JSON_NAME
    if not path.is_file():
        if path.exists() or path.is_symlink():
            raise CheckpointError(f"{path} is not a regular file (a dangling link or a folder?); refusing to start "
                                  "the run afresh over it")
        return None
    doc = _read_json(path)
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {doc.get('format')!r} is not {FORMAT!r}")
    if doc.get("version") not in (1, VERSION):
        raise CheckpointError(f"{path}: format version {doc.get('version')!r} is unknown (this fedpeft reads "
                              f"version {VERSION})")
    r, run, name = doc.get("round"), doc.get("run"), doc.get("tensors")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise CheckpointError(f"{path}: 'round' must be an int >= 0, got {r!r}")
    if not isinstance(run, str) or not run:
        raise CheckpointError(f"{path}: 'run' must be a non-empty string, got {run!r}")
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{path}: 'tensors' must be a file name in the same folder, got {name!r}")
    tensor_path = directory / name
    if not tensor_path.is_file():
        raise CheckpointError(f"{path}: its tensor file {name} is missing")
    if _sha256(tensor_path) != doc.get("sha256"):
        raise CheckpointError(f"{tensor_path}: sha256 differs from the one {JSON_NAME} recorded (damaged file)")
    _, tensors = read_stamped(tensor_path, {"format": FORMAT, "round": str(r), "run": run}, error=CheckpointError,
                              names={"round": "stamped round", "run": "stamped run"}, checksum=False,
                              hint=f" ({JSON_NAME} says round {r} run {run!r})")  # the JSON's sha256 covers the file
    if doc.get("version") == 1 and "meta-sha256" not in doc:
        log.warning("%s: a version-1 checkpoint (fedpeft 0.2.0) has no meta-sha256; its meta is not verified", path)
    elif doc.get("meta-sha256") != _doc_sha256(doc):
        raise CheckpointError(f"{path}: its content does not match its meta-sha256 (edited or damaged; history, "
                              "server meta and registry are not trusted)")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: 'meta' must be a JSON object, got {type(meta).__name__}")
    return Checkpoint(round=r, run=run, tensors=tensors, meta=_decode(meta))


def check_matches(checkpoint: Checkpoint, **expected: Any) -> None:
    """Refuse to resume a run configured differently: every ``expected`` key must equal ``checkpoint.meta[key]``.

    Raises:
        CheckpointError: names the first key that differs, with both values.
    """
    for key, want in expected.items():
        got = checkpoint.meta.get(key)
        if key == "frozen-sha256" and key not in checkpoint.meta:  # a checkpoint of fedpeft 0.2.0
            log.warning("the checkpoint of run %r has no frozen-backbone fingerprint (fedpeft 0.2.0); not checked",
                        checkpoint.run)
            continue
        if got != want:
            raise CheckpointError(f"the checkpoint of run {checkpoint.run!r} (round {checkpoint.round}) has "
                                  f"{key} = {got!r}, this run {want!r}; resume with the same configuration or use "
                                  "another checkpoint folder")
