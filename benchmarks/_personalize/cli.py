"""Command line of ``benchmarks/personalize.py``: parse and check every flag, then run and report.

Every bad flag or flag combination is reported by ``parse_args`` as an argparse error (usage line, exit status 2)
before any data is prepared or any model trained; the checks that need more than argparse (models, checkpoints,
folders, splits, the output folder) are the ``check_*`` functions at the end, each returning ``None`` or the message.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from fedpeft.protocols.pfedpg import DEFAULT_SERVER_STEPS

from .config import BackboneConfig, Budget, DataConfig, RunConfig, quick, smoke
from .methods import METHODS, select

__all__ = ["build_parser", "main", "parse_args"]

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache"
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
SMOKE_SEEDS = (0, 1)
QUICK_SEEDS = (0, 1, 2)
PILOT_SEEDS = (100, 101)  # the regime pilot and the learning-rate sweep (validation splits; never reported)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def _methods(text: str) -> List[str]:
    if text.strip().lower() == "all":
        return list(METHODS)
    names = [m.strip() for m in text.split(",") if m.strip()]
    lower = {m.lower(): m for m in METHODS}
    bad = [m for m in names if m.lower() not in lower]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if not names:
        raise argparse.ArgumentTypeError("no method given")
    out = [lower[m.lower()] for m in names]
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"a method is listed twice in {text!r}")
    return out


def _seeds(text: str) -> Tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers like 0,1,2, got {text!r}")
    return seeds


def _number(cast: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse ``type=``: ``cast(text)``, refused with "expected <expected>" unless ``ok`` of the value."""

    def parse(text: str) -> float:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return v

    return parse


_positive = _number(int, lambda v: v >= 1, "a positive integer")
_alpha = _number(float, lambda v: v > 0 and math.isfinite(v), "a finite Dirichlet concentration > 0")
_fraction = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_rate = _number(float, lambda v: v > 0 and math.isfinite(v), "a finite learning rate > 0")


