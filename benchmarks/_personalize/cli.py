"""Command line of ``benchmarks/personalize.py``: parse flags, build data and backbone, run, report."""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .backbone import build_backbone
from .config import ALL_METHODS, METHODS, BackboneConfig, Budget, DataConfig, RunConfig, smoke
from .data import digits_federated
from .folders import folder_federated
from .methods import Context
from .report import format_table, plot_curves, write_csv, write_json
from .runner import run_methods

__all__ = ["main", "parse_args"]

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache"


def _methods(text: str) -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    lower = {m.lower(): m for m in ALL_METHODS}
    bad = [m for m in names if m.lower() not in lower]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    return [lower[m.lower()] for m in names]


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    b, d = Budget(), DataConfig()
    p = argparse.ArgumentParser(
        prog="personalize.py",
        description="fedpeft's main job: per-client accuracy and cost of personalization methods on "
        "heterogeneous clients (embedded digits, or your own image folders).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", type=_methods, default=list(METHODS), help="comma-separated subset of " + ",".join(ALL_METHODS))
    p.add_argument("--rounds", type=int, default=b.rounds, help="communication rounds")
    p.add_argument("--local-epochs", type=int, default=b.local_epochs, help="local epochs per round")
    p.add_argument("--fraction", type=float, default=b.fraction,
                   help="share of clients per round, in (0, 1] (seeded sample, at least one client)")
    p.add_argument("--clients", type=int, default=None, help="clients (default: 6 for domain, 10 for dirichlet)")
    p.add_argument("--split", choices=["domain", "dirichlet"], default=d.split, help="how digits go to clients")
    p.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration for --split dirichlet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="real data: PATH/<client>/<class>/<image> (ImageFolder per client)")
    p.add_argument("--model", default=None, help="a registered timm model name (with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="local weights file for --model (no download)")
    p.add_argument("--out", default="results", help="results folder (CSV, JSON, PNG)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder for the pre-trained backbone")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="seconds-long run: tiny ViT, 3 clients, 2 rounds")
    p.add_argument("--engine", choices=["local", "flower"], default="local",
                   help="local: in-process loop; flower: Flower's simulation runtime (Ray), one SuperNode per client")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.local_epochs < 1:
        p.error("--rounds and --local-epochs must be >= 1")
    if not 0.0 < a.fraction <= 1.0:
        p.error(f"--fraction must be in (0, 1], got {a.fraction}")
    if a.model and not a.checkpoint:
        p.error("--model needs --checkpoint FILE (local weights; nothing is downloaded)")
    if a.data and not a.checkpoint:
        p.error("--data needs a real backbone: --model NAME --checkpoint FILE")
    backbone = BackboneConfig()
    if a.checkpoint:
        backbone = replace(backbone, model=a.model or backbone.model, checkpoint=a.checkpoint)
    cfg = RunConfig(
        methods=tuple(a.methods),
        seed=a.seed,
        threads=a.threads,
        engine=a.engine,
        out=a.out,
        cache=a.cache,
        budget=replace(b, rounds=a.rounds, local_epochs=a.local_epochs, fraction=a.fraction),
        backbone=backbone,
        data=replace(d, split=a.split, clients=a.clients, alpha=a.alpha, data=a.data),
    )
    return smoke(cfg) if a.smoke else cfg


def _environment() -> dict:
    import timm

    import fedpeft

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "fedpeft": fedpeft.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns 0. See ``docs/benchmark.md``."""
    from tqdm import tqdm

    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    progress = functools.partial(tqdm, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    t0 = time.perf_counter()
    cache = Path(cfg.cache)
    if cfg.backbone.is_custom:
        backbone = build_backbone(cfg.backbone, None, 0, cache, cfg.seed, progress)
        size = backbone.preprocess.size
        data = folder_federated(cfg.data, cfg.seed, size) if cfg.data.data else digits_federated(cfg.data, cfg.seed, 32)
        backbone.num_classes = data.num_classes
    else:
        data = digits_federated(cfg.data, cfg.seed, cfg.backbone.img_size)
        backbone = build_backbone(cfg.backbone, data.public, data.num_classes, cache, cfg.seed, progress)
    names = [c.name for c in data.clients]
    tag = "folders" if cfg.data.data else cfg.data.split
    print(f"data: {tag}, {len(names)} clients {names}, train sizes {[c.info['train'] for c in data.clients]}")
    print(f"backbone: {cfg.backbone.model} {cfg.backbone.timm_kwargs()} {backbone.info}")
    print(f"budget: {asdict(cfg.budget)}")
    ctx = Context(backbone, data.clients, cfg.budget, cfg.seed)
    backbone_params = sum(p.numel() for p in backbone.make().parameters())
    engine = {"name": cfg.engine}
    if cfg.engine == "flower":
        from .flower_engine import flower_version, run_methods_flower

        engine["flwr"] = flower_version()
        results = run_methods_flower(cfg.methods, ctx, cfg.budget.rounds, progress)
    else:
        results = run_methods(cfg.methods, ctx, cfg.budget.rounds, progress)
    total = time.perf_counter() - t0
    title = f"fedpeft personalize.py: {tag}, {len(names)} clients, {cfg.budget.rounds} rounds"
    table = format_table(results, names, backbone_params)
    print(f"\n{title} (per-client test accuracy, %)\n{table}\ntotal wall time {total:.0f}s")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"personalize_{tag}"
    write_csv(stem.with_suffix(".csv"), results, names)
    write_json(stem.with_suffix(".json"), {
        "title": title,
        "command": "python benchmarks/personalize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": cfg.as_dict(),
        "backbone": {**backbone.info, "params": backbone_params},
        "data": data.description,
        "clients": names,
        "methods": [r.as_dict() for r in results],
        "total_wall_s": total,
        "engine": engine,
        "environment": _environment(),
        "table": table,
    })
    plot_curves(stem.with_suffix(".png"), results, title)
    print(f"wrote {stem}.csv, .json, .png")
    return 0
