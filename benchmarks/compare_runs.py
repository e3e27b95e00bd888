"""Compare two runs of ``benchmarks/personalize.py``: are they the same table?

    python benchmarks/compare_runs.py RUN_A RUN_B        # two --out folders (or their personalize_<split>.json)

Prints, from the two JSON files:

- how many (seed, method) runs agree **bit for bit** in every training loss and every per-client accuracy (deployed
  and after local training) of the rounds both runs measured (``--eval-every`` may differ), and which do not;
- per method and protocol, both means ± 95 % intervals, their difference, and whether each mean lies inside the other
  run's interval;
- the primary claims whose verdict differs, and the regime go/no-go of both.

Exit status 0 when every run is bit-identical, 1 when some differ (the rest of the report says by how much), 2 when
a file is missing or unreadable, or the two runs are not comparable (other seeds, methods or clients).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


def load(path: str) -> Dict[str, Any]:
    """The JSON of a run: ``path`` itself, or the one ``personalize_*.json`` in the folder ``path``."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("personalize_*.json"))
        if len(found) != 1:
            raise ValueError(f"{p}: expected one personalize_<split>.json, found {len(found)}")
        p = found[0]
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: not a readable run JSON ({e})") from None


def _unmeasured(row: List[Any]) -> bool:
    return all(v is None for v in row)


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> Tuple[List[str], bool]:
    """The report's lines, and whether every run is bit-identical."""
    ra = {(r["seed"], r["method"]): r for r in a["runs"]}
    rb = {(r["seed"], r["method"]): r for r in b["runs"]}
    if ra.keys() != rb.keys() or a.get("clients") != b.get("clients"):
        raise ValueError("the runs are not comparable: other (seed, method) pairs or other clients")
    differ, rows, skipped = [], 0, 0
    for k in ra:
        same = ra[k]["train_loss"] == rb[k]["train_loss"]
        for f in ("deployed", "local"):
            for x, y in zip(ra[k][f], rb[k][f]):
                if _unmeasured(x) or _unmeasured(y):  # --eval-every: a round one of the runs did not measure
                    skipped += _unmeasured(x) != _unmeasured(y)
                    continue
                rows += 1
                same = same and x == y
        if not same:
            differ.append(k)
    lines = [f"{len(ra) - len(differ)} of {len(ra)} (seed, method) runs bit-identical in every training loss and "
             f"in the {rows} round-rows of accuracies both runs measured"
             + (f" ({skipped} rows measured by one run only, skipped)" if skipped else "")]
    if differ:
        methods = sorted({m for _, m in differ})
        lines.append(f"differ: {len(differ)} runs, of {', '.join(methods)}")
    sa = {m["name"]: m for m in a["summary"]["methods"]}
    sb = {m["name"]: m for m in b["summary"]["methods"]}
    lines.append(f"{'method':<17} {'protocol':<9} {'A':>14} {'B':>14} {'B − A':>7}  means inside both intervals")
    for name in sa:
        for protocol in ("deployed", "local"):
            x, y = sa[name].get(protocol), sb[name].get(protocol)
            if x is None or y is None:
                continue
            d = y["mean"] - x["mean"]
            inside = abs(d) <= min(x["ci95"], y["ci95"])  # each mean inside the other's interval
            lines.append(f"{name:<17} {protocol:<9} {100 * x['mean']:6.2f} ± {100 * x['ci95']:4.2f} "
                         f"{100 * y['mean']:6.2f} ± {100 * y['ci95']:4.2f} {100 * d:+7.2f}  {'yes' if inside else 'NO'}")
    pb = {(c["a"], c["b"]): c for c in b["summary"]["primary"]}
    changed = [(c, pb[(c["a"], c["b"])]) for c in a["summary"]["primary"]
               if (c["a"], c["b"]) in pb and c["verdict"] != pb[(c["a"], c["b"])]["verdict"]]
    lines.append(f"primary verdicts that differ: {len(changed)} of {len(a['summary']['primary'])}")
    for x, y in changed:
        lines.append(f"  {x['a']} > {x['b']}: {x['verdict']} (Holm p {x['p_holm']:.3g}) -> {y['verdict']} "
                     f"(Holm p {y['p_holm']:.3g})")
    ga, gb = a["summary"].get("regime"), b["summary"].get("regime")
    if ga and gb:
        lines.append(f"regime: {'GO' if ga['go'] else 'NO-GO'} / {'GO' if gb['go'] else 'NO-GO'}")
    return lines, not differ


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", metavar="RUN_A", help="a --out folder of personalize.py, or its JSON")
    p.add_argument("b", metavar="RUN_B", help="the other run")
    args = p.parse_args(argv)
    try:
        lines, same = compare(load(args.a), load(args.b))
    except (KeyError, TypeError, ValueError) as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
