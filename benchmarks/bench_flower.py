"""The Flower simulation engine against the in-process engine: per-round time, start-up, peak memory, bytes sent.

Both engines run the same methods (FedVPT: prompts shared; pFedPG: per-client generated prompts; FedPerfix: the whole
backbone shared) on the benchmark's default ViT (0.46 M parameters, 32 px, random weights: timing does not need a
pre-trained backbone) and the embedded digits (domain split), each engine in its own child process so peak memory is
its own: the largest sum of PSS (proportional set size: shared pages such as torch's libraries counted once, split
between the processes that map them) over the process and all its descendants (Flower: the driver and every Ray
process it starts), sampled every 0.5 s. Per round: from sending the train messages to the last evaluation
reply (Flower), from sampling to the last client's evaluation (in-process). Start-up: Flower's time from
``run_simulation`` to the first method's first train message (Ray, the actors, registration).

Upload bytes: what each client's reply carries (``ArrayRecord`` array data, ``fedpeft.flower.payload_bytes``) against
``fed.num_bytes`` of the method's upload state (``fedpeft.protocols.upload_state``); they must be equal.

    python benchmarks/bench_flower.py                      # 3 clients, 6 rounds; ~3 min on 2 cores
    python benchmarks/bench_flower.py --rounds 4 --repeat 2  # local, flower, local, flower: medians over both

On a shared machine the two engines' child processes alternate (``--repeat``) so that load changes hit both; the
table shows per method the median over repetitions of each engine's median round time (rounds after the first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ["FedVPT", "pFedPG", "FedPerfix"]


def _context(clients: int, seed: int):
    import timm
    import torch
    from _personalize.backbone import Backbone, Preprocess
    from _personalize.config import BackboneConfig, Budget, DataConfig
    from _personalize.data import digits_federated
    from _personalize.methods import Context

    cfg = BackboneConfig()
    data = digits_federated(replace(DataConfig(), clients=clients), seed, cfg.img_size)
    torch.manual_seed(seed)
    vit = timm.create_model(cfg.model, pretrained=False, num_classes=0, **cfg.timm_kwargs())
    pre = Preprocess(cfg.img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    backbone = Backbone(cfg, {k: v.detach().clone() for k, v in vit.state_dict().items()}, 10, pre, seed)
    return Context(backbone, data.clients, Budget(), seed)


class _Peak:
    """Largest PSS sum over this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def _no_progress(total=0, unit=""):
    class Bar:
        def set_description(self, *_):
            pass

        def set_postfix(self, **_):
            pass

        def update(self, *_):
            pass

    yield Bar()


def child(engine: str, clients: int, rounds: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    ctx = _context(clients, seed)
    out = {"engine": engine, "methods": {}}
    if engine == "local":
        from _personalize.methods import build_model, make_protocol
        from _personalize.runner import run_method

        from fedpeft import fed, protocols

        with _Peak() as peak:
            for name in METHODS:
                stamps = [time.perf_counter()]
                res = run_method(name, ctx, rounds, lambda acc, s=stamps: s.append(time.perf_counter()))
                model = build_model(name, ctx)
                out["methods"][name] = {
                    "round_s": [b - a for a, b in zip(stamps, stamps[1:])], "accuracy": res.accuracy,
                    "upload_state_bytes": fed.num_bytes(protocols.upload_state(model, make_protocol(name, ctx.budget))),
                }
        out["peak_rss"] = peak.peak
    else:
        import flwr
        from _personalize.flower_engine import run_methods_flower

        t0 = time.perf_counter()
        with _Peak() as peak:
            results = run_methods_flower(METHODS, ctx, rounds, _no_progress)
        out["total_s"] = time.perf_counter() - t0
        out["flwr"] = flwr.__version__
        for r in results:
            out["methods"][r.name] = {"round_s": [log["wall_s"] for log in r.server_log], "accuracy": r.accuracy,
                                      "upload_bytes": [log["upload_bytes"] for log in r.server_log],
                                      "wall_s": r.wall_s}
        first = results[0]
        out["startup_s"] = out["total_s"] - sum(r.wall_s for r in results) + (
            first.wall_s - sum(log["wall_s"] for log in first.server_log))
        out["peak_rss"] = peak.peak
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["local", "flower"], help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="alternate local/flower runs this many times")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.clients, a.rounds, a.seed)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = {"local": [], "flower": []}
    for _ in range(max(1, a.repeat)):
        for engine in ("local", "flower"):
            proc = subprocess.run([sys.executable, __file__, "--child", engine, "--clients", str(a.clients),
                                   "--rounds", str(a.rounds), "--seed", str(a.seed)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            runs[engine].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def per_round(engine: str, name: str) -> float:  # rounds after the first (Flower's first includes registration)
        return statistics.median(statistics.median(r["methods"][name]["round_s"][1:]) for r in runs[engine])

    flower = runs["flower"][0]
    print(f"bench_flower: {a.clients} clients, {a.rounds} rounds, {max(1, a.repeat)} repetition(s), flwr "
          f"{flower['flwr']}, {os.cpu_count()} CPUs, 1 torch thread per client")
    print(f"{'method':<10} {'local s/round':>13} {'flower s/round':>14} {'ratio':>6} {'upload B/client':>16} "
          f"{'fed.num_bytes':>13} {'same acc':>8}")
    ratios = []
    for name in METHODS:
        lr, fr = per_round("local", name), per_round("flower", name)
        ratios.append(fr / lr)
        sent = {b for r in runs["flower"] for per in r["methods"][name]["upload_bytes"] for b in per.values()}
        same = all(r["methods"][name]["accuracy"] == runs["local"][0]["methods"][name]["accuracy"]
                   for r in runs["local"] + runs["flower"])
        print(f"{name:<10} {lr:>13.3f} {fr:>14.3f} {fr / lr:>6.2f} {'/'.join(map(str, sorted(sent))):>16} "
              f"{runs['local'][0]['methods'][name]['upload_state_bytes']:>13} {same!s:>8}")
    print(f"per-round time, Flower / in-process (median over methods): {statistics.median(ratios):.2f}x")
    print("Flower start-up (Ray, actors, first registration): "
          + ", ".join(f"{r['startup_s']:.1f}" for r in runs["flower"]) + " s; total "
          + ", ".join(f"{r['total_s']:.1f}" for r in runs["flower"]) + " s")
    print("peak memory (PSS): in-process " + ", ".join(f"{r['peak_rss'] / 2**30:.2f}" for r in runs["local"])
          + " GiB; Flower (driver + Ray) " + ", ".join(f"{r['peak_rss'] / 2**30:.2f}" for r in runs["flower"])
          + " GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
