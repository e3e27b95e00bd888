"""Running the main job: prepare a seed, run one method on it, and every (seed, method) in worker processes.

- **A seed** (:func:`prepare_seed`): its clients' data and the backbone (shipped, cached or pre-trained once), kept
  per process so several methods of one seed share them.
- **A job** (:func:`run_job`): one method on one seed, its library protocol run by the in-process engine
  ``fedpeft.protocols.Federation`` for ``budget.rounds`` rounds: per round the sampled clients (``--fraction``)
  train and reply, the server updates, every client's *deployed* model (latest shared state + own personal state;
  pFedPG: its generated prompts; FedAvg-FT: the global model fine-tuned locally) is evaluated on its own test split,
  and each participant's model right after its local training too, in the rounds ``RunConfig.measured`` names (every
  third and the last three by default; ``None`` in the record elsewhere). The engine's round history becomes the job's
  JSON-ready record in one place, :func:`record_from_history` (Flower's engine uses it too).
- **The pool** (:func:`run_all`): ``workers`` spawned processes (a fresh interpreter each), ``threads`` torch threads
  each (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set before they start). The first seed is prepared alone, then the
  others; as soon as a seed is ready its jobs are queued, those tagged ``b`` (they train the whole backbone) first.
  Results are collected by job, not by finishing order: every job is a deterministic function of (configuration,
  seed, method), so the output does not depend on scheduling. ``workers == 1`` runs everything in this process.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import queue as queue_mod
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fedpeft.protocols import Federation, RoundRecord, method_costs

from .backbone import Backbone, build_backbone
from .config import RunConfig
from .data import FederatedData, digits_federated, folder_federated
from .flops import training_flops
from .methods import Context, build_model, make_protocol, select
from .train import make_trainer

__all__ = ["configure_process", "default_workers", "prepare_info", "prepare_seed", "record_from_history", "run_all",
           "run_all_timed", "run_job", "run_method"]

Records = Dict[Tuple[int, str], Dict[str, Any]]
#: (seed, method, round, mean deployed accuracy or None in an unmeasured round) → None: progress reporting
Report = Callable[[int, str, int, Optional[float]], None]

#: (seed, data config, backbone config, cache, rebuild) → (data, backbone) already built in this process
_SEEDS: Dict[Tuple[Any, ...], Tuple[FederatedData, Backbone]] = {}
_QUEUE: Any = None  # a worker's progress queue (set by _init)
#: the method whose last round the regime pilot repeats with twice the local epochs (a fixed prompt start: FedVPT's
#: global prompts, each client's own head)
CONVERGENCE_PROBE = "FedVPT"


def configure_process(threads: int) -> None:
    """One process's torch settings: ``threads`` intra-op threads, deterministic algorithms where torch has them."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _quiet(iterable: Any = None, **_: Any) -> Any:
    return iterable


def prepare_seed(cfg: RunConfig, seed: int, progress: Optional[Callable] = None) -> Tuple[FederatedData, Backbone]:
    """The clients' data and the backbone of ``seed``; the backbone is the same for every seed, the heads are not."""
    key = (seed, cfg.data, cfg.backbone, cfg.cache, cfg.rebuild_backbone)
    if key not in _SEEDS:
        backbone = build_backbone(cfg.backbone, 0, Path(cfg.cache), seed, progress or _quiet,
                                  rebuild=cfg.rebuild_backbone)
        size = backbone.preprocess.size
        data = folder_federated(cfg.data, seed, size) if cfg.data.data else digits_federated(cfg.data, seed, size)
        backbone.num_classes = data.num_classes
        _SEEDS[key] = (data, backbone)
    return _SEEDS[key]


def prepare_info(cfg: RunConfig, seed: int) -> Dict[str, Any]:
    """:func:`prepare_seed` for a worker: builds, returns only what the report needs (picklable, small)."""
    data, backbone = prepare_seed(cfg, seed)
    return {"seed": seed, "backbone": backbone.info, "data": data.description, "clients": [c.name for c in data.clients],
            "backbone_params": sum(p.numel() for p in backbone.make().parameters())}


