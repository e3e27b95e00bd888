"""The outputs of a multi-seed run: the table, the paired verdicts, CSV, JSON and a PNG plot.

Numbers, per method and evaluation protocol (``deployed``: the latest shared state with the client's own personal
state, pFedPG's generated prompts; ``local``: the client's model right after its local training of that round):

- a client's accuracy in one seed is the mean of its top-1 test accuracy over the **last ``L`` rounds** (``L`` = 3 by
  default, fewer if the run is shorter), which smooths the round-to-round wobble of 100 test images per client;
- a seed's value is the mean over clients of those; the table shows the mean over seeds ± the half-width of the 95 %
  t-interval over seeds (:mod:`.stats`), and each client's column the mean over seeds;
- the paired verdicts compare two methods seed by seed (same split, backbone and batches): the primary claims
  Holm-corrected (:mod:`.stats`), the rest exploratory ("hint" words). Seeds repeat the clients, heads and batches on
  the one shipped backbone, so every verdict is conditional on that backbone;
- the regime go/no-go (:func:`regime`): whether the run is in the regime the prompt papers claim (prompts competitive
  with fine-tuning, ahead of a linear probe, family structure worth having, local training converged in a round).

Parameter counts are per client: trainable (what a client optimizes), communicated per round (what it uploads).
Wall and CPU are the mean wall time and CPU seconds of one seed's run of the method; GFLOP its counted matmul work
(:mod:`.flops`), and "of matmul" the FLOPs per CPU-second as a share of a plain ``torch.matmul``'s rate on one thread
of the same machine (CPU seconds, not wall time, so other jobs on the machine do not change it).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import RunConfig
from .stats import ALPHA, Claim, Interval, Paired, comparisons, holm_claims, paired, t_interval

__all__ = [
    "PROTOCOLS",
    "Summary",
    "format_pfedpg",
    "format_regime",
    "format_table",
    "format_verdicts",
    "pfedpg_server",
    "plot_curves",
    "regime",
    "summary_json",
    "write_all",
    "write_csv",
    "write_json",
]

#: pFedPG's claims are testable once its server keeps this share of each round (mean retention over rounds and
#: seeds); below it, a pFedPG client restarts every round from an almost untouched gen(n) (issue 24)
TESTABLE_RETENTION = 0.1

#: record key → column title
PROTOCOLS: Dict[str, str] = {"deployed": "Deployed", "local": "After local training"}

Records = Dict[Tuple[int, str], Dict[str, Any]]


def _last_mean(curve: Sequence[Sequence[Optional[float]]], last: int) -> List[float]:
    """Per client, the mean of its accuracy over the last ``last`` rounds of ``curve`` (rounds × clients).

    ``None`` (a client that did not train in a round, ``--fraction`` < 1) is skipped; a client without any value in
    those rounds gets its last value of the whole run (``nan`` if it never trained).
    """
    out = []
    for c in range(len(curve[0])):
        values = [r[c] for r in curve[-last:] if r[c] is not None]
        if not values:
            values = [r[c] for r in curve if r[c] is not None][-1:] or [float("nan")]
        out.append(statistics.fmean(values))
    return out


def _mean(values: Sequence[float]) -> float:
    """Mean of the non-``nan`` values (``nan`` if there are none)."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else float("nan")


