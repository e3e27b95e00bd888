"""The server side: a Flower ``ServerApp`` that runs one fedpeft method and writes the per-client report.

    app = server_app("FedVPT", build_model, num_partitions=3, num_rounds=5, report="results/flower.json")

``main(grid, context)`` builds the model with ``build_model(context)`` under ``torch.manual_seed(seed)`` (so the
server's initial shared state, and pFedPG's generator, are what the in-process engine starts from), runs a
:class:`~fedpeft.flower.ProtocolStrategy`, and after every round rewrites the report (:func:`method_report`, written
atomically with fsync): per-client accuracies after the latest round, the per-round mean and per-client curves,
parameter counts, and every round's record (accepted, rejected with reasons, ...). ``round_log`` appends each round's
record as one JSON line (:class:`~fedpeft.protocols.RoundLog`).

``run_config`` (``[tool.flwr.app.config]`` of the app, or ``flwr run --run-config``) overrides the arguments:
``num-server-rounds``, ``num-partitions``, ``fraction-train``, ``fraction-evaluate``, ``seed``, ``round-timeout``,
``registration-timeout``, ``report-path``, ``round-log-path``, ``checkpoint-dir``, ``run-name``, ``probe-timeout``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from .. import _atomic, fed
from ..protocols import PFedPGServer, Protocol
from ..protocols import get as get_protocol
from .deployment import FastGrid, failure_report, report_path
from .registry import discover_partitions
from .strategy import ProtocolStrategy

__all__ = ["method_report", "server_app", "write_report"]

log = logging.getLogger("fedpeft.flower")


def method_report(strategy: ProtocolStrategy, model: nn.Module, wall_s: float) -> Dict[str, Any]:
    """The benchmark's per-method record (``name``, ``accuracy`` per client after the last round, ``curve``,
    ``curve_clients``, ``trainable``, ``communicated``, ``server``, ``wall_s``, ``personal_keys``) plus ``rounds``
    (``RoundRecord.as_dict()`` of every round) and ``engine``. A client missing from an evaluation is ``null``."""
    import flwr

    method: Protocol = strategy.method
    curve_clients = [list(r.deployed or []) for r in strategy.history]
    curve = [r.mean for r in strategy.history]
    trainable = fed.num_params(fed.trainable_state(model))
    upload = {k: v for k, v in fed.trainable_state(model).items() if k in set(method.upload_keys(model))}
    server_params = sum(p.numel() for p in strategy.server.generator.parameters()) \
        if isinstance(strategy.server, PFedPGServer) else 0
    return {
        "name": method.name,
        "accuracy": curve_clients[-1] if curve_clients else [],
        "curve": curve,
        "curve_clients": curve_clients,
        "trainable": trainable,
        "communicated": fed.num_params(upload),
        "communicated_bytes": fed.num_bytes(upload),
        "server": server_params,
        "wall_s": wall_s,
        "personal_keys": list(method.personal_keys(model)),
        "rounds": [r.as_dict() for r in strategy.history],
        "engine": {"name": "flower", "flwr": flwr.__version__},
    }


def write_report(path: Union[str, Path], report: Dict[str, Any]) -> Path:
    """Write ``report`` as JSON to ``path`` atomically and durably (:mod:`fedpeft._atomic`: a temporary file beside
    it, fsync'ed, renamed over it, the folder fsync'ed): a reader or a crash sees the old report or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")

    _atomic.replace(_atomic.write_temp(path, fill), path)
    return path