def record_from_history(seed: int, method: str, history: Sequence[RoundRecord], costs: Dict[str, Any],
                        ctx: Context, cpu_s: float, wall_s: float) -> Dict[str, Any]:
    """The JSON-ready record of one (seed, method) run from its engine's round history, whichever engine ran it.

    ``deployed[r][c]`` and ``local[r][c]``: client c's accuracy after round r with its deployed model and right
    after its local training (``None`` if c did not train in round r or the round was not measured); ``server``:
    the server's per-round log (accepted clients, rejections, pFedPG's distances and spread; bytes uploaded and the
    round's wall time)."""
    n = len(ctx.clients)
    return {
        "seed": seed,
        "method": method,
        "deployed": [[None] * n if h.deployed is None else list(h.deployed) for h in history],
        "local": [[h.after_local.get(c) for c in range(n)] for h in history],
        "participants": [list(h.participants) for h in history],
        "train_loss": [[h.train_loss.get(c) for c in range(n)] for h in history],
        "server": [{**h.server.as_dict(), "upload_bytes": dict(h.upload_bytes), "wall_s": h.wall_s} for h in history],
        "trainable": costs["trainable"],
        "communicated": costs["communicated"],
        "server_params": costs["server"],
        "personal_keys": list(costs["personal_keys"]),
        "wall_s": wall_s,
        "cpu_s": cpu_s,  # CPU seconds of the process(es) that ran it (all threads): the work, whatever the load
        "flops": training_flops(method, ctx),
    }


def run_method(method: str, ctx: Context, on_round: Optional[Callable[[int, Optional[float]], None]] = None,
               probe: bool = False, measured: Callable[[int], bool] = lambda r: True) -> Dict[str, Any]:
    """Run ``method`` in ``ctx`` for ``ctx.budget.rounds`` rounds (module docstring); its record.
    ``on_round(round, mean deployed accuracy or None)`` after each round (1-based); ``measured(round)`` (0-based):
    whether that round's accuracies are measured (default: every round).

    ``probe``: the convergence probe of the regime pilot. Before the last round the whole federation is copied and
    the copy runs that round with twice the local epochs: the same start (the server's prompts, every client's
    personal state, the same batches' seeds), E against 2E epochs; ``record["convergence"]`` holds both mean
    after-local accuracies. The copy's work is counted in ``cpu_s``, not in the curves."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    model, protocol = build_model(method, ctx), make_protocol(method, ctx)
    engine = Federation(protocol, model, [c.train for c in ctx.clients], test_data=[c.test for c in ctx.clients],
                        trainer=make_trainer(ctx.budget, ctx.backbone.preprocess), seed=ctx.seed,
                        fraction=ctx.budget.fraction)
    costs = method_costs(protocol, model, engine.server)
    convergence = None
    for r in range(ctx.budget.rounds):
        if probe and r == ctx.budget.rounds - 1:
            twin = copy.deepcopy(engine)
            twin.trainer.epochs = 2 * engine.trainer.epochs
            doubled = twin.run_round(r).after_local
        rec = engine.run_round(r, evaluate=measured(r) or (probe and r == ctx.budget.rounds - 1))
        if on_round is not None:
            on_round(r + 1, rec.mean)
        if probe and r == ctx.budget.rounds - 1:
            convergence = {"round": r + 1, "epochs": engine.trainer.epochs,
                           "after_local": statistics.fmean(rec.after_local.values()),
                           "after_local_2x": statistics.fmean(doubled.values())}
    record = record_from_history(ctx.seed, method, engine.history, costs, ctx, time.process_time() - cpu0,
                                 time.perf_counter() - t0)
    if convergence is not None:
        record["convergence"] = convergence
    return record


def run_job(cfg: RunConfig, seed: int, method: str, report: Optional[Report] = None) -> Dict[str, Any]:
    """:func:`run_method` on ``seed``'s prepared data and backbone; ``report(seed, method, round, accuracy)``."""
    data, backbone = prepare_seed(cfg, seed)
    ctx = Context(backbone, data.clients, cfg.budget, seed)
    return run_method(method, ctx, None if report is None else lambda r, acc: report(seed, method, r, acc),
                      probe=cfg.probe_convergence and method == CONVERGENCE_PROBE, measured=cfg.measured)


