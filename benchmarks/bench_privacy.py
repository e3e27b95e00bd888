"""The server step's cost with and without user-level DP, side by side in one process (medians, interleaved).

    python benchmarks/bench_privacy.py                    # pFedPG: C = 1,000, m = 100, K = 10, D = 768; FedAvg: 1 M

pFedPG (``PFedPGServer.update`` with plain SGD): the plain step is one batched ``gen(ids)``, one
``fed.delta_backward`` and ``opt.step()``; the DP step (``privacy=Privacy(C, σ)``) does the same forward, then one
``torch.autograd.grad`` per client through the shared graph (each client's gradient over all of φ, the C × T × D
descriptor bank included, clipped jointly), sums, draws σ·C noise for every parameter, and steps; the accountant's
ε update is part of the step (dp-accounting, cached per distinct round). Averaging (``AveragingServer.update``):
the plain step is ``fed.Averager``; the DP step clips each update, sums in float64 and adds noise.

Why not ``torch.func.vmap``: per-sample gradients materialise m copies of |φ| (m × C × T × D for the descriptors:
100 × 7.7 M floats = 3 GB at the defaults); the loop keeps one at a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from fedpeft import PromptGenerator
from fedpeft.protocols import AveragingServer, PFedPGServer, Privacy


def _pfedpg(args, privacy):
    torch.manual_seed(0)
    gen = PromptGenerator(num_clients=args.clients, num_prompts=args.prompts, embed_dim=args.dim, depth=args.depth)
    opt = torch.optim.SGD(gen.parameters(), lr=1e-3)
    like = {"prompts": torch.zeros(args.depth, args.prompts, args.dim)}
    return PFedPGServer(gen, opt, like, privacy=privacy, seed=0)


def _pfedpg_round(server, ids, noise):
    sent = server.payloads(ids)
    server.update([(n, {"prompts": sent[n]["prompts"] + noise[i]}, 1) for i, n in enumerate(ids)])


def _avg_round(server, ids, deltas):
    sent = server.payloads(ids)
    server.update([(n, {"w": sent[n]["w"] + deltas[i]}, 1) for i, n in enumerate(ids)])  # updates of norm ~0.03


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=1000, help="C")
    ap.add_argument("--sampled", type=int, default=100, help="m, clients per round")
    ap.add_argument("--prompts", type=int, default=10, help="K")
    ap.add_argument("--dim", type=int, default=768, help="D")
    ap.add_argument("--depth", type=int, default=1, help="L")
    ap.add_argument("--shared", type=int, default=1_000_000, help="averaging: shared parameters")
    ap.add_argument("--avg-sampled", type=int, default=10, help="averaging: replies per round")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ids = list(range(0, args.clients, max(1, args.clients // args.sampled)))[: args.sampled]
    noise = 0.01 * torch.randn(len(ids), args.depth, args.prompts, args.dim)
    uploads = [3e-5 * torch.randn(args.shared) for _ in range(args.avg_sampled)]
    dp = Privacy(clip_norm=0.1, noise_multiplier=1.0)
    servers = {
        "pFedPG, plain": _pfedpg(args, None),
        "pFedPG, DP": _pfedpg(args, dp),
        "averaging, plain": AveragingServer({"w": torch.zeros(args.shared)}, num_clients=args.clients),
        "averaging, DP": AveragingServer({"w": torch.zeros(args.shared)}, num_clients=args.clients, privacy=dp, seed=0),
    }
    avg_ids = list(range(args.avg_sampled))
    cases = {k: (lambda s=s: _pfedpg_round(s, ids, noise)) if k.startswith("pFedPG")
             else (lambda s=s: _avg_round(s, avg_ids, uploads)) for k, s in servers.items()}
    for fn in cases.values():
        fn()  # warm-up (and the accountant's first ε)
    times = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    print(f"{cmd}\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"1 thread; {args.repeats} interleaved repeats, medians")
    print(f"pFedPG: C={args.clients}, m={len(ids)}, K={args.prompts}, D={args.dim}, L={args.depth}, generator "
          f"{sum(p.numel() for p in servers['pFedPG, plain'].generator.parameters()):,} parameters; averaging: "
          f"{args.shared:,} shared parameters, {args.avg_sampled} replies")
    for k in names:
        print(f"  {k:18s} {med[k]:8.4f} s per round (payloads + update)")
    print(f"DP / plain: pFedPG {med['pFedPG, DP'] / med['pFedPG, plain']:.1f}x, "
          f"averaging {med['averaging, DP'] / med['averaging, plain']:.1f}x")
    return {"command": cmd, "median_s": med}


if __name__ == "__main__":
    main()
