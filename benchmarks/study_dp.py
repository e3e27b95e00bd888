"""The cost of user-level DP: deployed accuracy against ε for FedVPT, FedPerfix and pFedPG at σ ∈ {0, 0.5, 1, 2}.

The benchmark's embedded data and frozen backbone (``benchmarks/personalize.py``'s default ViT, cached), split for
DP: ``--clients`` 50 clients with Dirichlet(α) label skew, ``--fraction`` 0.2 of them per round (m = 10), 50
training images each (the 5,000 MNIST digits go to 50 clients; at 100 clients and fraction 0.1 each client's personal
head would train only ~3 times in 30 rounds). Deployed models are evaluated in the last ``--last`` rounds only (every
client each; that is most of a round's CPU). Per method:

1. **norm pilot** (pilot seed, validation split): one run with ``Privacy(C = 1e9, σ = 0)`` (equal weights, the
   fixed denominator, nothing clipped or noised) records the clients' raw update norms (averaging) or generator
   gradient norms (pFedPG); their median is ν.
2. **clip choice** (pilot seed, validation split): C ∈ ν × ``--clip-grid`` at σ = 1; the best mean accuracy over the
   last ``--last`` rounds wins. Never the test split.
3. **runs** (``--seeds``, test split): without privacy, then ``Privacy(C*, σ)`` for every σ of ``--sigmas``; the
   reported accuracy is the mean over clients, averaged over the last ``--last`` rounds; ε after the last round.

    PYTHONPATH=$PWD python benchmarks/study_dp.py                                  # the defaults below
    PYTHONPATH=$PWD python benchmarks/study_dp.py --seeds 0,1,2 --rounds 20 --json results/dp.json

Uses the benchmark package's data, backbone, model builders and trainer, and the library's public API
(``fedpeft.protocols.Federation(..., privacy=)``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _personalize.cli import DEFAULT_CACHE
from _personalize.config import Budget, DataConfig, RunConfig
from _personalize.methods import Context, build_model, make_protocol
from _personalize.run import configure_process, prepare_seed
from _personalize.train import make_trainer

from fedpeft.protocols import Federation, Privacy


def run(cfg: RunConfig, seed: int, method: str, privacy: Optional[Privacy], rounds: int, last: int) -> Dict[str, Any]:
    """One (seed, method, privacy) run: the mean deployed accuracy of the last ``last`` rounds, ε, the raw norms."""
    data, backbone = prepare_seed(cfg, seed)
    ctx = Context(backbone, data.clients, cfg.budget, seed)
    model, protocol = build_model(method, ctx), make_protocol(method, ctx)
    engine = Federation(protocol, model, [c.train for c in ctx.clients], test_data=[c.test for c in ctx.clients],
                        trainer=make_trainer(ctx.budget, ctx.backbone.preprocess), seed=seed,
                        fraction=ctx.budget.fraction, privacy=privacy)
    t0 = time.perf_counter()
    # every client's deployed model is evaluated in the last rounds only (CPU); evaluation changes no trained number
    records = [engine.run_round(r, evaluate=r >= rounds - last) for r in range(rounds)]
    norms: List[float] = []
    for r in records:
        norms += r.server.diagnostics.get("update_norms", []) + r.server.diagnostics.get("gradient_norms", [])
    eps = records[-1].server.privacy["epsilon"] if privacy is not None else None
    return {"seed": seed, "method": method, "privacy": None if privacy is None else privacy.as_dict(),
            "accuracy": statistics.fmean(r.mean for r in records[-last:]) if last else None,
            "curve": [r.mean for r in records[-last:]] if last else [],
            "epsilon": eps, "median_norm": statistics.median(norms) if norms else None,
            "rejected": sum(len(r.server.rejected) for r in records), "wall_s": time.perf_counter() - t0}


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="FedVPT,FedPerfix,pFedPG")
    ap.add_argument("--sigmas", default="0,0.5,1,2")
    ap.add_argument("--seeds", default="0", help="reported seeds (test split)")
    ap.add_argument("--pilot-seed", type=int, default=100, help="the norm pilot and the clip choice (validation)")
    ap.add_argument("--clip-grid", default="0.3,1,3", help="C candidates as multiples of the pilot's median norm")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label skew")
    ap.add_argument("--per-client", default="50,10,20", help="train,val,test images per client")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--last", type=int, default=3, help="rounds averaged for the reported accuracy")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    configure_process(1)
    train, val, test = (int(v) for v in a.per_client.split(","))
    base = RunConfig(cache=a.cache, budget=replace(Budget(), rounds=a.rounds, fraction=a.fraction),
                     data=DataConfig(split="dirichlet", clients=a.clients, alpha=a.alpha, train_per_client=train,
                                     val_per_client=val, test_per_client=test))
    pilot = replace(base, data=replace(base.data, evaluate="val"))
    methods, sigmas = a.methods.split(","), [float(s) for s in a.sigmas.split(",")]
    seeds, grid = [int(s) for s in a.seeds.split(",")], [float(g) for g in a.clip_grid.split(",")]
    out: Dict[str, Any] = {"command": "python benchmarks/study_dp.py " + " ".join(argv or sys.argv[1:]),
                           "config": vars(a), "methods": {}}
    t_start = time.perf_counter()
    for method in methods:
        norm_run = run(pilot, a.pilot_seed, method, Privacy(1e9, 0.0, delta=a.delta), a.rounds, 0)
        nu = norm_run["median_norm"]
        choice = [run(pilot, a.pilot_seed, method, Privacy(g * nu, 1.0, delta=a.delta), a.rounds, a.last)
                  for g in grid]
        best = max(choice, key=lambda r: r["accuracy"])
        clip = best["privacy"]["clip_norm"]
        print(f"{method}: median norm {nu:.4g}; validation accuracy at sigma=1 for C = "
              + ", ".join(f"{r['privacy']['clip_norm']:.3g}: {r['accuracy']:.3f}" for r in choice)
              + f" -> C = {clip:.3g}", flush=True)
        rows = {"no DP": [run(base, s, method, None, a.rounds, a.last) for s in seeds]}
        for sigma in sigmas:
            rows[f"sigma={sigma:g}"] = [run(base, s, method, Privacy(clip, sigma, delta=a.delta), a.rounds, a.last)
                                        for s in seeds]
        out["methods"][method] = {"median_norm": nu, "clip_choice": choice, "clip_norm": clip, "runs": rows}
        for name, rs in rows.items():
            accs = [r["accuracy"] for r in rs]
            eps = rs[0]["epsilon"]
            eps_s = "-" if eps is None else ("inf" if math.isinf(eps) else f"{eps:.3g}")
            print(f"  {name:10s} accuracy {statistics.fmean(accs):.3f}"
                  + (f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else "") + f"  epsilon {eps_s}", flush=True)
    out["wall_s"] = time.perf_counter() - t_start
    print_table(out)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    return out


def print_table(out: Dict[str, Any]) -> None:
    """Markdown: one row per method and setting, accuracy (mean over seeds) and ε."""
    print("\n| method | C | setting | accuracy | ε |\n|---|---|---|---|---|")
    for method, m in out["methods"].items():
        for name, rs in m["runs"].items():
            accs = [r["accuracy"] for r in rs]
            eps = rs[0]["epsilon"]
            eps_s = "—" if eps is None else ("∞" if math.isinf(eps) else f"{eps:.3g}")
            spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            print(f"| {method} | {m['clip_norm']:.3g} | {name} | {statistics.fmean(accs):.3f}{spread} | {eps_s} |")
    print(f"\nwall {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