def default_workers(jobs: int) -> int:
    """As many processes as the CPUs this process may run on, at most one per job."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, jobs))


def _init(threads: int, progress: Any) -> None:
    global _QUEUE
    _QUEUE = progress
    configure_process(threads)


def _report(seed: int, method: str, round_: int, acc: float) -> None:
    _QUEUE.put((seed, method, round_, acc))


def _job(cfg: RunConfig, seed: int, method: str) -> Dict[str, Any]:
    return run_job(cfg, seed, method, _report)


def _order(methods: Sequence[str]) -> List[str]:
    heavy = select("b", methods)
    return [*heavy, *[m for m in methods if m not in heavy]]


def run_all(cfg: RunConfig, bar: Any) -> Tuple[Dict[int, Dict[str, Any]], Records]:
    """Prepare every seed and run every (seed, method); ``bar`` is a tqdm bar over seeds × methods × rounds.
    Returns ``(prepared[seed], records[(seed, method)])``, both in the configuration's order."""

    def show(seed: int, method: str, round_: int, acc: Optional[float]) -> None:
        bar.set_description(f"seed {seed} {method:<16}", refresh=False)
        if acc is not None:
            bar.set_postfix(acc=f"{acc:.3f}", refresh=False)
        bar.update(1)

    if cfg.workers <= 1:
        configure_process(cfg.threads)
        prepared = {s: prepare_info(cfg, s) for s in cfg.seeds}
        return prepared, {(s, m): run_job(cfg, s, m, show) for s in cfg.seeds for m in cfg.methods}
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cfg.threads)
    try:
        prepared, results = _pool(cfg, show)
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {s: prepared[s] for s in cfg.seeds}, {(s, m): results[(s, m)] for s in cfg.seeds for m in cfg.methods}


def run_all_timed(cfg: RunConfig) -> Tuple[Dict[int, Dict[str, Any]], Records, float]:
    """Every (seed, method) with the configured engine under one progress bar on stderr; ``(prepared, records,
    wall seconds)``."""
    import sys

    from tqdm import tqdm

    configure_process(cfg.threads)
    jobs = len(cfg.seeds) * len(cfg.methods)
    print(f"{len(cfg.seeds)} seeds {list(cfg.seeds)} x {len(cfg.methods)} methods = {jobs} runs of "
          f"{cfg.budget.rounds} rounds, {cfg.workers} worker process(es) x {cfg.threads} torch thread(s)")
    t0 = time.perf_counter()
    with tqdm(total=jobs * cfg.budget.rounds, unit="round", file=sys.stderr, dynamic_ncols=True,
              mininterval=1.0) as bar:
        if cfg.engine == "flower":
            from .flower_engine import run_all_flower

            prepared, records = run_all_flower(cfg, bar)
        else:
            prepared, records = run_all(cfg, bar)
    return prepared, records, time.perf_counter() - t0


def _pool(cfg: RunConfig, show: Callable) -> Tuple[Dict[int, Any], Records]:
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    prepared: Dict[int, Any] = {}
    results: Records = {}
    pending: Dict[Tuple, Any] = {}
    with ctx.Pool(cfg.workers, initializer=_init, initargs=(cfg.threads, progress)) as pool:
        # the first seed alone: a rebuilt backbone (--pretrain, --smoke) is pre-trained and cached there, once
        pending[("prepare", cfg.seeds[0])] = pool.apply_async(prepare_info, (cfg, cfg.seeds[0]))
        while pending:
            _drain(progress, show, timeout=0.2)
            for key in [k for k, r in pending.items() if r.ready()]:
                value = pending.pop(key).get()  # re-raises a worker's exception here
                if key[0] == "prepare":
                    prepared[key[1]] = value
                    if key[1] == cfg.seeds[0]:
                        for s in cfg.seeds[1:]:
                            pending[("prepare", s)] = pool.apply_async(prepare_info, (cfg, s))
                    for m in _order(cfg.methods):
                        pending[("job", key[1], m)] = pool.apply_async(_job, (cfg, key[1], m))
                else:
                    results[(key[1], key[2])] = value
        pool.close()
        pool.join()
        _drain(progress, show, timeout=0.0)
    return prepared, results


def _drain(progress: Any, show: Callable, timeout: float) -> None:
    try:
        item = progress.get(timeout=timeout) if timeout else progress.get_nowait()
        while True:
            show(*item)
            item = progress.get_nowait()
    except queue_mod.Empty:
        pass