class Summary:
    """Everything the table, the verdicts and the files need, computed once from the per-(seed, method) records."""

    def __init__(self, records: Records, seeds: Sequence[int], methods: Sequence[str], last_rounds: int) -> None:
        self.records, self.seeds, self.methods = records, list(seeds), list(methods)
        first = records[(self.seeds[0], self.methods[0])]
        self.rounds = len(first["deployed"])
        self.last = max(1, min(last_rounds, self.rounds))
        self.protocols = [p for p in PROTOCOLS if all(records[k].get(p) for k in records)]
        if "deployed" not in self.protocols:
            raise ValueError("every record needs its per-round deployed accuracies")
        # per protocol, method: per seed (per-client last-L means)
        self.clients: Dict[str, Dict[str, List[List[float]]]] = {
            p: {m: [_last_mean(records[(s, m)][p], self.last) for s in self.seeds] for m in self.methods}
            for p in self.protocols
        }
        self.per_seed: Dict[str, Dict[str, List[float]]] = {
            p: {m: [_mean(c) for c in self.clients[p][m]] for m in self.methods} for p in self.protocols
        }
        self.interval: Dict[str, Dict[str, Interval]] = {
            p: {m: t_interval(self.per_seed[p][m]) for m in self.methods} for p in self.protocols
        }
        # exploratory comparisons, per protocol, without those of identical runs (e.g. FedAvg-FT and FedAvg right
        # after local training: the same training, so the same numbers)
        self.pairs: Dict[str, List[Paired]] = {
            p: [paired(a, b, claim, self.per_seed[p]) for a, b, claim in comparisons(self.methods)
                if not self.identical(p, a, b)]
            for p in self.protocols
        }
        self.identical_pairs: Dict[str, List[Tuple[str, str]]] = {
            p: [(a, b) for a, b, _ in comparisons(self.methods) if self.identical(p, a, b)] for p in self.protocols
        }
        # the primary claims: deployed accuracy, Holm-corrected
        self.claims: List[Claim] = holm_claims(self.per_seed["deployed"], self.methods)
        self.pfedpg = pfedpg_server(records, self.seeds)

    def verdict(self, a: str, b: str, verdict: str) -> str:
        """``verdict``, or "not testable at this budget (retention x%)" for a comparison with pFedPG while its
        server keeps less than :data:`TESTABLE_RETENTION` of each round."""
        if "pFedPG" in (a, b) and self.pfedpg is not None and self.pfedpg["retention"] < TESTABLE_RETENTION:
            return f"not testable at this budget (retention {100 * self.pfedpg['retention']:.2g}%)"
        return verdict

    def identical(self, protocol: str, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are the same runs under ``protocol``: the same per-client, per-round training losses
        (the same training, to the last bit) and accuracies in every seed, e.g. FedAvg-FT and FedAvg right after
        local training. Equal accuracies alone (coarse on small test sets) do not make runs identical."""
        return all(self.records[(s, a)][protocol] == self.records[(s, b)][protocol]
                   and self.records[(s, a)]["train_loss"] == self.records[(s, b)]["train_loss"] for s in self.seeds)

    def client_means(self, protocol: str, method: str) -> List[float]:
        per_seed = self.clients[protocol][method]
        return [_mean(col) for col in zip(*per_seed)]

    def curve(self, protocol: str, method: str) -> List[Interval]:
        """Per round: mean over clients, then mean ± 95 % interval over seeds."""
        per_seed = [[_mean([v for v in r if v is not None]) for r in self.records[(s, method)][protocol]]
                    for s in self.seeds]
        return [t_interval(col) for col in zip(*per_seed)]

    def cost(self, method: str) -> Dict[str, float]:
        recs = [self.records[(s, method)] for s in self.seeds]
        wall = statistics.fmean(r["wall_s"] for r in recs)
        cpu = statistics.fmean(r["cpu_s"] for r in recs)
        flops = statistics.fmean(r["flops"]["total"] for r in recs)
        return {"wall_s": wall, "cpu_s": cpu, "gflop": flops / 1e9,
                "gflops_per_cpu_s": flops / 1e9 / cpu if cpu else float("nan"),
                "trainable": recs[0]["trainable"], "communicated": recs[0]["communicated"],
                "server": recs[0]["server_params"]}


def _pct(iv: Interval) -> str:
    if math.isnan(iv.half):
        return f"{100 * iv.mean:.1f}"
    return f"{100 * iv.mean:.1f} ± {100 * iv.half:.1f}"


def _count(n: int, ref: int) -> str:
    if n == 0:
        return "0"
    return f"{n:,} ({100.0 * n / ref:.3g}%)" if ref else f"{n:,}"


def format_table(s: Summary, clients: Sequence[str], backbone_params: int, matmul_gflops: float) -> str:
    """A fixed-width table: per-client mean (first protocol), mean ± 95 % CI per protocol, costs."""
    show = len(clients) <= 10
    first = s.protocols[0]
    head = ["Method"] + (list(clients) if show else []) + [PROTOCOLS[p] for p in s.protocols]
    head += ["Trainable", "Comm./round", "Wall/seed", "CPU/seed", "GFLOP", "of matmul"]
    rows = []
    for m in s.methods:
        c = s.cost(m)
        cells = [m] + ([f"{100 * a:.1f}" for a in s.client_means(first, m)] if show else [])
        cells += [_pct(s.interval[p][m]) for p in s.protocols]
        trainable = _count(c["trainable"], backbone_params) + (f" +{c['server']:,} server" if c["server"] else "")
        share = c["gflops_per_cpu_s"] / matmul_gflops if matmul_gflops else float("nan")
        cells += [trainable, _count(c["communicated"], backbone_params), f"{c['wall_s']:.0f}s", f"{c['cpu_s']:.0f}s",
                  f"{c['gflop']:.1f}", f"{100 * share:.1f}%"]
        rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths)] + [fmt.format(*r) for r in rows]
    lines.append(
        f"accuracy %: mean of the last {s.last} rounds, mean over clients, mean ± 95% t-interval over "
        f"{len(s.seeds)} seeds {s.seeds}; client columns: {PROTOCOLS[first].lower()}, mean over seeds. "
        f"Parameters: % of the {backbone_params:,}-parameter backbone with head; "
        f"'of matmul': GFLOP per CPU-second / {matmul_gflops:.1f} GFLOP/s of a plain matmul on 1 thread"
    )
    return "\n".join(lines)


def format_verdicts(s: Summary) -> str:
    """The primary claims (Holm) with p-values and minimal detectable differences, the oracle's margin, then the
    exploratory comparisons per protocol (uncorrected 95 % intervals)."""
    n = len(s.seeds)
    lines = [f"primary claims, conditional on the shipped backbone (seeds repeat clients, heads and batches on it): "
             f"deployed accuracy, A − B in points over {n} paired seeds (95% t-interval); two-sided paired t-test, "
             f"Holm–Bonferroni over the {len(s.claims)} claims (family-wise α = {ALPHA}); MDD: the difference this "
             f"run detects with 80% power at Holm's strictest step (exact non-central t):"]
    width = max([len(f"{c.pair.a} > {c.pair.b}") for c in s.claims]
                + [len(f"{q.a} > {q.b}") for p in s.protocols for q in s.pairs[p]] + [10])
    for c in s.claims:
        lines.append(f"  {c.pair.a + ' > ' + c.pair.b:<{width}}  {_pct(c.pair.diff):>14}  p {c.p:<7.3g} "
                     f"Holm p {c.p_holm:<7.3g} MDD {100 * c.mdd:4.1f}  {s.verdict(c.pair.a, c.pair.b, c.verdict):<28}  "
                     f"({c.pair.claim})")
    if not s.claims:
        lines.append("  none (the compared methods were not all run)")
    margin = oracle_margin(s)
    if margin is not None:
        lines.append(f"oracle margin: Clustered-FedVPT − FedVPT = {_pct(margin)} points (deployed, 95% t-interval)")
    lines.append("exploratory comparisons (uncorrected 95% t-intervals: hints, not findings):")
    for p in s.protocols:
        lines.append(f"  {PROTOCOLS[p]}:")
        for q in s.pairs[p]:
            lines.append(f"    {q.a + ' > ' + q.b:<{width}}  {_pct(q.diff):>14}  {s.verdict(q.a, q.b, q.hint):<14}  "
                         f"({q.claim})")
        for a, b in s.identical_pairs[p]:
            lines.append(f"    {a + ' > ' + b:<{width}}  (not compared: identical runs under this protocol)")
    return "\n".join(lines)


def oracle_margin(s: Summary) -> Optional[Interval]:
    """Clustered-FedVPT − FedVPT, deployed, mean ± 95 % interval over seeds (``None`` unless both ran)."""
    if "Clustered-FedVPT" not in s.methods or "FedVPT" not in s.methods:
        return None
    return paired("Clustered-FedVPT", "FedVPT", "", s.per_seed["deployed"]).diff


#: the regime go/no-go (issue 25): (name, A, B, the least A − B in points that passes)
REGIME: List[Tuple[str, str, str, float]] = [
    ("prompts competitive with fine-tuning", "SingleSet-VPT", "Local-FT", -2.0),
    ("prompts beat a linear probe", "SingleSet-VPT", "Local", 3.0),
    ("the family oracle's margin", "Clustered-FedVPT", "FedVPT", 3.0),
]
#: local training has converged within a round when doubling its epochs moves after-local accuracy by less than this
CONVERGED_POINTS = 1.0


def regime(s: Summary) -> Optional[Dict[str, Any]]:
    """The regime go/no-go: each criterion's A − B (deployed, mean over seeds, points) and whether it passes; the
    convergence probe (records' ``convergence``: one FedVPT round from the same state with E and 2E local epochs,
    mean after-local accuracy over clients); ``go`` when every criterion ran and passed. ``None`` if none ran."""
    rows = []
    for name, a, b, least in REGIME:
        if a in s.methods and b in s.methods:
            diff = 100 * paired(a, b, "", s.per_seed["deployed"]).diff.mean
            rows.append({"criterion": name, "a": a, "b": b, "diff": diff, "least": least, "passes": diff >= least})
    probes = [r["convergence"] for r in s.records.values() if r.get("convergence")]
    if probes:
        move = 100 * statistics.fmean(p["after_local_2x"] - p["after_local"] for p in probes)
        rows.append({"criterion": "local training converges within a round", "a": f"{2 * probes[0]['epochs']} epochs",
                     "b": f"{probes[0]['epochs']} epochs", "diff": move, "least": None,
                     "passes": abs(move) < CONVERGED_POINTS})
    if not rows:
        return None
    return {"criteria": rows, "go": len(rows) == len(REGIME) + 1 and all(r["passes"] for r in rows)}


def format_regime(reg: Optional[Dict[str, Any]]) -> str:
    if reg is None:
        return ""
    lines = [f"regime go/no-go (deployed, mean over seeds): {'GO' if reg['go'] else 'NO-GO'}"]
    for r in reg["criteria"]:
        need = f"≥ {r['least']:+.0f}" if r["least"] is not None else f"|·| < {CONVERGED_POINTS:g}"
        lines.append(f"  {r['a'] + ' − ' + r['b']:<34} {r['diff']:+6.1f} points (needs {need:<7})  "
                     f"{'passes' if r['passes'] else 'FAILS':<6}  ({r['criterion']})")
    return "\n".join(lines)


def pfedpg_server(records: Records, seeds: Sequence[int]) -> Optional[Dict[str, Any]]:
    """pFedPG's server step over all seeds, from the per-round diagnostics of ``fedpeft.protocols.PFedPGServer``.

    ``closer``: client-rounds where ``‖gen(n) − P̃ₙ‖`` shrank through the server step, of all client-rounds
    (``descending``: their share); ``trained_norm``: mean ‖P̃ₙ‖ over clients in the first and the last round (mean
    over seeds); ``spread``: the mean distance of the clients' generated prompts to their mean, relative to the
    mean's norm, first and last round; ``spread_rounds``: the rounds (1-based) of ``spread_at``, the spread at the
    first, middle and last round (mean over seeds); ``retention``: the share of the way to P̃ₙ each round's fit kept,
    mean over rounds and seeds (``retention_at``: at the same three rounds); ``residual``: ‖gen(n) − P̃ₙ‖/‖P̃ₙ‖
    after the last round's fit; ``steps``: server steps per round (mean). ``None`` when pFedPG was not run.
    """
    logs = [records[(s, "pFedPG")]["server"] for s in seeds if (s, "pFedPG") in records]
    if not logs:
        return None
    closer = total = 0
    first_norm, last_norm, at, kept, kept_at, residual, steps = [], [], [], [], [], [], []
    for log in logs:
        diags = [r["diagnostics"] for r in log if r.get("diagnostics")]
        for d in diags:
            closer += sum(a < b for a, b in zip(d["dist_after"], d["dist_before"]))
            total += len(d["dist_before"])
        if diags:
            first_norm.append(statistics.fmean(diags[0]["trained_norm"]))
            last_norm.append(statistics.fmean(diags[-1]["trained_norm"]))
            rounds3 = (0, (len(diags) + 1) // 2 - 1, len(diags) - 1)
            at.append([diags[i]["spread"] for i in rounds3])
            # records of fedpeft ≤ 0.2 have no retention: from the distances (the same definition)
            ret = [d.get("retention", statistics.fmean(1 - a / b for a, b in zip(d["dist_after"], d["dist_before"])))
                   for d in diags]
            kept.append(statistics.fmean(ret))
            kept_at.append([ret[i] for i in rounds3])
            residual.append(statistics.fmean(a / n for a, n in zip(diags[-1]["dist_after"],
                                                                  diags[-1]["trained_norm"])))
            steps.append(statistics.fmean(d.get("steps", 1) for d in diags))
    if not total:
        return None
    rounds = min(len([r for r in log if r.get("diagnostics")]) for log in logs)
    spread_at = [statistics.fmean(a[i] for a in at) for i in range(3)]
    return {"closer": closer, "client_rounds": total, "descending": closer / total,
            "trained_norm": [statistics.fmean(first_norm), statistics.fmean(last_norm)],
            "spread": [spread_at[0], spread_at[2]], "spread_rounds": [1, (rounds + 1) // 2, rounds],
            "spread_at": spread_at, "retention": statistics.fmean(kept),
            "retention_at": [statistics.fmean(a[i] for a in kept_at) for i in range(3)],
            "residual": statistics.fmean(residual), "steps": statistics.fmean(steps)}


def format_pfedpg(diag: Optional[Dict[str, Any]], optimizer: str, lr: float) -> str:
    if diag is None:
        return ""
    r, s = diag["spread_rounds"], diag["spread_at"]
    server = {"paper": "paper: one SGD step lr 0.001, VPT init",
              "default": "default: Adam fit, lr 1e-2 descriptors / 1e-3 rest"}.get(optimizer, f"{optimizer}, lr {lr:g}")
    k = diag["retention_at"]
    return (f"pFedPG server ({server}, {diag['steps']:.3g} steps per round): retention {100 * diag['retention']:.3g}% "
            f"(the share of the way to P̃ₙ the generator kept, mean over rounds; rounds {r[0]}/{r[1]}/{r[2]}: "
            f"{100 * k[0]:.3g}% / {100 * k[1]:.3g}% / {100 * k[2]:.3g}%), residual ‖gen(n) − P̃ₙ‖/‖P̃ₙ‖ "
            f"{diag['residual']:.3g} after the last round; descending {100 * diag['descending']:.0f}% "
            f"({diag['closer']}/{diag['client_rounds']} client-rounds where gen(n) moved closer to P̃ₙ); "
            f"spread of gen(ids) across clients at rounds {r[0]}/{r[1]}/{r[2]}: "
            f"{100 * s[0]:.3g}% / {100 * s[1]:.3g}% / {100 * s[2]:.3g}% of their mean's norm; mean ‖P̃ₙ‖ "
            f"{diag['trained_norm'][0]:.3g} (round 1) → {diag['trained_norm'][1]:.3g} (last)")


def write_csv(path: Path, s: Summary, clients: Sequence[str]) -> None:
    """One row per (method, protocol, seed) and one per (method, protocol) aggregate (seed = "mean"/"ci95")."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "protocol", "seed", "mean", *[f"acc_{c}" for c in clients], "trainable_params",
                    "communicated_params_per_round", "server_params", "wall_s", "gflop"])
        for m in s.methods:
            for p in s.protocols:
                for i, seed in enumerate(s.seeds):
                    r = s.records[(seed, m)]
                    w.writerow([m, p, seed, f"{s.per_seed[p][m][i]:.6f}", *[f"{a:.6f}" for a in s.clients[p][m][i]],
                                r["trainable"], r["communicated"], r["server_params"], f"{r['wall_s']:.2f}",
                                f"{r['flops']['total'] / 1e9:.3f}"])
                iv, c = s.interval[p][m], s.cost(m)
                w.writerow([m, p, "mean", f"{iv.mean:.6f}", *[f"{a:.6f}" for a in s.client_means(p, m)],
                            c["trainable"], c["communicated"], c["server"], f"{c['wall_s']:.2f}", f"{c['gflop']:.3f}"])
                w.writerow([m, p, "ci95", f"{iv.half:.6f}", *([""] * len(clients)), "", "", "", "", ""])


