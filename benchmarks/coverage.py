"""Which registered timm models fedpeft wraps: counts per model class, measured, for the README's coverage statement.

Every model of ``timm.list_models()`` (or of ``--modules``) is built on the ``meta`` device (no memory, no weights,
``pretrained=False``; ``depth=2`` where the model accepts it, its full config otherwise) and grouped by class:
timm's ``VisionTransformer`` family (the class and its subclasses), ``Eva``, ``NaFlexVit`` and everything else. For
each model it records whether ``VPT(model, num_prompts=2, deep=True)``, ``ParallelPrefix(model)`` and
``Prefix(model, length=2)`` are built or refused (with the exception's class and first words), and runs one forward
of the VPT on the meta device (shapes only). Numerical correctness is the tests' job: ``tests/test_eva_registry.py``
checks every registered Eva against the oracles; ``tests/test_vpt.py`` and friends the ViT family's members.

Usage::

    python benchmarks/coverage.py                      # all registered models (~3-5 min on 2 CPU cores)
    python benchmarks/coverage.py --modules eva naflexvit vision_transformer
    python benchmarks/coverage.py --json coverage.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time
import warnings
from typing import Dict, List, Optional

import timm
import torch
from timm.models.eva import Eva
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import VisionTransformer

from fedpeft import VPT, ParallelPrefix, Prefix

FAMILIES = (("VisionTransformer family", VisionTransformer), ("Eva", Eva), ("NaFlexVit", NaFlexVit))


def family(model: torch.nn.Module) -> str:
    for name, cls in FAMILIES:
        if isinstance(model, cls):
            return name
    return "other"


def build(name: str) -> Optional[torch.nn.Module]:
    for kwargs in (dict(depth=2), {}):
        try:
            return timm.create_model(name, pretrained=False, device="meta", **kwargs)
        except Exception:  # a model that does not take depth=2 (or cannot be built on meta)
            continue
    return None


def outcome(cls, model: torch.nn.Module, **kwargs) -> str:
    """``"ok"`` if ``cls(model, **kwargs)`` is built (attention adapters are ejected again), else the refusal."""
    try:
        wrapper = cls(model, **kwargs)
        if hasattr(wrapper, "eject"):
            wrapper.eject()
        return "ok"
    except (TypeError, NotImplementedError, ValueError) as e:
        return f"refused: {type(e).__name__}: {' '.join(str(e).split()[:8])}"


def meta_forward(model: torch.nn.Module) -> str:
    vpt = VPT(model, num_prompts=2, deep=True).eval()
    size = getattr(model.patch_embed, "img_size", None) or (224, 224)
    x = torch.empty(1, getattr(model, "in_chans", 3), *size, device="meta")
    try:
        out = vpt(x)
        return "ok" if out.shape[0] == 1 else f"bad shape {tuple(out.shape)}"
    except Exception as e:  # reported, never hidden
        return f"failed: {type(e).__name__}: {str(e)[:80]}"


def scan(names: List[str]) -> Dict[str, dict]:
    rows: Dict[str, dict] = {}
    for name in names:
        model = build(name)
        if model is None:
            rows[name] = dict(family="unbuildable")
            continue
        row = dict(family=family(model), cls=type(model).__name__)
        row["VPT"] = outcome(VPT, model, num_prompts=2, deep=True)
        row["ParallelPrefix"] = outcome(ParallelPrefix, model, bottleneck=8)
        row["Prefix"] = outcome(Prefix, model, length=2)
        if row["VPT"] == "ok":
            row["forward"] = meta_forward(model)
        rows[name] = row
    return rows


def _reason(result: str) -> str:
    """``"refused: TypeError: blocks.0 (ParallelScalingBlock) has no …"`` → ``"TypeError (ParallelScalingBlock)"``."""
    _, exc, msg = result.split(":", 2)
    if "grouped-query" in msg:
        what = "grouped-query attention"
    elif "cannot wrap" in msg:
        what = msg.split("cannot wrap a")[1].split()[0].rstrip(":;").split(".")[-1]
    elif m := re.search(r"\((\w+)\)", msg) or re.search(r"is ([\w.]+)", msg):
        what = m.group(1).split(".")[-1]
    else:
        what = " ".join(msg.split()[:6])
    return f"{exc.strip()} ({what})"


def summarize(rows: Dict[str, dict]) -> str:
    """A markdown table: per family, models registered, accepted by each wrapper, and refused (models per reason)."""
    fams = collections.defaultdict(list)
    for row in rows.values():
        fams[row["family"]].append(row)
    methods = ("VPT", "ParallelPrefix", "Prefix")
    lines = ["| family | registered | VPT | ParallelPrefix | Prefix | refused: models × reason |",
             "|---|---|---|---|---|---|"]
    for fam in [f for f, _ in FAMILIES] + ["other", "unbuildable"]:
        items = fams.get(fam, [])
        if not items:
            continue
        if fam == "unbuildable":
            lines.append(f"| not buildable on meta | {len(items)} | - | - | - | - |")
            continue
        ok = {m: sum(r[m] == "ok" and (m != "VPT" or r.get("forward") == "ok") for r in items) for m in methods}
        reasons = collections.Counter(
            reason for r in items for reason in sorted({_reason(r[m]) for m in methods if r[m] != "ok"})
        )
        why = "; ".join(f"{n} × {k}" for k, n in reasons.most_common()) if fam != "other" else (
            "; ".join(f"{n} × {k.split(':')[0]}" for k, n in
                      collections.Counter(_reason(r["VPT"]).split(" ")[0] for r in items if r["VPT"] != "ok").items())
        )
        lines.append(f"| {fam} | {len(items)} | {ok['VPT']} | {ok['ParallelPrefix']} | {ok['Prefix']} | {why} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="*", help="timm model modules to scan (default: every registered model)")
    ap.add_argument("--json", help="write the per-model outcomes here")
    ap.add_argument("--from-json", help="summarize the outcomes a previous run wrote (no scan)")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(summarize(json.load(f)))
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = sorted({n for m in args.modules for n in timm.list_models(module=m)}) if args.modules else timm.list_models()
    t0 = time.perf_counter()
    rows = scan(names)
    print(f"timm {timm.__version__}, torch {torch.__version__}: {len(names)} registered models scanned in "
          f"{time.perf_counter() - t0:.0f} s")
    print(summarize(rows))
    bad = {n: r for n, r in rows.items() if r.get("VPT") == "ok" and r.get("forward") != "ok"}
    for n, r in bad.items():
        print(f"VPT built but its meta forward failed: {n}: {r['forward']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
