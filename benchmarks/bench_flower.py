"""The Flower simulation engine against the in-process engine: per-round time, start-up, peak memory, bytes sent.

Both engines run the same methods (FedVPT: prompts shared; pFedPG: per-client generated prompts; FedPerfix: the whole
backbone shared) on the benchmark's default ViT (0.47 M parameters, 32 px, random weights: timing does not need a
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

``--deployed``: the Deployment Engine instead, for real: a ``flower-superlink`` and ``--clients`` ``flower-supernode``
processes on 127.0.0.1 run, in turn on the same processes (``--repeat`` pairs), Flower's own floor
(``benchmarks/_flower_noop``: a ClientApp that imports only flwr and numpy and echoes its arrays, a ServerApp that
sends one train message per node per round and pulls replies every 0.2 s, as fedpeft's does) and ``examples/flower``
(its ``task.py``: method, model, data) through ``benchmarks/_flower_timed`` (the same ClientApp and ServerApp with
every message and exchange time-stamped). A round's time is from its train exchange's start to the next round's
(the last round: to the end of its last exchange); the ratio is fedpeft's median round time over the no-op app's, on
rounds 2 … R − 1 (one exchange each; all rounds ≥ 2 when R < 4), per interleaved pair, then the median over pairs.
The table breaks each fedpeft message's cost down (medians over the messages of rounds ≥ 2, per message type):

    poll      server creates the message → the ClientApp process starts (SuperNode pull every 3 s, SuperExec 1 s)
    runtime   process start → the app module's first line (interpreter, Flower's runtime, fetching the task)
    imports   the app module's imports (fedpeft.flower, torch, timm, the user's task), split by ``-X importtime``
    build / data / train / eval   the user's ``build_model``, ``load_data`` (sklearn's digits), training, evaluation
    fedpeft   the rest of the handler: fedpeft's own work (records, state, fingerprints, protocol)
    reply     handler end → the server has every reply of the exchange (the ClientApp's exit, the SuperNode's 0.5 s
              wait loop, the push, the server's 0.2 s pull, the slowest node)

with the load average before and after.

    python benchmarks/bench_flower.py --deployed --rounds 5 --repeat 2   # 3 SuperNodes; ~5 min on 2 cores
    python benchmarks/bench_flower.py --deployed --rounds 5 --repeat 2 --noop-imports torch,timm
                                     # also the no-op app importing torch and timm per message: the floor of a torch app
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
        from _personalize.run import run_method

        from fedpeft import fed, protocols

        ctx.budget = replace(ctx.budget, rounds=rounds)
        with _Peak() as peak:
            for name in METHODS:
                stamps = [time.perf_counter()]
                res = run_method(name, ctx, lambda r, acc, s=stamps: s.append(time.perf_counter()))
                model = build_model(name, ctx)
                out["methods"][name] = {
                    "round_s": [b - a for a, b in zip(stamps, stamps[1:])], "accuracy": res["deployed"][-1],
                    "upload_state_bytes": fed.num_bytes(protocols.upload_state(model, make_protocol(name, ctx))),
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
            out["methods"][r["method"]] = {"round_s": [log["wall_s"] for log in r["server"]],
                                           "accuracy": r["deployed"][-1],
                                           "upload_bytes": [log["upload_bytes"] for log in r["server"]],
                                           "wall_s": r["wall_s"]}
        first = results[0]
        out["startup_s"] = out["total_s"] - sum(r["wall_s"] for r in results) + (
            first["wall_s"] - sum(log["wall_s"] for log in first["server"]))
        out["peak_rss"] = peak.peak
    return out


ROOT = Path(__file__).resolve().parents[1]


def _importtime_split(env: dict, module: str) -> dict:
    """Seconds of import self-time per package group for ``import <module>`` after Flower's client runtime."""
    code = f"import flwr.app, flwr.clientapp, flwr.supernode.runtime.run_clientapp; import {module}"
    before = "import flwr.app, flwr.clientapp, flwr.supernode.runtime.run_clientapp"
    out = {}
    for tag, c in (("base", before), ("all", code)):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", c], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        groups: dict = {}
        known = ("torch", "timm", "sklearn", "scipy", "fedpeft", "fedpeft_example", "numpy", "flwr",
                 "_flower_timed")
        rows = []
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, _, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip(" "))) // 2
            rows.append((int(self_us), depth, name.strip()))
        stack: list = []  # the output is post-order (children first): walk it backwards to see ancestors first
        for self_us, depth, name in reversed(rows):
            stack = [*stack[:depth], name.split(".")[0]]
            own = [t for t in reversed(stack) if t in known]  # the module's own package, else its nearest known
            g = own[0] if own else "other"  # ancestor's (sympy under torch counts as torch)
            groups[g] = groups.get(g, 0.0) + self_us / 1e6
        out[tag] = groups
    # what the app's import adds on top of the runtime's own imports
    return {g: round(out["all"].get(g, 0.0) - out["base"].get(g, 0.0), 3)
            for g in sorted(set(out["all"]) | set(out["base"]))}