def _numbers(values: Any) -> List[Optional[float]]:
    """``values`` with ``nan`` (an unmeasured round, a one-seed interval) as ``None``: strict JSON has no NaN."""
    return [None if math.isnan(v) else v for v in values]


def summary_json(s: Summary) -> Dict[str, Any]:
    """The aggregate part of the JSON: per method and protocol, the interval and per-seed values; the verdicts."""
    methods = []
    for m in s.methods:
        entry: Dict[str, Any] = {"name": m, **s.cost(m)}
        for p in s.protocols:
            iv, curve = s.interval[p][m], s.curve(p, m)
            entry[p] = {"mean": iv.mean, "ci95": iv.half, "per_seed": s.per_seed[p][m],
                        "per_client": s.client_means(p, m), "per_seed_per_client": s.clients[p][m],
                        "curve_mean": _numbers(c.mean for c in curve), "curve_ci95": _numbers(c.half for c in curve)}
        methods.append(entry)
    hints = [{"protocol": p, "a": q.a, "b": q.b, "claim": q.claim, "diff": q.diff.mean, "ci95": q.diff.half,
              "per_seed": list(q.per_seed), "hint": s.verdict(q.a, q.b, q.hint)}
             for p in s.protocols for q in s.pairs[p]]
    claims = [{"a": c.pair.a, "b": c.pair.b, "claim": c.pair.claim, "diff": c.pair.diff.mean,
               "ci95": c.pair.diff.half, "per_seed": list(c.pair.per_seed), "p": c.p, "p_holm": c.p_holm,
               "mdd": c.mdd, "verdict": s.verdict(c.pair.a, c.pair.b, c.verdict)} for c in s.claims]
    margin = oracle_margin(s)
    return {"last_rounds": s.last, "seeds": s.seeds, "methods": methods, "primary": claims,
            "oracle_margin": None if margin is None else {"mean": margin.mean, "ci95": margin.half},
            "exploratory": hints, "regime": regime(s)}


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">"]