def server_app(
    method: Any,
    build_model: Callable[[Context], nn.Module],
    *,
    num_partitions: Optional[int] = None,
    num_rounds: int = 3,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 1.0,
    seed: int = 0,
    round_timeout: float = 3600.0,
    registration_timeout: float = 600.0,
    report: Optional[Union[str, Path]] = None,
    round_log: Optional[Union[str, Path]] = None,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    on_round: Optional[Callable[[Any], None]] = None,
    on_report: Optional[Callable[[Dict[str, Any]], None]] = None,
    **strategy_options: Any,
) -> ServerApp:
    """A ``ServerApp`` running ``method`` (see the module docstring).

    Args:
        method: a protocol or a method name (``fedpeft.protocols.METHODS``).
        build_model: ``build_model(context) -> model``, the same builder as the clients'.
        num_partitions: C (or ``num-partitions`` in the run config; neither: as the nodes' ``node_config`` says).
        report: path of the JSON report (or ``report-path`` in the run config), rewritten after every round
            (``"status": "running"``) and at the end: ``"completed"``, or ``"failed"`` with the ``error`` when the
            run raised (the report is written, then the error re-raised: ``flwr ls`` shows it too). ``{run_id}`` is
            replaced by the run's id; a relative path is taken from the ServerApp's working folder, and the absolute
            path is printed at the end. ``None`` or ``""`` writes none.
        round_log: path of the JSON-lines round log (or ``round-log-path``); ``None`` writes none.
        checkpoint_dir: the server's checkpoint folder (or ``checkpoint-dir``): written after every round; a
            ServerApp started again with the same folder (after a crash of the ServerApp or the SuperLink) resumes
            from it and runs the rounds that are left (:mod:`.resume`). ``run-name`` in the run config names the
            run the nodes file their personal state under (default: the checkpoint's, else Flower's run id).
        on_round: called with each round's :class:`~fedpeft.protocols.RoundRecord` after the report (and the
            checkpoint) are written.
        on_report: called with the report dict when the run ends (e.g. to collect it in-process).
        strategy_options: passed to :class:`ProtocolStrategy` (e.g. ``min_nodes``, ``check_frozen``,
            ``server_seed``).
    """
    protocol = get_protocol(method)
    if "generator_seed" in strategy_options:  # the 0.1 name (PFedPGStrategy's)
        strategy_options["server_seed"] = strategy_options.pop("generator_seed")
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = FastGrid(grid)  # replies pulled every 0.2 s, not Flower's 3 s
        cfg = context.run_config
        configured = cfg.get("report-path", None if report is None else str(report))
        path = report_path(str(configured).format(run_id=context.run_id), context.run_id) if configured else None
        strategy, model, t0 = None, None, time.perf_counter()
        try:
            parts = int(cfg.get("num-partitions", num_partitions or 0))
            reg_timeout = float(cfg.get("registration-timeout", registration_timeout))
            answered: list = []  # the discovery's replies register those nodes (no second query)
            if parts < 1:  # not given: as the nodes' node_config says (the simulation sets it)
                parts = discover_partitions(grid, timeout=reg_timeout, replies=answered)
            run_seed = int(cfg.get("seed", seed))
            t0 = time.perf_counter()
            torch.manual_seed(run_seed)
            model = build_model(context)
            log_path = cfg.get("round-log-path", None if round_log is None else str(round_log))

            def each_round(record: Any) -> None:
                if path:
                    write_report(path, {**method_report(strategy, model, time.perf_counter() - t0),
                                        "status": "running"})
                if on_round is not None:
                    on_round(record)

            strategy = ProtocolStrategy(protocol, model, num_partitions=parts, seed=run_seed,
                                        fraction_train=float(cfg.get("fraction-train", fraction_train)),
                                        fraction_evaluate=float(cfg.get("fraction-evaluate", fraction_evaluate)),
                                        registration_timeout=reg_timeout, on_round=each_round,
                                        round_log=log_path or None,
                                        checkpoint_dir=cfg.get("checkpoint-dir", None if checkpoint_dir is None
                                                               else str(checkpoint_dir)) or None,
                                        **({"run_name": str(cfg["run-name"])} if cfg.get("run-name") else {}),
                                        **({"probe_timeout": float(cfg["probe-timeout"])} if "probe-timeout" in cfg
                                           else {}),
                                        **{"one_message": bool(cfg.get("one-message", True)), **strategy_options})
            if answered:
                strategy.registry.add(answered)
            strategy.start(grid, num_rounds=int(cfg.get("num-server-rounds", num_rounds)),
                           timeout=float(cfg.get("round-timeout", round_timeout)))
            result = {**method_report(strategy, model, time.perf_counter() - t0), "status": "completed"}
        except Exception as e:
            partial = method_report(strategy, model, time.perf_counter() - t0) if strategy is not None else None
            result = failure_report(protocol.name, e, partial)
            if path is not None:
                write_report(path, result)
                print(f"fedpeft: the run FAILED ({result['error']}); report: {path}", flush=True)
            raise
        if path is not None:
            write_report(path, result)
            log.info("wrote %s", path)
            print(f"fedpeft: report written to {path}", flush=True)
        if on_report is not None:
            on_report(result)

    return app
