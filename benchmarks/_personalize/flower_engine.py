"""``--engine flower``: the same methods, run by Flower's simulation runtime (Ray), one virtual SuperNode per client.

One Ray start for the whole run: a single ``ServerApp`` runs the methods one after another (each with its own
``fedpeft.flower`` strategy, exactly the in-process engine's model, protocol, trainer, seed and sampling), and a single
``ClientApp`` routes each message to that method's ``fedpeft.flower.ClientHandlers`` by the method name the server puts
in every message. Each virtual SuperNode gets 1 CPU and trains with 1 torch thread; its personal state lives in its
``context.state`` (per method), its shared state comes from the server's messages. Replies are aggregated in
partition-id order, so the per-client accuracies equal ``--engine local``'s bit for bit (tests/flower).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from fedpeft.protocols import method_costs

from .methods import METHODS, Context, build_model, make_protocol
from .run import configure_process, prepare_info, prepare_seed, record_from_history
from .train import make_trainer

__all__ = ["flower_version", "run_all_flower", "run_methods_flower"]

log = logging.getLogger(__name__)


def flower_version() -> str:
    import flwr

    return flwr.__version__


def _tree_cpu_s() -> float:
    """CPU seconds used so far by this process and every live descendant (the Ray processes of the simulation)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += t.user + t.system
    return total


def run_methods_flower(names: Sequence[str], ctx: Context, rounds: int, progress: Callable,
                       round_timeout: float = 3600.0) -> List[Dict[str, Any]]:
    """Run ``names`` through Flower's simulation runtime (module docstring): the same records as
    ``run.run_method``'s, with ``cpu_s`` the CPU seconds of this process and its Ray processes during that method."""
    from flwr.app import ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedpeft.flower import ClientHandlers, ProtocolStrategy
    from fedpeft.flower.wire import CONFIG, METHOD

    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    n = len(ctx.clients)
    trainer = make_trainer(ctx.budget, ctx.backbone.preprocess)

    def handlers(name: str) -> ClientHandlers:
        def build(context, _name=name):
            return build_model(_name, ctx)

        def load(context):
            client = ctx.clients[int(context.node_config["partition-id"])]
            return client.train, client.test

        return ClientHandlers(make_protocol(name, ctx), build, load, trainer=trainer, threads=1)

    table: Dict[str, ClientHandlers] = {name: handlers(name) for name in names}

    def route(kind: str):
        def handle(msg, context):
            name = msg.content.config_records.get(CONFIG, ConfigRecord()).get(METHOD)
            if name not in table:
                raise ValueError(f"this ClientApp runs {sorted(table)}, the server asked for {name!r}")
            return getattr(table[name], kind)(msg, context)
        return handle

    client = ClientApp()
    client.query()(route("query"))
    client.train()(route("train"))
    client.evaluate()(route("evaluate"))

    results: List[Dict[str, Any]] = []
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        with progress(total=len(names) * rounds, unit="round") as bar:
            for name in names:
                bar.set_description(f"{name:<16}")
                t0, cpu0 = time.perf_counter(), _tree_cpu_s()
                model = build_model(name, ctx)  # seeds torch: the server's initial state (pFedPG: the generator)
                protocol = make_protocol(name, ctx)

                def tick(record) -> None:
                    bar.set_postfix(acc=f"{record.mean:.3f}")
                    bar.update(1)

                strategy = ProtocolStrategy(protocol, model, num_partitions=n, seed=ctx.seed,
                                            fraction_train=ctx.budget.fraction, on_round=tick)
                strategy.start(grid, num_rounds=rounds, timeout=round_timeout)
                costs = method_costs(strategy.method, model, strategy.server)
                results.append(record_from_history(ctx.seed, name, strategy.history, costs, ctx,
                                                   _tree_cpu_s() - cpu0, time.perf_counter() - t0))
                log.info("%s: mean accuracy %.4f", name, statistics.fmean(results[-1]["deployed"][-1]))

    # Ray workers import this package by name: put benchmarks/ on their path (the driver's sys.path is not shared)
    here = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *[p for p in paths if p != here]])
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(1, min(n, os.cpu_count() or 1)), "include_dashboard": False}}
    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=backend)
    if len(results) != len(names):
        raise RuntimeError(f"the Flower simulation ended after {len(results)} of {len(names)} methods (see its log)")
    return results


def run_all_flower(cfg, bar) -> Tuple[Dict[int, Dict[str, Any]], Dict[Tuple[int, str], Dict[str, Any]]]:
    """``run.run_all`` for ``--engine flower``: per seed (one after another) the same preparation, then every method
    through one Flower simulation."""
    configure_process(cfg.threads)

    @contextlib.contextmanager
    def shared_bar(total=None, unit=None):
        yield bar

    prepared: Dict[int, Dict[str, Any]] = {}
    records: Dict[Tuple[int, str], Dict[str, Any]] = {}
    for seed in cfg.seeds:
        data, backbone = prepare_seed(cfg, seed)
        prepared[seed] = prepare_info(cfg, seed)
        ctx = Context(backbone, data.clients, cfg.budget, seed)
        bar.set_description(f"seed {seed} (Flower)", refresh=False)
        for record in run_methods_flower(cfg.methods, ctx, cfg.budget.rounds, shared_bar):
            records[(seed, record["method"])] = record
    return prepared, records
