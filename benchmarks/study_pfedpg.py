"""Generator-only study of pFedPG's server: which generator init and server step personalize while descending.

No images: C = 6 clients drawn from two distinct target prompt sets (clients 0-2 near A, 3-5 near B, each with its own
small offset), prompts shaped like the benchmark's (K = 10, D = 96, shallow, patch 8). Every round the library's
``PFedPGServer`` sends gen(n); a simulated client returns its trained prompts P̃ₙ; the server steps
(``fed.delta_backward`` + the optimizer). Two simulated clients:

- ``sgd``: gradient-like, as the paper's client (SGD γ = 0.25, several epochs): P̃ = P + c·(Tₙ − P), c = 0.5;
- ``adamw``: sign-like, as an AdamW client: P̃ = P + s·sign(Tₙ − P), s = 0.02 (≈ 5e-3 × a few steps).

Reported per setting (mean over seeds): the share of client-rounds whose step descends (‖gen(n) − P̃ₙ‖ shrinks), the
spread of gen(ids) across clients (% of their mean's norm) at rounds 1, 6 and 12, ‖P̃‖ in round 1 and 12, the
client-specific error ‖gen(n) − Tₙ‖/‖Tₙ‖ at the end, and "own": the share of clients whose gen(n) is nearer its own
P̃ₙ than every other client's P̃ₘ in the last round.

    PYTHONPATH=$PWD python benchmarks/study_pfedpg.py                # pilot seeds 100,101,102, both clients
    PYTHONPATH=$PWD python benchmarks/study_pfedpg.py --seeds 0,1,2 --rounds 12 --client sgd

``--main-job`` runs the same comparison on the benchmark's main job (``benchmarks/personalize.py``: MNIST digits in
shift families, domain split, frozen pre-trained ViT, 12 rounds, validation split), pFedPG only, one process, with the
server settings named in ``--settings`` (keys of MAIN_SETTINGS: S = server steps per round, h = generator heads) and
the client recipe ``--client-recipe`` (the budget's AdamW at ``--lr-prompt``, or the paper's SGD γ = 0.25, 5 epochs,
batch 64), and prints per setting the share of descending client-rounds, the mean retention, the residual and drift
after the last round, the spread at rounds 1 / mid / last, ‖P̃‖, and the mean accuracy deployed and after local
training in the last round (FedVPT's with ``--fedvpt``)::

    PYTHONPATH=$PWD python benchmarks/study_pfedpg.py --main-job --seeds 100,101,102 --settings S1,S50,S50-h16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, List

import torch

from fedpeft import PromptGenerator
from fedpeft.protocols.pfedpg import PFedPGServer, _make_optimizer
from fedpeft.protocols.records import Reply

C, K, D, PATCH = 6, 10, 96, 8
KEY = "prompts"

#: name → (generator init, optimizer, rate(s), normalize ΔP)
SETTINGS: Dict[str, tuple] = {
    "paper: vpt init, SGD 1e-3": ("vpt", "SGD", 1e-3, False),
    "vpt init, SGD 0.1": ("vpt", "SGD", 0.1, False),
    "vpt init, Adam 1e-3": ("vpt", "Adam", 1e-3, False),
    "unit init, SGD 1e-3": ("unit_logits", "SGD", 1e-3, False),
    "unit init, SGD 0.1": ("unit_logits", "SGD", 0.1, False),
    "unit init, SGD groups b.1/d1/p.1": ("unit_logits", "SGD",
                                         {"prompt_base": 0.1, "descriptors": 1.0, "projections": 0.1}, False),
    "unit init, Adam 3e-4": ("unit_logits", "Adam", 3e-4, False),
    "unit init, Adam 1e-3": ("unit_logits", "Adam", 1e-3, False),
    "unit init, Adam 3e-3": ("unit_logits", "Adam", 3e-3, False),
    "unit init, Adam 1e-2": ("unit_logits", "Adam", 1e-2, False),
    "unit init, Adam 1e-3, norm ΔP": ("unit_logits", "Adam", 1e-3, True),
    "unit init, Adam groups b1e-3/d1e-2/p1e-3": ("unit_logits", "Adam",
                                                 {"prompt_base": 1e-3, "descriptors": 1e-2, "projections": 1e-3},
                                                 False),
    "unit init, Adam groups b1e-3/d3e-2/p1e-3": ("unit_logits", "Adam",
                                                 {"prompt_base": 1e-3, "descriptors": 3e-2, "projections": 1e-3},
                                                 False),
    "unit init, Adam groups b3e-3/d1e-2/p3e-3": ("unit_logits", "Adam",
                                                 {"prompt_base": 3e-3, "descriptors": 1e-2, "projections": 3e-3},
                                                 False),
    "unit init, SGD groups b.1/d100/p1": ("unit_logits", "SGD",
                                          {"prompt_base": 0.1, "descriptors": 100.0, "projections": 1.0}, False),
    "vpt init, SGD groups b1e-3/d1/p1 (old init, ~1e3x)": ("vpt", "SGD",
                                         {"prompt_base": 1e-3, "descriptors": 1.0, "projections": 1.0}, False),
}


def targets(seed: int) -> torch.Tensor:
    """(C, 1, K, D): clients 0-2 near set A, 3-5 near set B (VPT-scale entries), each with its own small offset."""
    g = torch.Generator().manual_seed(10_000 + seed)
    v = (6 / (3 * PATCH * PATCH + D)) ** 0.5

    def u(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1) * v

    sets = u(2, 1, K, D)
    return sets[torch.tensor([0, 0, 0, 1, 1, 1])] + 0.3 * u(C, 1, K, D)


def client(P: torch.Tensor, T: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sgd":
        return P + 0.5 * (T - P)
    return P + 0.02 * torch.sign(T - P)


def run(setting: tuple, seed: int, rounds: int, kind: str) -> Dict[str, Any]:
    init, opt, lr, norm = setting
    torch.manual_seed(seed)
    gen = PromptGenerator(num_clients=C, num_prompts=K, embed_dim=D, patch_size=PATCH, init=init)
    server = PFedPGServer(gen, _make_optimizer(opt, gen, lr), {KEY: torch.empty(1, K, D)}, normalize_delta=norm)
    T = targets(seed)
    ids = list(range(C))
    down = total = 0
    spread, tnorm = [], []
    trained = None
    for _ in range(rounds):
        sent = server.payloads(ids)
        trained = {n: client(sent[n][KEY], T[n], kind) for n in ids}
        rep = server.update([Reply(n, {KEY: trained[n]}, 1.0) for n in ids])
        d = rep.diagnostics
        if not d:  # the generator diverged (non-finite prompts): every reply refused
            return {"desc": float("nan"), "s1": float("nan"), "smid": float("nan"), "send": float("nan"),
                    "n1": float("nan"), "nend": float("nan"), "own": float("nan"), "err": float("nan")}
        down += sum(a < b for a, b in zip(d["dist_after"], d["dist_before"]))
        total += len(ids)
        spread.append(100 * d["spread"])
        tnorm.append(statistics.fmean(d["trained_norm"]))
    with torch.no_grad():
        G = gen(torch.arange(C))  # (C, 1, K, D)
        Pt = torch.stack([trained[n] for n in ids])
        dist = torch.cdist(G.flatten(1), Pt.flatten(1))  # (C, C): gen(n) to P̃_m
        own = float((dist.diag() < (dist + torch.eye(C) * 1e9).min(1).values).float().mean())
        err = float(((G - T).flatten(1).norm(dim=1) / T.flatten(1).norm(dim=1)).mean())
    mid = rounds // 2 - 1 if rounds >= 2 else 0
    return {"desc": 100 * down / total, "s1": spread[0], "smid": spread[mid], "send": spread[-1],
            "n1": tnorm[0], "nend": tnorm[-1], "own": 100 * own, "err": err}


#: --main-job settings: name → PFedPG keyword arguments (S: server steps per round, h: generator heads, x3: the
#: default per-group rates × 3)
_X3 = {"prompt_base": 3e-3, "descriptors": 3e-2, "projections": 3e-3}
_X10 = {"prompt_base": 1e-2, "descriptors": 1e-1, "projections": 1e-2}
_ONE = {"server_steps": 1, "heads": 1}  # issue 17's study: one step per round, one head
MAIN_SETTINGS: Dict[str, Dict[str, Any]] = {
    "paper": {"recipe": "paper"},
    "sgd1e-3": {"server_optimizer": "SGD", "server_lr": 1e-3, **_ONE},
    "sgd0.1": {"server_optimizer": "SGD", "server_lr": 0.1, **_ONE},
    "adam1e-3": {"server_optimizer": "Adam", "server_lr": 1e-3, **_ONE},
    "adam3e-3": {"server_optimizer": "Adam", "server_lr": 3e-3, **_ONE},
    "adam1e-3-norm": {"server_optimizer": "Adam", "server_lr": 1e-3, "normalize_delta": True, **_ONE},
    "adam-groups": {"server_optimizer": "Adam",
                    "server_lr": {"prompt_base": 1e-3, "descriptors": 1e-2, "projections": 1e-3}, **_ONE},
    "S1": _ONE,  # the default of issue 17 (fedpeft 0.2)
    "S20": {"server_steps": 20, "heads": 1},
    "S50": {"server_steps": 50, "heads": 1},
    "S200": {"server_steps": 200, "heads": 1},
    "S20-x3": {"server_steps": 20, "heads": 1, "server_lr": _X3},
    "S50-x3": {"server_steps": 50, "heads": 1, "server_lr": _X3},
    "S20-h16": {"server_steps": 20, "heads": 16},
    "S50-h16": {"server_steps": 50, "heads": 16},
    "S200-h16": {"server_steps": 200, "heads": 16},
    "S20-h16-x3": {"server_steps": 20, "heads": 16, "server_lr": _X3},
    "S50-h16-x3": {"server_steps": 50, "heads": 16, "server_lr": _X3},
    "S50-h16-x10": {"server_steps": 50, "heads": 16, "server_lr": _X10},
    "default": {},  # the library's default server
}


def _fmt(xs: Any) -> str:
    return " ".join(f"{x:.1f}" for x in xs)


def _server_row(rec: Dict[str, Any], mid: int) -> Dict[str, float]:
    """One run's server figures: descending share, mean retention, residual and drift in the last round, spread at
    round 1 / ``mid`` / last (%), ‖P̃‖ in round 1 and last, accuracy deployed and after local training (last round)."""
    diags = [r["diagnostics"] for r in rec["server"] if r.get("diagnostics")]
    down = sum(a < b for d in diags for a, b in zip(d["dist_after"], d["dist_before"]))
    tot = sum(len(d["dist_before"]) for d in diags)
    return {"desc": 100 * down / tot, "ret": 100 * statistics.fmean(d["retention"] for d in diags),
            "res": diags[-1]["residual"], "drift": diags[-1]["drift"], "s1": 100 * diags[0]["spread"],
            "smid": 100 * diags[mid - 1]["spread"], "send": 100 * diags[-1]["spread"],
            "n1": statistics.fmean(diags[0]["trained_norm"]), "nend": statistics.fmean(diags[-1]["trained_norm"]),
            "dep": 100 * statistics.fmean(rec["deployed"][-1]),
            "loc": 100 * statistics.fmean(a for a in rec["local"][-1] if a is not None)}


def main_job(seeds: List[int], settings: List[str], client_recipe: str, fedvpt: bool, rounds: int,
             lr_prompt: float) -> None:
    import sys
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _personalize import run as runner
    from _personalize.cli import parse_args
    from _personalize.methods import make_protocol
    from _personalize.run import run_job

    from fedpeft.protocols import LocalTrainer, PFedPG

    out = tempfile.mkdtemp(prefix="study-pfedpg-")
    cfg = parse_args(["--methods", "pFedPG", "--seeds", ",".join(map(str, seeds)), "--workers", "1",
                      "--rounds", str(rounds), "--evaluate", "val", "--lr-prompt", str(lr_prompt),
                      "--out", out, "--overwrite"])
    trainer_of = runner.make_trainer
    if client_recipe == "sgd":  # the paper's client: SGD γ = 0.25, 5 epochs, batch 64 (pFedPG only)
        cfg = replace(cfg, budget=replace(cfg.budget, local_epochs=5, batch_size=64))

        def sgd_trainer(budget, preprocess):
            return LocalTrainer(epochs=5, batch_size=64, optimizer="SGD", lr=0.25, lr_backbone=budget.lr_backbone,
                                weight_decay=budget.weight_decay, preprocess=preprocess)

        runner.make_trainer = sgd_trainer
    mid = max(rounds // 2, 1)
    print(f"main job (validation split), pFedPG, client {client_recipe}, lr_prompt {lr_prompt:g}, seeds {seeds}, "
          f"{rounds} rounds")
    print(f"{'setting':<12} {'desc%':>6} {'ret%':>5} {'resid':>5} {'drift':>5} {'spread r1':>9} {'r' + str(mid):>6} "
          f"{'r' + str(rounds):>6} {'|P~| r1':>7} {'end':>6} {'deployed':>8} {'local':>6}  per-seed deployed")
    for name in settings:
        runner.make_protocol = lambda n, budget, kw=MAIN_SETTINGS[name]: PFedPG(**kw)
        rows = []
        for seed in seeds:
            t0 = time.time()
            rows.append({**_server_row(run_job(cfg, seed, "pFedPG"), mid), "t": time.time() - t0})
        m = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
        print(f"{name:<12} {m['desc']:6.1f} {m['ret']:5.1f} {m['res']:5.2f} {m['drift']:5.2f} {m['s1']:8.2f}% "
              f"{m['smid']:5.2f}% {m['send']:5.2f}% {m['n1']:7.3f} {m['nend']:6.3f} {m['dep']:8.2f} {m['loc']:6.2f}  "
              f"{_fmt(r['dep'] for r in rows)}  ({m['t']:.0f} s/seed)", flush=True)
    runner.make_protocol, runner.make_trainer = make_protocol, trainer_of
    if fedvpt:
        deps = []
        for seed in seeds:
            rec = run_job(cfg, seed, "FedVPT")
            deps.append(100 * statistics.fmean(rec["deployed"][-1]))
        print(f"{'FedVPT':<12} deployed {statistics.fmean(deps):.2f}  per seed {_fmt(deps)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="100,101,102", help="pilot seeds (default: 100,101,102)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--client", choices=["sgd", "adamw", "both"], default="both")
    p.add_argument("--main-job", action="store_true", help="run the comparison on the benchmark's main job")
    p.add_argument("--settings", default=",".join(MAIN_SETTINGS), help="--main-job: comma-separated MAIN_SETTINGS")
    p.add_argument("--client-recipe", choices=["adamw", "sgd"], default="adamw", help="--main-job: client recipe")
    p.add_argument("--fedvpt", action="store_true", help="--main-job: also run FedVPT with the budget's client")
    p.add_argument("--lr-prompt", type=float, default=0.05, help="--main-job: the clients' prompt rate")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.main_job:
        main_job([int(s) for s in a.seeds.split(",")], a.settings.split(","), a.client_recipe, a.fedvpt, a.rounds,
                 a.lr_prompt)
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    kinds = ["sgd", "adamw"] if a.client == "both" else [a.client]
    t0 = time.time()
    mid = max(a.rounds // 2, 1)
    for kind in kinds:
        print(f"\nclient: {kind}   seeds {seeds}, {a.rounds} rounds, C={C}, K={K}, D={D}")
        print(f"{'setting':<44} {'desc%':>6} {'spread r1':>9} {'r' + str(mid):>6} {'r' + str(a.rounds):>6} "
              f"{'|P~| r1':>7} {'end':>6} {'err':>6} {'own%':>5}")
        for name, setting in SETTINGS.items():
            rs: List[Dict[str, Any]] = [run(setting, s, a.rounds, kind) for s in seeds]
            m = {k: statistics.fmean(r[k] for r in rs) for k in rs[0]}
            print(f"{name:<44} {m['desc']:6.1f} {m['s1']:8.2f}% {m['smid']:5.2f}% {m['send']:5.2f}% "
                  f"{m['n1']:7.3f} {m['nend']:6.3f} {m['err']:6.3f} {m['own']:5.0f}")
    print(f"\n{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
