"""The units of work of a run: prepare a seed (data + backbone), then run one method on one seed.

Both are plain functions of ``(RunConfig, seed[, method])`` with everything seeded inside, so their results do not
depend on which process runs them, in which order, or alongside what (``parallel`` relies on that). A process keeps
the data and backbone of the (seed, data, backbone) settings it has seen (``_SEEDS``), so several methods of one seed
share the preparation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .backbone import Backbone, build_backbone
from .config import RunConfig
from .data import FederatedData, digits_federated
from .flops import training_flops
from .folders import folder_federated
from .methods import Context
from .runner import MethodResult, run_method

__all__ = ["configure_process", "job_record", "prepare_info", "prepare_seed", "run_job"]

#: (seed, data config, backbone config, cache) → (data, backbone) already built in this process
_SEEDS: Dict[Tuple[Any, ...], Tuple[FederatedData, Backbone]] = {}

#: (seed, method, round, mean accuracy) → None; progress reporting, set by the caller
Report = Callable[[int, str, int, float], None]


def configure_process(threads: int) -> None:
    """One process's torch settings: ``threads`` intra-op threads, deterministic algorithms where torch has them."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _quiet(iterable=None, **_: Any):
    """A stand-in for tqdm that shows nothing (workers report progress to the main process instead)."""
    return iterable


def prepare_seed(cfg: RunConfig, seed: int, progress: Optional[Callable] = None) -> Tuple[FederatedData, Backbone]:
    """The clients' data and the backbone of ``seed`` (pre-trained and cached on first use)."""
    key = (seed, cfg.data, cfg.backbone, cfg.cache)
    if key in _SEEDS:
        return _SEEDS[key]
    progress = progress or _quiet
    cache = Path(cfg.cache)
    if cfg.backbone.is_custom:
        backbone = build_backbone(cfg.backbone, None, 0, cache, seed, progress)
        size = backbone.preprocess.size
        data = folder_federated(cfg.data, seed, size) if cfg.data.data else digits_federated(cfg.data, seed, size)
        backbone.num_classes = data.num_classes
    else:
        data = digits_federated(cfg.data, seed, cfg.backbone.img_size)
        # one public backbone for every run seed (pre-trained once, cached); the run seed draws the heads
        backbone = build_backbone(cfg.backbone, data.public, data.num_classes, cache, cfg.backbone.pretrain_seed,
                                  progress)
        backbone.seed = seed
    _SEEDS[key] = (data, backbone)
    return data, backbone


def prepare_info(cfg: RunConfig, seed: int) -> Dict[str, Any]:
    """``prepare_seed`` for a worker: builds and caches, returns only what the report needs (picklable, small)."""
    data, backbone = prepare_seed(cfg, seed)
    return {"seed": seed, "backbone": backbone.info, "data": data.description, "clients": [c.name for c in data.clients],
            "backbone_params": sum(p.numel() for p in backbone.make().parameters())}


def run_job(cfg: RunConfig, seed: int, method: str, report: Optional[Report] = None) -> Dict[str, Any]:
    """Run ``method`` on ``seed`` for ``cfg.budget.rounds`` rounds; a JSON-ready record of that one run.

    ``deployed[r][c]`` and ``local[r][c]`` are client c's accuracy after round r with its deployed model and right
    after its local training (``None`` if c did not train in round r); ``server`` is the server's per-round log
    (accepted clients, rejections, pFedPG's distances and spread).
    """
    data, backbone = prepare_seed(cfg, seed)
    ctx = Context(backbone, data.clients, cfg.budget, seed)
    done = [0]

    def on_round(acc: float) -> None:
        done[0] += 1
        if report is not None:
            report(seed, method, done[0], acc)

    cpu0 = time.process_time()
    result = run_method(method, ctx, cfg.budget.rounds, on_round)
    return job_record(seed, method, result, ctx, time.process_time() - cpu0)


def job_record(seed: int, method: str, result: MethodResult, ctx: Context, cpu_s: float) -> Dict[str, Any]:
    """The JSON-ready record of one (seed, method) run, whichever engine ran it (see :func:`run_job`)."""
    return {
        "seed": seed,
        "method": method,
        "deployed": result.curve_clients,
        "local": result.curve_after_local,
        "participants": result.participants,
        "train_loss": result.train_loss,
        "server": result.server_log,
        "trainable": result.trainable,
        "communicated": result.communicated,
        "server_params": result.server,
        "personal_keys": list(result.personal_keys),
        "wall_s": result.wall_s,
        "cpu_s": cpu_s,  # CPU seconds of the process(es) that ran it (all threads): the work, whatever the load
        "flops": training_flops(method, ctx),
    }
