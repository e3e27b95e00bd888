"""The server side: a Flower ``ServerApp`` that runs one fedpeft method and keeps its per-client report.

    app = server_app("FedVPT", build_model, num_partitions=3, num_rounds=5, report="results/flower.json")

``main(grid, context)`` builds the model under ``torch.manual_seed(seed)`` (the in-process engine's initial server
state), runs a :class:`~fedpeft.flower.ProtocolStrategy` and rewrites the report after every round (atomic, fsync'ed;
``"status"``: ``running``, ``completed`` or ``failed`` with the error). The run config (``[tool.flwr.app.config]`` or
``flwr run --run-config``) overrides the arguments; its keys are :data:`RUN_CONFIG`. Replies are pulled every 0.2 s
(:class:`FastGrid`; Flower's own loop sleeps 3 s between pulls). The report: :mod:`fedpeft.protocols.report`. See
docs/flower.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Union

import flwr
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from ..protocols import get as get_protocol
from ..protocols.report import failure_report, method_report, report_path, write_report
from .registry import discover_partitions
from .strategy import ProtocolStrategy

__all__ = ["RUN_CONFIG", "FastGrid", "failure_report", "report_path", "server_app", "write_report"]

#: run-config key → (server_app argument, type); an empty string means "not set"
RUN_CONFIG: Dict[str, tuple] = {
    "num-server-rounds": ("num_rounds", int), "num-partitions": ("num_partitions", int),
    "fraction-train": ("fraction_train", float), "fraction-evaluate": ("fraction_evaluate", float),
    "seed": ("seed", int), "round-timeout": ("round_timeout", float),
    "registration-timeout": ("registration_timeout", float), "report-path": ("report", str),
    "round-log-path": ("round_log", str), "checkpoint-dir": ("checkpoint_dir", str), "run-name": ("run_name", str),
    "probe-timeout": ("probe_timeout", float), "one-message": ("one_message", bool),
}


class FastGrid:
    """A ``flwr.serverapp.Grid`` whose ``send_and_receive`` pulls replies every ``poll`` seconds (Flower: 3 s).

    Same contract as Flower's: push every message, then pull until each has a reply or ``timeout`` seconds have
    passed (``None``: wait forever); returns the replies received. Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Any, poll: float = 0.2) -> None:
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0 < poll <= 10:
            raise ValueError(f"poll must be a number of seconds in (0, 10], got {poll!r}")
        self._grid, self.poll = grid, float(poll)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: Optional[float] = None) -> Iterable[Any]:
        pending = {i for i in self._grid.push_messages(messages) if i}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll if end is None else max(0.0, min(self.poll, end - time.monotonic())))
        return replies


def _options(run_config: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """``defaults`` overridden by the run config (:data:`RUN_CONFIG`; ``""`` leaves an argument unset)."""
    given = {name: None if run_config[key] == "" else kind(run_config[key])
             for key, (name, kind) in RUN_CONFIG.items() if key in run_config}
    return {**defaults, **given}


def server_app(method: Any, build_model: Callable[[Context], nn.Module], *, num_partitions: Optional[int] = None,
               num_rounds: int = 3, fraction_train: float = 1.0, fraction_evaluate: float = 1.0, seed: int = 0,
               round_timeout: float = 3600.0, registration_timeout: float = 600.0,
               report: Optional[Union[str, Path]] = None, round_log: Optional[Union[str, Path]] = None,
               checkpoint_dir: Optional[Union[str, Path]] = None, on_round: Optional[Callable[[Any], None]] = None,
               on_report: Optional[Callable[[Dict[str, Any]], None]] = None, **strategy_options: Any) -> ServerApp:
    """A ``ServerApp`` running ``method`` (see the module docstring).

    Args:
        method: a protocol or a method name (``fedpeft.protocols.METHODS``).
        build_model: ``build_model(context) -> model``, the same builder as the clients'.
        num_partitions: C (``None`` or 0: as the nodes' ``node_config`` says).
        report: the JSON report's path (``{run_id}`` is replaced; relative: from the ServerApp's working folder; the
            absolute path is printed at the end); ``None`` or ``""``: none.
        round_log: the JSON-lines round log's path (``None``: none).
        checkpoint_dir: the server's checkpoint folder: a ServerApp started again with it resumes from it.
        on_round: called with each closed :class:`~fedpeft.protocols.RoundRecord`, after the report is written.
        on_report: called with the report dict when the run ends.
        strategy_options: passed to :class:`ProtocolStrategy` (``min_nodes``, ``check_frozen``, ``server_seed``,
            ``run_name``, ``probe_timeout``, ``one_message``, ...).
    """
    protocol = get_protocol(method)
    if "generator_seed" in strategy_options:  # the 0.1 name (PFedPGStrategy's)
        strategy_options["server_seed"] = strategy_options.pop("generator_seed")
    defaults = dict(num_partitions=num_partitions, num_rounds=num_rounds, fraction_train=fraction_train,
                    fraction_evaluate=fraction_evaluate, seed=seed, round_timeout=round_timeout,
                    registration_timeout=registration_timeout, report=None if report is None else str(report),
                    round_log=round_log, checkpoint_dir=checkpoint_dir, **strategy_options)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = FastGrid(grid)
        opt = _options(dict(context.run_config), defaults)
        path = report_path(opt["report"].format(run_id=context.run_id), context.run_id) if opt["report"] else None
        strategy, model, t0 = None, None, time.perf_counter()
        try:
            answered: list = []  # the discovery's replies register those nodes (no second query)
            parts = opt.pop("num_partitions") or discover_partitions(grid, timeout=opt["registration_timeout"],
                                                                     replies=answered)
            rounds, timeout, run_seed, _ = (opt.pop(k) for k in ("num_rounds", "round_timeout", "seed", "report"))
            t0 = time.perf_counter()
            torch.manual_seed(run_seed)
            model = build_model(context)

            def report() -> Dict[str, Any]:
                return method_report(strategy.method, strategy.server, strategy.history, model,
                                     time.perf_counter() - t0, {"name": "flower", "flwr": flwr.__version__})

            def each_round(record: Any) -> None:
                if path is not None:
                    write_report(path, {**report(), "status": "running"})
                if on_round is not None:
                    on_round(record)

            strategy = ProtocolStrategy(protocol, model, num_partitions=parts, seed=run_seed, on_round=each_round,
                                        **{k: v for k, v in opt.items() if v is not None})
            strategy.registry.add(answered)
            strategy.start(grid, num_rounds=rounds, timeout=timeout)
            result = {**report(), "status": "completed"}
        except Exception as e:
            result = failure_report(protocol.name, e, report() if strategy is not None else None)
            if path is not None:
                write_report(path, result)
                print(f"fedpeft: the run FAILED ({result['error']}); report: {path}", flush=True)
            raise
        if path is not None:
            write_report(path, result)
            print(f"fedpeft: report written to {path}", flush=True)
        if on_report is not None:
            on_report(result)

    return app
