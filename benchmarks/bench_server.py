"""pFedPG server step: PromptGenerator generation + ΔP-as-gradient update for many clients, batched vs a loop.

    python benchmarks/bench_server.py                       # 1,000 clients, K = 10, D = 768; ~25 s on 2 cores
    python benchmarks/bench_server.py --threads 2 --heads 12 --depth 12 --descriptor-tokens 1
    python benchmarks/bench_server.py --round               # the default server's round against its clients'

``--round``: the CPU seconds of one round of ``protocols.get("pFedPG")``'s server (``PFedPGServer.update``: the
screening, the fit of ``server_steps`` Adam steps, the diagnostics) for ``--round-clients`` clients, against one
client's local round of the main job (``benchmarks/personalize.py``'s backbone shape: ViT D = 96, depth 4, 3 heads,
img 32, patch 8; VPT with K = 10 and a 10-class head; AdamW, 2 epochs of 100 images, batch 32), medians of
``--repeats`` interleaved repeats.

One server step = ``opt.zero_grad(); P = gen(ids); fed.delta_backward(P, P_trained); opt.step()`` (SGD) over all
``--clients`` clients. Timed side by side in one process, interleaved (the order rotates every repeat), medians:

1. ``batched, folded`` and ``batched, as written``: the step with the generator evaluating Eq. 3 in either order (see
   ``PromptGenerator``'s docstring: folding W_Q and W_O into the shared basis costs 2·H·M·D multiply-adds per query
   token instead of 2·D² + 2·M·D). The generator ships the cheaper one (folded whenever (H − 1)·M < D); the other
   is measured for comparison.
2. ``per-client loop``: ``gen(ids[i:i+1])`` + ``fed.delta_backward`` per client, one ``opt.step()`` at the end (the
   same gradient, accumulated; checked against the batched one first). Each iteration costs the same, so it is timed
   over ``--loop-clients`` clients and scaled to ``--clients`` (plus one step). DESIGN §5: batched ≥ 20× faster.
3. ``matmul, FLOPs of …``: ``torch.matmul`` of two square float32 matrices with the FLOPs of each order, counted
   analytically (multiply-add = 2 FLOPs; backward = 2× forward for every matmul, the attention's included; softmax,
   validation and the optimizer are not counted). DESIGN §5: time per FLOP within 2× of the matmul's.

``--threads 1`` by default: on a shared 2-core machine, two OpenMP threads contending with other jobs make small ops
erratic (a 10×768×768 matmul took 16 ms with 2 threads, 0.2 ms with 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from fedpeft import VPT, PromptGenerator, fed, protocols


def matmul_flops(gen: PromptGenerator, n: int, fold: bool) -> float:
    """Forward + backward FLOPs of the generator's matmuls for n clients (backward = 2 × forward)."""
    M, D, H, T = gen.num_tokens, gen.embed_dim, gen.heads, gen.descriptor_tokens
    q = n * T  # query tokens
    kv = 2 * (2 * M * D * D)  # P_base W_K, P_base W_V
    if fold:
        fwd = kv + 2 * (2 * M * D * D) + 2 * (2 * q * H * M * D)  # + folding W_Q, W_O; scores, values over D
    else:
        fwd = kv + 2 * (2 * q * D * D) + 2 * (2 * q * M * D)  # + d W_Q and (·) W_O; scores, values over D/H·H
    return 3.0 * fwd


def server_step(gen, opt, ids, target, fold, phases=None):
    """One server step; with ``phases`` (a dict of lists) also records forward / delta_backward / step times."""
    t0 = time.perf_counter()
    opt.zero_grad()
    P = gen._generate(gen._check_ids(ids), fold=fold) if fold is not None else gen(ids)
    t1 = time.perf_counter()
    fed.delta_backward(P, target)
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    if phases is not None:
        for k, t in (("forward", t1 - t0), ("delta_backward", t2 - t1), ("step", t3 - t2)):
            phases[k].append(t)
    return t3 - t0