def plot_curves(path: Path, s: Summary, title: str) -> None:
    """Mean client accuracy after each measured round (``--eval-every``), mean over seeds.

    Top row: one panel per protocol with every method's mean curve (markers and line styles tell overlapping curves
    apart). Below: one small panel per method with both protocols' mean curves and their 95 % bands over seeds (bands
    of 11 methods in one panel would hide each other). Integer round ticks, legends outside the data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    protocols, methods = list(s.protocols), list(s.methods)
    cols = 4
    rows = math.ceil(len(methods) / cols)
    fig = plt.figure(figsize=(16, 4.2 + 2.6 * rows), dpi=110)
    grid = fig.add_gridspec(1 + rows, cols * len(protocols), height_ratios=[1.6] + [1.0] * rows, hspace=0.55,
                            wspace=0.5)
    # the measured rounds only (RunConfig.measured: the others have no accuracy)
    points = {(p, m): [(r, c) for r, c in enumerate(s.curve(p, m), 1) if not math.isnan(c.mean)]
              for p in protocols for m in methods}
    means = [100 * c.mean for cs in points.values() for _, c in cs]
    low, high = (min(means), max(means)) if means else (0.0, 100.0)
    pad = max(2.0, 0.08 * (high - low))
    ylim = (max(0.0, low - pad), min(100.0, high + pad))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")

    def style(ax, ylabel: bool) -> None:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if not ylabel:
            ax.tick_params(labelleft=False)

    width = cols * len(protocols) // len(protocols)
    for j, p in enumerate(protocols):
        ax = fig.add_subplot(grid[0, j * width:(j + 1) * width])
        for i, m in enumerate(methods):
            xs = [r for r, _ in points[(p, m)]]
            ax.plot(xs, [100 * c.mean for _, c in points[(p, m)]], color=cmap(i),
                    linestyle=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)], markersize=4,
                    markevery=max(1, len(xs) // 10), label=m)
        ax.set_title(f"{PROTOCOLS[p]}: mean over {len(s.seeds)} seeds", fontsize=10)
        ax.set_xlabel("round")
        style(ax, j == 0)
        if j == 0:
            ax.set_ylabel("mean client test accuracy (%)")
        if j == len(protocols) - 1:
            ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    for k, m in enumerate(methods):
        r, c = divmod(k, cols)
        ax = fig.add_subplot(grid[1 + r, c * len(protocols):(c + 1) * len(protocols)])
        for j, p in enumerate(protocols):
            xs, cs = [r for r, _ in points[(p, m)]], [c for _, c in points[(p, m)]]
            color = "tab:blue" if j == 0 else "tab:orange"
            ax.plot(xs, [100 * x.mean for x in cs], color=color, linestyle=_STYLES[j], label=PROTOCOLS[p])
            if len(s.seeds) > 1:
                ax.fill_between(xs, [max(0.0, 100 * x.low) for x in cs], [min(100.0, 100 * x.high) for x in cs],
                                color=color, alpha=0.18, linewidth=0)
        ax.set_title(m, fontsize=9)
        style(ax, c == 0)
        if k == len(methods) - 1:
            ax.legend(loc="center left", bbox_to_anchor=(1.05, 0.5), fontsize=8, frameon=False,
                      title="95% band over seeds", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _environment(cfg: RunConfig) -> Dict[str, Any]:
    import timm
    import torch

    import fedpeft

    env: Dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "fedpeft": fedpeft.__version__, "threads_per_process": cfg.threads, "workers": cfg.workers,
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
    }
    return env


def _engine(cfg: RunConfig) -> Dict[str, Any]:
    """Which engine ran the methods (and Flower's version when it was Flower)."""
    if cfg.engine != "flower":
        return {"name": cfg.engine}
    import flwr

    return {"name": "flower", "flwr": flwr.__version__}


def write_all(cfg: RunConfig, prepared: Dict[int, Dict[str, Any]], records: Records, wall: float,
              argv: Sequence[str]) -> None:
    """Print the table, the verdicts, the regime go/no-go, pFedPG's server line, the versions and the time; write
    ``personalize_<split>.csv``, ``.json`` and ``.png`` into ``cfg.out``."""
    from .flops import matmul_rate

    tag = "folders" if cfg.data.data else cfg.data.split
    first = prepared[cfg.seeds[0]]
    names, backbone_params, info = first["clients"], first["backbone_params"], first["backbone"]
    rate = matmul_rate() / 1e9
    s = Summary(records, cfg.seeds, cfg.methods, cfg.last_rounds)
    env = _environment(cfg)
    title = (f"fedpeft personalize.py: {tag}, {len(names)} clients, {cfg.budget.rounds} rounds x "
             f"{cfg.budget.local_epochs} local epochs, evaluated on {cfg.data.evaluate}, backbone "
             f"{info.get('source', info.get('checkpoint', '?'))}")
    table, verdicts = format_table(s, names, backbone_params, rate), format_verdicts(s)
    versions = (f"torch {env['torch']}, timm {env['timm']}, fedpeft {env['fedpeft']}, python {env['python']}, "
                f"{env['machine']}; backbone sha256 {info.get('sha256', '-')}")
    reg = regime(s)
    server = pfedpg_server(records, cfg.seeds)
    server_line = format_pfedpg(server, cfg.budget.generator_optimizer, cfg.budget.generator_lr)
    cpu = sum(r["cpu_s"] for r in records.values())
    print(f"budget: {asdict(cfg.budget)}")
    if cfg.rebuild_backbone:
        print("--pretrain: the backbone was pre-trained anew (or taken from the cache), not the shipped one: this "
              "table is not the recorded one")
    print(f"\n{title}\n{table}\n{versions}\n\n{verdicts}\n")
    for part in (format_regime(reg), server_line):
        if part:
            print(part + "\n")
    print(f"total wall time {wall:.0f}s ({cpu:.0f} CPU-seconds in the method runs; load average at the end "
          f"{os.getloadavg()[0]:.1f})")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"personalize_{tag}"
    write_csv(stem.with_suffix(".csv"), s, names)
    write_json(stem.with_suffix(".json"), {
        "title": title, "command": "python benchmarks/personalize.py " + " ".join(argv), "config": cfg.as_dict(),
        "clients": names,
        "backbone": {"params": backbone_params, "info": info},
        "data": {seed: prepared[seed]["data"] for seed in cfg.seeds},
        "summary": summary_json(s), "runs": [records[k] for k in records], "total_wall_s": wall,
        "matmul_gflops_1thread": rate, "engine": _engine(cfg), "environment": env, "table": table, "versions": versions,
        "verdicts": verdicts, "pfedpg_server": server, "method_cpu_s": cpu,
    })
    plot_curves(stem.with_suffix(".png"), s, title)
    print(f"wrote {stem}.csv, .json, .png")