def _round_times(exchanges: list, last_exit: float) -> dict:
    """``{round: seconds}``: from round r's first exchange (the one sending its train messages) to round r + 1's; the
    last round ends with its last exchange (fedpeft: the evaluate exchange of its own)."""
    starts = {}
    for x in sorted(exchanges, key=lambda x: x["enter"]):
        if x.get("round") is not None and ("train" in x.get("types", ["train"])):
            starts.setdefault(int(x["round"]), x["enter"])
    rounds = sorted(starts)
    return {r: (starts[rounds[i + 1]] if i + 1 < len(rounds) else last_exit) - starts[r] for i, r in enumerate(rounds)}


def deployed(clients: int, rounds: int, json_path, code: Path = ROOT, state_dir: bool = True,
             repeat: int = 1, noop_imports: str = "") -> int:
    """``--deployed``: a SuperLink and ``clients`` SuperNodes on 127.0.0.1 (see the module docstring), running
    Flower's no-op app and fedpeft's example in turn, ``repeat`` times each, on the same processes.

    ``code``: the checkout whose ``fedpeft`` and ``examples/flower`` run (another commit, to compare); the timing
    wrappers and the no-op app are this checkout's. ``state_dir``: give each SuperNode a ``state-dir``.
    ``noop_imports``: also run the no-op app importing these modules (``"torch,timm"``) in each repetition."""
    import shutil
    import signal
    import socket
    import tempfile

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    bindir = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    timings = tmp / "timings.jsonl"
    app = tmp / "app"
    app.mkdir()
    example = (code / "examples" / "flower" / "pyproject.toml").read_text()
    example = example.replace('"fedpeft_example.server_app:app"', '"_flower_timed.timed_server:app"')
    example = example.replace('"fedpeft_example.client_app:app"', '"_flower_timed.timed_client:app"')
    (app / "pyproject.toml").write_text(example.replace('packages = ["."]', 'packages = ["app"]'))
    noop = tmp / "noop"
    shutil.copytree(ROOT / "benchmarks" / "_flower_noop", noop)
    home = tmp / "flwr-home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FEDPEFT_BENCH_TIMINGS": str(timings),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(code), str(code / "examples" / "flower"), str(ROOT / "benchmarks"),
                                          str(ROOT / "benchmarks" / "_flower_noop"), os.environ.get("PYTHONPATH", "")])}
    procs = []

    def start(name: str, *args: str) -> None:
        with open(tmp / f"{name}.log", "w") as out:
            procs.append(subprocess.Popen([str(bindir / args[0]), *args[1:]], env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp))

    def lines() -> list:
        return [json.loads(x) for x in timings.read_text().splitlines()] if timings.exists() else []

    def submit(folder: Path, run_config: str, done, deadline_s: float) -> tuple:
        t = time.time()
        run = subprocess.run([str(bindir / "flwr"), "run", str(folder), "bench", "--run-config", run_config],
                             env=env, capture_output=True, text=True, timeout=900, cwd=tmp)
        if run.returncode != 0:
            raise RuntimeError(run.stdout[-3000:] + run.stderr[-3000:])
        deadline = time.monotonic() + deadline_s
        while not done() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not done():
            raise RuntimeError(f"{folder.name}: the run did not finish; logs in {tmp}")
        return t, time.time()

    load0 = os.getloadavg()
    t0 = time.time()
    runs = []  # (kind, start, end, report)
    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
              "--disable-runtime-dependency-installation", "--database", str(tmp / "superlink.db"))
        for i in range(clients):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--host", "127.0.0.1", "--port", str(free_port()),
                  "--node-config", f"partition-id={i} num-partitions={clients}"
                  + (f" state-dir='{tmp / f'node{i}'}'" if state_dir else ""))
        deadline = time.monotonic() + 120  # until the SuperLink listens (seconds under load)
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", link)) == 0:
                    break
            time.sleep(0.5)
        time.sleep(2)  # the SuperNodes connect
        for rep in range(max(1, repeat)):
            for kind, extra in [("noop", ""), *([("noop+" + noop_imports, noop_imports)] if noop_imports else [])]:
                n_done = sum(x["kind"] == "noop.done" for x in lines())
                span = submit(noop, f'num-server-rounds={rounds} num-partitions={clients} extra-imports="{extra}"',
                              lambda n=n_done: sum(x["kind"] == "noop.done" for x in lines()) > n, 60 * rounds + 300)
                runs.append((kind, *span, None))
            report = tmp / f"report-{rep}.json"

            def finished(report=report) -> bool:  # rewritten every round ("status": "running") until the end
                try:
                    return json.loads(report.read_text()).get("status", "completed") != "running"
                except (OSError, ValueError):
                    return False

            span = submit(app, f'report-path="{report}" num-server-rounds={rounds} num-partitions={clients}',
                          finished, 60 * rounds + 300)
            runs.append(("fedpeft", *span, report))
    except RuntimeError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    total = time.time() - t0
    load1 = os.getloadavg()
    every = lines()
    steady = list(range(2, rounds)) if rounds >= 4 else list(range(2, rounds + 1))  # one exchange per round
    per_run = []
    for kind, begin, end, report in runs:
        mine = [x for x in every if begin <= x.get("enter", 0) <= end]
        ex = [x for x in mine if x["kind"] in ("server.exchange", "noop.exchange")]
        times = _round_times(ex, max([x["exit"] for x in ex] or [end]))
        per_run.append({"kind": kind, "start": begin, "end": end, "round_s": times,
                        "steady_s": statistics.median([times[r] for r in steady if r in times] or [float("nan")]),
                        "accuracy": json.loads(report.read_text())["accuracy"] if report else None})
    step = 3 if noop_imports else 2  # the runs of one repetition: noop, [noop+imports], fedpeft
    pairs = [(per_run[i]["steady_s"], per_run[i + step - 1]["steady_s"]) for i in range(0, len(per_run), step)]
    ratio = statistics.median(f / n for n, f in pairs)
    floor2 = [(per_run[i + 1]["steady_s"], per_run[i + 2]["steady_s"]) for i in range(0, len(per_run), step)] \
        if noop_imports else []
    server = [x for x in every if x["kind"] == "server.exchange"]
    msgs = [x for x in every if not x["kind"].startswith(("server.", "noop."))]
    split = _importtime_split(env, "_flower_timed.timed_client")
    out = {"clients": clients, "rounds": rounds, "repeat": repeat, "total_s": total, "load_before": load0,
           "load_after": load1, "runs": per_run, "ratio": ratio, "steady_rounds": steady, "messages": msgs,
           "ratio_to_noop_with_imports": statistics.median(f / n for n, f in floor2) if floor2 else None,
           "server": server, "import_split": split, "messages_per_round": {}}
    print(f"bench_flower --deployed: SuperLink + {clients} SuperNodes on 127.0.0.1, {rounds} rounds of "
          f"examples/flower from {code} and of the no-op app, interleaved {max(1, repeat)}x, {os.cpu_count()} CPUs; "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; total {total:.1f} s")
    for r in per_run:
        print(f"  {r['kind']:<8} round wall time (s): " + ", ".join(f"r{k} {v:.2f}" for k, v in r["round_s"].items())
              + f"; median of rounds {steady[0]}-{steady[-1]}: {r['steady_s']:.2f}")
    print(f"fedpeft round / no-op round (rounds {steady[0]}-{steady[-1]}, median over {len(pairs)} interleaved "
          f"pair(s)): {ratio:.2f}x  (" + ", ".join(f"{f:.2f}/{n:.2f}" for n, f in pairs) + " s)")
    if floor2:
        print(f"fedpeft round / no-op round importing {noop_imports}: "
              f"{statistics.median(f / n for n, f in floor2):.2f}x  ("
              + ", ".join(f"{f:.2f}/{n:.2f}" for n, f in floor2) + " s)")
    later = [x for x in msgs if isinstance(x.get("round"), (int, float)) and x["round"] >= 2]
    phases = ["poll", "runtime", "imports", "build", "data", "train", "eval", "fedpeft", "reply", "total"]
    print(f"{'fedpeft message (median, rounds >= 2)':<38}" + "".join(f"{p:>9}" for p in phases))
    for kind in sorted({x["kind"] for x in later}):
        rows = []
        for x in (y for y in later if y["kind"] == kind):
            # the exchange this message belongs to: the one whose time span holds the handler's end
            held = [e for e in server if e["enter"] <= x["exit"] <= e["exit"]]
            end = held[0]["exit"] if held else float("nan")
            user = sum(x.get(k, 0.0) for k in ("build", "data", "train", "eval"))
            row = {"poll": x["process"] - x["created"], "runtime": x["module"] - x["process"],
                   "imports": x["imported"] - x["module"], "fedpeft": x["exit"] - x["enter"] - user,
                   "reply": end - x["exit"], "total": end - x["created"]}
            row.update({k: x.get(k, 0.0) for k in ("build", "data", "train", "eval")})
            rows.append(row)
        out["messages_per_round"][kind] = len(rows) / max(1, len({x["round"] for x in later}))
        med = {p: statistics.median(r[p] for r in rows) for p in phases}
        print(f"{kind + f' ({len(rows)})':<38}" + "".join(f"{med[p]:>9.2f}" for p in phases))
    print("app import self-time by package (s, -X importtime, on top of Flower's runtime): "
          + ", ".join(f"{k} {v:.2f}" for k, v in split.items() if abs(v) >= 0.005))
    for r in per_run:
        if r["accuracy"]:
            print("per-client accuracy after the last round: " + ", ".join(f"{a:.3f}" for a in r["accuracy"]))
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["local", "flower"], help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1,
                   help="alternate local/flower runs (--deployed: no-op/fedpeft runs) this many times")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--deployed", action="store_true",
                   help="the Deployment Engine on 127.0.0.1 instead: per-message cost breakdown and round time")
    p.add_argument("--code", default=str(ROOT), help="--deployed: the checkout to run (default: this one)")
    p.add_argument("--no-state-dir", action="store_true", help="--deployed: SuperNodes without a state-dir")
    p.add_argument("--noop-imports", default="", metavar="MODULES",
                   help="--deployed: also run the no-op app importing these modules (e.g. torch,timm) per message")
    a = p.parse_args()
    if a.deployed:
        return deployed(a.clients, a.rounds, a.json, Path(a.code).resolve(), not a.no_state_dir, a.repeat,
                        a.noop_imports)
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