def build_parser() -> argparse.ArgumentParser:
    b = Budget()
    p = argparse.ArgumentParser(
        prog="personalize.py",
        description="fedpeft's main job: per-client accuracy and cost of personalization methods on heterogeneous "
        "clients (embedded digits, or your own image folders), over several seeds with 95% intervals and paired "
        "verdicts. See docs/benchmark.md.",
    )
    add = p.add_argument
    add("--methods", type=_methods, default=None, metavar="A,B,...|all",
        help=f"comma-separated subset of: {', '.join(METHODS)}; 'all' for every one (default: "
        f"{', '.join(select('d'))})")
    add("--seeds", type=_seeds, default=None, metavar="S,S,...",
        help="seeds; each is a new client split, shift strengths, heads and batch order (default: 0,1,2,3,4; "
        "--smoke: 0,1). The learning-rate sweep and the pilot used seeds 100,101 (validation splits), never report "
        "those")
    add("--quick", action="store_true",
        help=f"a short look: {', '.join(select('q'))}, 3 seeds, 4 rounds (no Holm verdicts at 3 seeds worth reading)")
    add("--pilot", action="store_true",
        help=f"the regime go/no-go: {', '.join(select('p'))} on the validation splits of seeds "
        f"{','.join(map(str, PILOT_SEEDS))} (never reported), FedVPT's last round repeated with twice the local epochs")
    add("--evaluate", choices=["test", "val"], default="test",
        help="the split every accuracy is measured on: test (reported runs) or val (the learning-rate sweep and "
        "the pilot, on seeds never reported; default: test)")
    add("--lr-prompt", type=_rate, default=b.lr_prompt, metavar="LR",
        help=f"learning rate of prompt tokens (default: {b.lr_prompt:g}, chosen on validation, see "
        "benchmarks/README.md)")
    add("--lr-new", type=_rate, default=b.lr_new, metavar="LR",
        help=f"learning rate of the other parameters that start from scratch: heads, adapters (default: "
        f"{b.lr_new:g}, chosen on validation)")
    add("--lr-backbone", type=_rate, default=b.lr_backbone, metavar="LR",
        help=f"learning rate of pre-trained weights when a method trains them (default: {b.lr_backbone:g}, see "
        "benchmarks/README.md)")
    add("--rounds", type=_positive, default=b.rounds, metavar="N", help=f"communication rounds (default: {b.rounds})")
    add("--local-epochs", type=_positive, default=b.local_epochs, metavar="N",
        help=f"local epochs per round (default: {b.local_epochs})")
    add("--fraction", type=_fraction, default=b.fraction, metavar="F",
        help="share of clients per round, in (0, 1]: a seeded sample, at least one client (default: 1)")
    add("--last-rounds", type=_positive, default=RunConfig.last_rounds, metavar="N",
        help=f"report each client's mean accuracy over the last N rounds (default: {RunConfig.last_rounds})")
    add("--eval-every", type=_positive, default=RunConfig.eval_every, metavar="N",
        help="measure the accuracies every N-th round and in the last rounds, for the curves; 1: every round "
        f"(default: {RunConfig.eval_every}; evaluation is about a quarter of a round's work, and skipping it changes no "
        "trained number; the Flower engine measures every round)")
    add("--pfedpg-server", default=b.generator_optimizer, metavar="default|paper|OPT:LR",
        help=f"pFedPG's server: 'default' (the library's: a fit of {DEFAULT_SERVER_STEPS} Adam steps per round, 1e-2 "
        "on the descriptors "
        "and 1e-3 elsewhere, gcd(D, 16) heads, unit-logit generator init), 'paper' (Eq. 5 literally: one SGD step "
        "0.001 on the VPT-like init of fedpeft 0.1), or SGD:LR / Adam:LR, one rate, the default's steps and heads "
        "(default: default; see docs/federated.md, 'The server step')")
    add("--split", choices=["domain", "dirichlet"], default=None,
        help="how the MNIST digits go to clients: shift families (each client its own strength and 5 of the 10 "
        "classes), or clean images with Dirichlet label skew (default: domain)")
    add("--clients", type=_positive, default=None, metavar="N",
        help="number of clients (default: 8 for domain, i.e. 2 per family, 10 for dirichlet)")
    add("--families", type=_positive, default=None, metavar="F",
        help="shift families of --split domain, 1 to 6 (rotated, inverted, coloured, noisy, blurred, sketch; "
        "default: 4)")
    add("--alpha", type=_alpha, default=None, metavar="A",
        help="Dirichlet concentration, --split dirichlet only (default: 0.1)")
    add("--pretrain", action="store_true",
        help="pre-train the default backbone anew from its recipe (a few CPU-minutes, cached) instead of loading "
        "the shipped weights (benchmarks/backbones/); on another machine or torch version the bits, hence the "
        "table, change")
    add("--data", default=None, metavar="PATH",
        help="real data: PATH/<client>/<class>/<image>, one ImageFolder per client (needs --model, --checkpoint)")
    add("--model", default=None, metavar="NAME", help="a registered timm ViT name, with --checkpoint")
    add("--checkpoint", default=None, metavar="FILE", help="local weights file for --model (nothing is downloaded)")
    add("--out", default=None, metavar="DIR",
        help="results folder for CSV, JSON, PNG; must be new or empty unless --overwrite "
        "(default: a new results/personalize-<split>-<date-time>)")
    add("--overwrite", action="store_true", help="allow --out to be a folder that already holds files")
    add("--cache", default=str(DEFAULT_CACHE), metavar="DIR",
        help="folder for the pre-trained backbones (default: benchmarks/.cache)")
    add("--workers", type=_positive, default=None, metavar="N",
        help="parallel processes, one (seed, method) each at a time (default: the CPUs available, at most one "
        "per job)")
    add("--threads", type=_positive, default=1, metavar="N",
        help="torch threads per process (default: 1; more threads on shared cores oversubscribe them)")
    add("--engine", choices=["local", "flower"], default="local",
        help="local: the in-process engine (worker processes); flower: Flower's simulation runtime (Ray), one "
        "virtual SuperNode per client with 1 CPU and 1 torch thread, seeds one after another, the same per-client "
        "results (needs the flower extra; default: local)")
    add("--smoke", action="store_true",
        help="seconds-long run for tests: tiny ViT, 3 clients, 2 rounds, 32 training images per client")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Parse and check ``argv``; every problem is a ``parser.error`` (SystemExit 2) before any work."""
    p = build_parser()
    a = p.parse_args(argv)
    b, d = Budget(), DataConfig()
    opt, _, lr = (a.pfedpg_server, "", "0.001") if a.pfedpg_server in ("default", "paper") \
        else a.pfedpg_server.partition(":")
    try:
        server_lr = float(lr)
    except ValueError:
        server_lr = float("nan")
    if opt not in ("SGD", "Adam", "default", "paper") or not (server_lr > 0 and math.isfinite(server_lr)):
        p.error(f"--pfedpg-server: expected default, paper, SGD:LR or Adam:LR with LR > 0, got {a.pfedpg_server!r}")
    if a.checkpoint and not a.model:
        p.error("--checkpoint needs --model NAME (the timm architecture the weights belong to)")
    if a.model and not a.checkpoint:
        p.error("--model needs --checkpoint FILE (local weights; nothing is downloaded)")
    if a.data:
        given = [f for f, v in (("--split", a.split), ("--clients", a.clients), ("--alpha", a.alpha),
                                ("--families", a.families)) if v is not None]
        if a.evaluate != "test":
            given.append("--evaluate")
        if given:
            p.error(f"--data gives the clients (one per folder); {', '.join(given)} only apply to the embedded digits")
        if not a.checkpoint:
            p.error("--data needs a real backbone: --model NAME --checkpoint FILE")
    if a.alpha is not None and (a.split or "domain") != "dirichlet":
        p.error("--alpha only applies to --split dirichlet")
    if a.families is not None and (a.split or "domain") != "domain":
        p.error("--families only applies to --split domain")
    if a.families is not None and a.families > 6:
        p.error(f"--families: expected 1 to 6 (there are 6 shift families), got {a.families}")
    if sum((a.quick, a.smoke, a.pilot)) > 1:
        p.error("--quick, --smoke and --pilot are different runs; choose one")
    if a.pilot and (a.data or a.split == "dirichlet"):
        p.error("--pilot measures the regime of the embedded shift families (--split domain)")
    methods = a.methods or list(select("q" if a.quick else "p" if a.pilot else "d"))
    if a.split == "dirichlet" or a.data:
        needs = select("f", methods)  # methods that need the shift families
        if needs and a.methods:
            p.error(f"{', '.join(needs)} averages within shift families: it needs --split domain")
        methods = [m for m in methods if m not in needs]
    if a.checkpoint:
        if a.pretrain:
            p.error("--pretrain applies to the embedded backbone; a --checkpoint is used as is")
        if not Path(a.checkpoint).is_file():
            p.error(f"--checkpoint {a.checkpoint!r} is not a file")
        problem = check_model(a.model)
        if problem:
            p.error(problem)
    if a.data:
        problem = check_data_folder(a.data)
        if problem:
            p.error(problem)
    backbone = BackboneConfig()
    if a.checkpoint:
        backbone = replace(backbone, model=a.model, checkpoint=a.checkpoint)
    seeds = a.seeds or (SMOKE_SEEDS if a.smoke else QUICK_SEEDS if a.quick else PILOT_SEEDS if a.pilot
                        else DEFAULT_SEEDS)
    split = a.split or d.split
    tag = "folders" if a.data else split
    if a.out is None:
        out = Path("results") / f"personalize-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
        while out.exists():
            out = out.with_name(out.name + "+")
    else:
        out = Path(a.out)
        problem = check_out(out, a.overwrite)
        if problem:
            p.error(problem)
    cfg = RunConfig(
        methods=tuple(methods),
        seeds=tuple(seeds),
        threads=a.threads,
        workers=a.workers or 0,  # 0: decided once the number of jobs is known
        last_rounds=a.last_rounds,
        eval_every=a.eval_every,
        engine=a.engine,
        out=str(out),
        cache=a.cache,
        probe_convergence=a.pilot,
        rebuild_backbone=a.pretrain,
        budget=replace(b, rounds=a.rounds, local_epochs=a.local_epochs, fraction=a.fraction,
                       generator_optimizer=opt, generator_lr=server_lr, lr_new=a.lr_new, lr_prompt=a.lr_prompt,
                       lr_backbone=a.lr_backbone),
        backbone=backbone,
        data=replace(d, split=split, clients=a.clients, alpha=a.alpha if a.alpha is not None else d.alpha,
                     families=a.families or d.families, evaluate="val" if a.pilot else a.evaluate, data=a.data),
    )
    cfg = smoke(cfg) if a.smoke else quick(cfg, rounds_given=a.rounds != b.rounds) if a.quick else cfg
    problem = _check_splits(cfg)
    if problem:
        p.error(problem)
    if cfg.engine == "flower":
        if a.workers not in (None, 1):
            p.error("--workers applies to --engine local; Flower's simulation runs one virtual SuperNode per client")
        try:
            import flwr  # noqa: F401
        except ImportError:
            p.error("--engine flower needs Flower: pip install -e \".[flower]\"")
        cfg = replace(cfg, workers=1)
    if not cfg.workers:
        from .run import default_workers

        cfg = replace(cfg, workers=default_workers(len(cfg.seeds) * len(cfg.methods)))
    return cfg


def _check_splits(cfg: RunConfig) -> Optional[str]:
    """Draw every seed's split of the embedded digits (cheap, no model): impossible splits fail here, not later."""
    if cfg.data.data:
        return None
    from .data import DataFileError, digits_federated

    sizes = []
    for seed in cfg.seeds:
        try:
            data = digits_federated(cfg.data, seed, 8)  # the split does not depend on the image size
        except DataFileError as e:
            return str(e)
        except ValueError as e:
            return f"seed {seed}: {e}"
        sizes += [(seed, c.name, c.info["train"], c.info["test"]) for c in data.clients]
    return check_split(sizes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark (``docs/benchmark.md``): parse, run every (seed, method), report; returns 0."""
    cfg = parse_args(argv)
    from .report import write_all
    from .run import run_all_timed

    write_all(cfg, *run_all_timed(cfg), argv=list(argv) if argv is not None else sys.argv[1:])
    return 0


def check_model(name: str) -> Optional[str]:
    """``name`` must be a registered timm model that fedpeft can wrap (``fedpeft.VPT`` accepts it).

    The model is built on the ``meta`` device: no memory, no weights, a fraction of a second even for ViT-L. Asking
    fedpeft itself, rather than testing a class here, keeps the check in step with what the library supports.
    """
    import timm
    import torch

    from fedpeft import VPT

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        return f"--model {name!r} is not a registered timm model" + (f" (close: {', '.join(close)})" if close else "")
    with torch.device("meta"):
        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as e:  # any failure to build is a problem of the model name
            return f"--model {name!r} could not be built by timm: {e}"
        try:
            VPT(model, num_prompts=1)
        except TypeError as e:
            return f"--model {name!r}: {e}"
    return None


def check_data_folder(path: str) -> Optional[str]:
    """``path`` must hold client folders, each holding class folders that hold images (ImageFolder layout)."""
    root = Path(path)
    if not root.is_dir():
        return f"--data {path!r} is not a folder (expected PATH/<client>/<class>/<image>)"
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    clients = sorted(p for p in entries if p.is_dir())
    if not clients:
        flat = any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
        what = "holds images directly (a flat folder)" if flat else "is empty"
        return f"--data {path!r} {what}; expected one sub-folder per client: PATH/<client>/<class>/<image>"
    for c in clients:
        inside = [p for p in c.iterdir() if not p.name.startswith(".")]
        classes = [p for p in inside if p.is_dir()]
        if not classes:
            flat = any(p.suffix.lower() in IMAGE_SUFFIXES for p in inside)
            what = "holds images directly, not in class folders" if flat else "has no class folders"
            return f"--data: client folder {str(c)!r} {what}; expected PATH/<client>/<class>/<image>"
        images = sum(1 for k in classes for p in k.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images < 2:
            return f"--data: client folder {str(c)!r} has {images} image(s); a train/test split needs at least 2"
    return None


def check_split(sizes: Sequence[tuple]) -> Optional[str]:
    """Every client of every seed must have at least one training and one test image: ``(seed, name, train, test)``."""
    for seed, name, train, test in sizes:
        if train < 1 or test < 1:
            return (f"seed {seed}: client {name!r} gets {train} training and {test} test images; use fewer --clients "
                    f"(or a larger --alpha for --split dirichlet)")
    return None


def check_out(path: Path, overwrite: bool) -> Optional[str]:
    """An explicit ``--out`` must be new or empty, unless ``--overwrite``: a run never replaces another's results."""
    if path.exists() and not path.is_dir():
        return f"--out {str(path)!r} is a file, not a folder"
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        return (f"--out {str(path)!r} already holds files (another run's results?); choose a new folder, or add "
                f"--overwrite to replace them")
    return None
