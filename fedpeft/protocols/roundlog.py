"""The round log: every finished round on disk as it finishes, one JSON line each, and on TensorBoard when installed.

    log = RoundLog("results/run/rounds.jsonl")        # Federation(..., round_log=log); server_app(..., round_log=...)
    log.append(record)                                 # a RoundRecord (or any JSON-able mapping)
    RoundLog.read("results/run/rounds.jsonl")          # -> [dict, ...], one per finished round

Each :meth:`RoundLog.append` appends one line to the file (opened for append) in one ``write`` and fsyncs it: O(1)
per round, and ``tail -f`` follows it. A run killed in the middle of a write can leave half a line at the end; the
next ``RoundLog(path, append=True)`` (a resumed run) cuts it off, and :meth:`RoundLog.reset` rewrites it from the
checkpoint's history, so the log holds every round exactly once (:class:`~fedpeft.protocols.RoundBook`).

TensorBoard: when the ``tensorboard`` package is installed (``pip install "fedpeft[tensorboard]"``) and
``tensorboard`` is not ``False``, every round also goes to ``torch.utils.tensorboard.SummaryWriter`` in
``<log path>.tb/`` (or the folder given): ``accuracy/mean``, ``accuracy/worst``, ``accuracy/client_<n>``,
``train_loss/mean``, ``replies/accepted``, ``replies/rejected``, ``wall_s``, ``server/<name>`` for every number
in the server's diagnostics (pFedPG: ``server/retention``, ``server/residual``, ``server/drift``, ``server/steps``,
``server/spread``), and ``privacy/epsilon`` under DP (a finite ε only), at step = the round (0-based).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .. import _atomic
from .records import RoundRecord

__all__ = ["RoundLog"]

PathLike = Union[str, Path]


def _summary_writer(logdir: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``logdir``, or ``None`` when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(logdir))


def _line(row: Mapping[str, Any]) -> bytes:
    return (json.dumps(row, allow_nan=True, default=str, separators=(",", ":")) + "\n").encode()


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class RoundLog:
    """Append-only JSON-lines log of rounds, each line written atomically with fsync (see the module docstring).

    Args:
        path: the ``.jsonl`` file; its folder is created.
        append: keep the lines already in ``path`` (a resumed run) instead of starting an empty log.
        tensorboard: ``None`` (default): also write TensorBoard events when the package is installed; ``True``: require
            it (``ImportError`` if missing); ``False``: never; a path: the events' folder (implies ``True``).
    """

    def __init__(self, path: PathLike, *, append: bool = False,
                 tensorboard: Union[bool, PathLike, None] = None) -> None:
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append or not self.path.exists():
            self._rewrite(b"")
        else:
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # half a line from a writer killed mid-way
                self._rewrite(data[:data.rfind(b"\n") + 1])
        self.writer: Any = None
        if tensorboard is not False:
            logdir = Path(f"{self.path}.tb") if tensorboard in (None, True) else Path(tensorboard)  # type: ignore[arg-type]
            self.writer = _summary_writer(logdir)
            if self.writer is None and tensorboard is not None:
                raise ImportError('tensorboard=True needs the tensorboard package: pip install "fedpeft[tensorboard]"')

    def _rewrite(self, data: bytes) -> None:
        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        _atomic.remove_stale(self.path.parent, self.path.name)
        _atomic.replace(_atomic.write_temp(self.path, fill), self.path)

    def append(self, record: Union[RoundRecord, Mapping[str, Any]]) -> Dict[str, Any]:
        """Add one round (a :class:`RoundRecord`, or a JSON-able mapping) as one fsync'ed line; returns its dict."""
        row = record.as_dict() if isinstance(record, RoundRecord) else dict(record)
        with open(self.path, "ab") as f:
            f.write(_line(row))
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            self._tensorboard(row)
        return row

    def reset(self, records: Sequence[Union[RoundRecord, Mapping[str, Any]]]) -> None:
        """Rewrite the log atomically to hold exactly ``records``, one line each: a resumed engine passes its
        checkpoint's history, so the log holds every round exactly once wherever the last run was killed."""
        rows = [r.as_dict() if isinstance(r, RoundRecord) else dict(r) for r in records]
        self._rewrite(b"".join(_line(row) for row in rows))

    def _tensorboard(self, row: Mapping[str, Any]) -> None:
        step = int(row.get("round", 0))
        deployed = [a for a in (row.get("deployed") or []) if _number(a) is not None]
        scalars: Dict[str, Optional[float]] = {
            "accuracy/mean": sum(deployed) / len(deployed) if deployed else None,
            "accuracy/worst": min(deployed) if deployed else None,
            "replies/accepted": float(len(row.get("accepted", []))),
            "replies/rejected": float(len(row.get("rejected", []))),
            "wall_s": _number(row.get("wall_s")),
        }
        if isinstance(row.get("privacy"), Mapping):
            scalars["privacy/epsilon"] = _number(row["privacy"].get("epsilon"))
        losses = [v for v in (row.get("train_loss") or {}).values() if _number(v) is not None]
        scalars["train_loss/mean"] = sum(losses) / len(losses) if losses else None
        for n, a in enumerate(row.get("deployed") or []):
            scalars[f"accuracy/client_{n}"] = _number(a)
        for name, v in (row.get("diagnostics") or {}).items():  # the server's scalar diagnostics, lists left out
            scalars[f"server/{name}"] = _number(v)
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (the JSON lines need no closing: each is on disk when append returns)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @staticmethod
    def read(path: PathLike) -> List[Dict[str, Any]]:
        """Every round in the log at ``path``, in order (``json.loads`` of each line).

        Raises:
            ValueError: a line is not a JSON object; names the file and the line.
        """
        rows = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line of the round log ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
