"""A run's JSON report: per-client accuracies and curves, costs, every round's record, and how the run ended.

:func:`method_report` is the benchmark's per-method record of a run (any engine); :func:`write_report` writes it
atomically and durably (:mod:`fedpeft._atomic`), so a reader or a crash sees the old report or the new one;
:func:`failure_report` is the report of a run that raised; :func:`report_path` resolves where it goes. Flower's
``server_app`` rewrites it after every round. See docs/flower.md.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

from .. import _atomic, fed
from .protocol import Protocol
from .records import RoundRecord
from .server import Server

__all__ = ["failure_report", "method_report", "report_path", "write_report"]

DEFAULT_REPORT_DIR = "fedpeft-reports"


def report_path(configured: Optional[str], run_id: Any) -> Path:
    """The report's absolute path: ``configured`` (from the working folder), else ``fedpeft-reports/<run_id>.json``."""
    if configured:
        return Path(configured).expanduser().absolute()
    return (Path(DEFAULT_REPORT_DIR) / f"{run_id}.json").absolute()


def failure_report(method: str, error: BaseException, partial: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The report of a run that raised ``error``: ``"status": "failed"``, ``error``, ``traceback``, and the
    ``partial`` report of the finished rounds."""
    out: Dict[str, Any] = dict(partial or {"name": method})
    out.update(status="failed", error=f"{type(error).__name__}: {error}",
               traceback="".join(traceback.format_exception(type(error), error, error.__traceback__))[-4000:])
    return out


def method_report(method: Protocol, server: Server, history: List[RoundRecord], model: nn.Module, wall_s: float,
                  engine: Dict[str, Any]) -> Dict[str, Any]:
    """The benchmark's per-method record (``name``, ``accuracy`` per client after the last round, ``curve``,
    ``curve_clients``, ``trainable``, ``communicated``, ``server``, ``wall_s``, ``personal_keys``) plus ``rounds``
    (``RoundRecord.as_dict()`` of every round) and ``engine``. A client missing from an evaluation is ``null``."""
    curve_clients = [list(r.deployed or []) for r in history]
    trainable = fed.trainable_state(model)
    upload = {k: v for k, v in trainable.items() if k in set(method.upload_keys(model))}
    return {"name": method.name, "accuracy": curve_clients[-1] if curve_clients else [],
            "curve": [r.mean for r in history], "curve_clients": curve_clients,
            "trainable": fed.num_params(trainable), "communicated": fed.num_params(upload),
            "communicated_bytes": fed.num_bytes(upload), "server": server.own_params, "wall_s": wall_s,
            "personal_keys": list(method.personal_keys(model)), "rounds": [r.as_dict() for r in history],
            "engine": dict(engine)}


def write_report(path: Union[str, Path], report: Dict[str, Any]) -> Path:
    """Write ``report`` as JSON to ``path`` atomically and durably (:mod:`fedpeft._atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")

    _atomic.replace(_atomic.write_temp(path, fill), path)
    return path


