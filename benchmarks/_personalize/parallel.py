"""Run the (seed, method) jobs of a run in parallel worker processes, with one progress bar.

- ``workers`` processes (``spawn``: a fresh interpreter each, no forked torch state), each with ``threads`` torch
  threads. ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` are set in the environment the workers inherit, so their
  OpenMP pools are sized before torch starts, and ``configure_process`` sets torch's count again in each worker.
- First the first seed is prepared (data split, backbone pre-trained and cached) by one worker, then the other
  seeds (they load the cached backbone); as soon as a seed is ready its method jobs are queued, the longest first (methods that train the whole backbone).
- Results are collected by job, not by completion order, so the output does not depend on scheduling: every job is
  a deterministic function of (configuration, seed, method) (see :mod:`.jobs`).
- ``workers == 1`` runs everything in this process, through the same functions.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
from typing import Any, Callable, Dict, List, Sequence, Tuple

from .config import RunConfig
from .jobs import configure_process, prepare_info, run_job

__all__ = ["default_workers", "run_all"]

#: methods that train the whole backbone: several times the work of a prompt method, so they start first
_HEAVY = ("FedAvg", "FedAvg-FT", "FedRep", "FedPerfix", "VanillaAttention", "Local-FT")

_QUEUE: Any = None  # the worker's progress queue (set by _init)


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


def _prepare(cfg: RunConfig, seed: int) -> Dict[str, Any]:
    return prepare_info(cfg, seed)


def _job(cfg: RunConfig, seed: int, method: str) -> Dict[str, Any]:
    return run_job(cfg, seed, method, _report)


def _order(methods: Sequence[str]) -> List[str]:
    return sorted(methods, key=lambda m: m not in _HEAVY)  # stable: heavy ones first, then the given order


def run_all(cfg: RunConfig, bar: Any) -> Tuple[Dict[int, Dict[str, Any]], Dict[Tuple[int, str], Dict[str, Any]]]:
    """Prepare every seed and run every (seed, method); ``bar`` is a tqdm bar over seeds × methods × rounds.

    Returns ``(prepared[seed], results[(seed, method)])``.
    """

    def show(seed: int, method: str, round_: int, acc: float) -> None:
        bar.set_description(f"seed {seed} {method:<16}", refresh=False)
        bar.set_postfix(acc=f"{acc:.3f}", refresh=False)
        bar.update(1)

    if cfg.workers <= 1:
        configure_process(cfg.threads)
        prepared = {s: prepare_info(cfg, s) for s in cfg.seeds}
        results = {(s, m): run_job(cfg, s, m, show) for s in cfg.seeds for m in cfg.methods}
        return prepared, results
    return _run_pool(cfg, show)


def _run_pool(cfg: RunConfig, show: Callable) -> Tuple[Dict[int, Any], Dict[Tuple[int, str], Any]]:
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cfg.threads)
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    prepared: Dict[int, Any] = {}
    results: Dict[Tuple[int, str], Any] = {}
    pending: Dict[Tuple, Any] = {}
    try:
        with ctx.Pool(cfg.workers, initializer=_init, initargs=(cfg.threads, progress)) as pool:
            # the first seed alone: it pre-trains and caches the backbone every seed shares
            pending[("prepare", cfg.seeds[0])] = pool.apply_async(_prepare, (cfg, cfg.seeds[0]))
            while pending:
                _drain(progress, show, timeout=0.2)
                for key in [k for k, r in pending.items() if r.ready()]:
                    value = pending.pop(key).get()  # re-raises a worker's exception here
                    if key[0] == "prepare":
                        prepared[key[1]] = value
                        if key[1] == cfg.seeds[0]:
                            for s in cfg.seeds[1:]:
                                pending[("prepare", s)] = pool.apply_async(_prepare, (cfg, s))
                        for m in _order(cfg.methods):
                            pending[("job", key[1], m)] = pool.apply_async(_job, (cfg, key[1], m))
                    else:
                        results[(key[1], key[2])] = value
            pool.close()
            pool.join()
            _drain(progress, show, timeout=0.0)
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ordered = {(s, m): results[(s, m)] for s in cfg.seeds for m in cfg.methods}
    return {s: prepared[s] for s in cfg.seeds}, ordered


def _drain(progress: Any, show: Callable, timeout: float) -> None:
    try:
        item = progress.get(timeout=timeout) if timeout else progress.get_nowait()
        while True:
            show(*item)
            item = progress.get_nowait()
    except queue_mod.Empty:
        pass