def loop_part(gen, ids, target, m):
    for i in range(m):
        fed.delta_backward(gen(ids[i : i + 1]), target[i : i + 1])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def round_cost(clients: int, repeats: int) -> dict:
    """CPU seconds of the default pFedPG server's round for ``clients`` clients and of one client's local round."""
    import timm
    import torch.nn.functional as F

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=96,
                            depth=4, num_heads=3, global_pool="avg", class_token=False, num_classes=10)
    model = VPT(vit, num_prompts=10)
    server = protocols.get("pFedPG").make_server(model, num_clients=clients, seed=0)
    x, y = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))

    def server_round() -> float:
        sent = server.payloads(range(clients))
        replies = [(n, {server.key: p[server.key] + 0.3 * torch.randn_like(p[server.key])}, 1)
                   for n, p in sent.items()]
        t0 = time.process_time()
        server.update(replies)
        return time.process_time() - t0

    def client_round() -> float:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=5e-2, weight_decay=1e-3)
        model.train()
        t0 = time.process_time()
        for _ in range(2):
            for i in range(0, 100, 32):
                opt.zero_grad()
                F.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
                opt.step()
        return time.process_time() - t0

    server_round(), client_round()  # warm-up
    times: dict = {"server": [], "client": []}
    for _ in range(repeats):
        times["server"].append(server_round())
        times["client"].append(client_round())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"clients": clients, "server_steps": server.server_steps, "heads": server.generator.heads,
            "server_cpu_s": med["server"], "client_cpu_s": med["client"],
            "server_vs_all_clients": med["server"] / (clients * med["client"]), "all_s": times}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=10, help="K")
    ap.add_argument("--dim", type=int, default=768, help="D (ViT-B: 768)")
    ap.add_argument("--depth", type=int, default=1, help="prompt layers L (1: shallow VPT)")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--descriptor-tokens", type=int, default=None, help="T (default L·K; 1: one vector)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-clients", type=int, default=40, help="clients timed in the loop (scaled up)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads, 0: torch's default (1: stable on shared cores)"
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--round", action="store_true", help="the default server's round against its clients' (CPU s)")
    ap.add_argument("--round-clients", type=int, default=8, help="--round: clients (the main job's 8)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.round:
        r = round_cost(args.round_clients, args.repeats)
        print(f"pFedPG default server ({r['server_steps']} Adam steps, {r['heads']} heads), {r['clients']} clients: "
              f"{r['server_cpu_s']:.3f} CPU-s per round; one client's local round {r['client_cpu_s']:.3f} CPU-s; "
              f"server / all clients' = {100 * r['server_vs_all_clients']:.2f}% (medians of {args.repeats})")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(r, fh, indent=2)
        return r

    torch.manual_seed(0)
    n, m = args.clients, min(args.loop_clients, args.clients)
    gen = PromptGenerator(
        num_clients=n, num_prompts=args.prompts, embed_dim=args.dim, depth=args.depth, heads=args.heads,
        descriptor_tokens=args.descriptor_tokens,
    )
    opt = torch.optim.SGD(gen.parameters(), lr=1e-3)
    ids = torch.arange(n)
    with torch.no_grad():
        target = gen(ids) + 0.01 * torch.randn(n, args.depth, args.prompts, args.dim)  # the clients' P̃

    # correctness: batched and looped gradients agree (first m clients)
    opt.zero_grad()
    fed.delta_backward(gen(ids[:m]), target[:m])
    g_batched = [p.grad.clone() for p in gen.parameters()]
    opt.zero_grad()
    loop_part(gen, ids, target, m)
    for p, g in zip(gen.parameters(), g_batched):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)

    orders = {"folded": True, "as written": False}
    shipped = "folded" if gen._fold else "as written"
    flops = {o: matmul_flops(gen, n, f) for o, f in orders.items()}
    mats = {}
    for o, f in flops.items():
        s = max(1, round((f / 2) ** (1 / 3)))  # a square matmul of 2·s³ FLOPs
        mats[o] = (torch.randn(s, s), torch.randn(s, s), 2.0 * s**3)

    def run_loop():
        opt.zero_grad()
        t = timed(lambda: loop_part(gen, ids, target, m))
        return t * n / m + timed(opt.step)

    phases = {"forward": [], "delta_backward": [], "step": []}
    cases = {}
    for o, f in orders.items():
        cases[f"batched, {o}"] = lambda f=f, o=o: server_step(gen, opt, ids, target, f, phases if o == shipped else None)
    cases["per-client loop"] = run_loop
    for o in orders:
        cases[f"matmul, FLOPs of {o}"] = lambda o=o: timed(lambda: torch.matmul(*mats[o][:2]))
    for fn in cases.values():  # warm-up
        fn()
    for v in phases.values():
        v.clear()
    times = {k: [] for k in cases}
    names = list(cases)
    t_start = time.perf_counter()
    for r in range(args.repeats):  # interleaved, the order rotating every repeat
        for k in names[r % len(names) :] + names[: r % len(names)]:
            times[k].append(cases[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op thread(s)",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "shipped_order": shipped,
        "gflop": {o: f / 1e9 for o, f in flops.items()},
        "median_s": med,
        "all_s": times,
        "shipped_phases_median_s": {k: statistics.median(v) for k, v in phases.items()},
        "speedup_vs_loop": {o: med["per-client loop"] / med[f"batched, {o}"] for o in orders},
        # (server step time / its FLOPs) / (matmul time / matmul FLOPs)
        "time_per_flop_vs_matmul": {
            o: (med[f"batched, {o}"] / flops[o]) / (med[f"matmul, FLOPs of {o}"] / mats[o][2]) for o in orders
        },
        "shipped_vs_matmul_of_as_written_flops": med[f"batched, {shipped}"] / med["matmul, FLOPs of as written"],
        "bench_wall_s": time.perf_counter() - t_start,
    }
    print(f"{res['command']}\n{res['machine']}")
    print(
        f"{n} clients, K={args.prompts}, D={args.dim}, L={args.depth}, heads={args.heads}, T={gen.descriptor_tokens}; "
        f"shipped order: {shipped}; loop timed on {m} clients and scaled; {args.repeats} interleaved repeats"
    )
    print(f"{'':30s}{'median s':>10s}{'GFLOP':>9s}{'GFLOP/s':>9s}")
    for k in names:
        gfl = next((flops[o] for o in orders if k == f"batched, {o}"), None)
        gfl = next((mats[o][2] for o in orders if k == f"matmul, FLOPs of {o}"), gfl)
        extra = f"{gfl / 1e9:9.2f}{gfl / med[k] / 1e9:9.1f}" if gfl else ""
        print(f"{k:30s}{med[k]:10.4f}{extra}")
    by_phase = ", ".join(f"{k} {v:.4f}" for k, v in res["shipped_phases_median_s"].items())
    print(f"shipped step by phase (median s): {by_phase}")
    for o in orders:
        print(
            f"{o}: {res['speedup_vs_loop'][o]:.0f}x faster than the loop (goal >= 20x); time per FLOP "
            f"{res['time_per_flop_vs_matmul'][o]:.2f}x a matmul's (goal <= 2x)"
        )
    print(
        f"shipped step = {res['shipped_vs_matmul_of_as_written_flops']:.2f}x the time of a matmul with Eq. 3's "
        "as-written FLOPs"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
