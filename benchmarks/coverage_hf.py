"""Which ``transformers`` image models fedpeft wraps: every class, measured, the sibling of ``coverage.py`` (timm).

Every image-classification model class ``transformers`` registers (``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``)
and the base model of the same config (``MODEL_MAPPING_NAMES``) is built from its default config shrunk to 2 layers of
width 32 (no download, random weights) and wrapped with ``VPT(model, num_prompts=2, deep=True)``,
``ParallelPrefix(model, bottleneck=8)`` and ``Prefix(model, length=2)``; each is recorded as built or refused (the
exception's class and first words). For the accepted classes the VPT runs one forward on a random image, and with
K = 0 its output must equal the plain model's own output (logits or ``pooler_output``). Numerical equivalence with
timm is the tests' job (``tests/test_hf_equivalence.py``).

Usage::

    python benchmarks/coverage_hf.py                  # ~6 min on a shared 2-core CPU (big default configs)
    python benchmarks/coverage_hf.py --json coverage_hf.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
import transformers
from transformers.models.auto import modeling_auto

from fedpeft import VPT, ParallelPrefix, Prefix

# benchmarks/coverage.py's outcome(): built (attention adapters ejected again) or refused. Loaded by path: the name
# `coverage` is also coverage.py's (pytest-cov's) package.
_spec = importlib.util.spec_from_file_location("timm_coverage", Path(__file__).with_name("coverage.py"))
_timm_coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_timm_coverage)
outcome = _timm_coverage.outcome

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8, num_labels=3, mlp_ratio=2)


def classes() -> Dict[str, str]:
    """class name → config key, for every image-classification class and its config's base model."""
    out: Dict[str, str] = {}
    for key, names in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items():
        for name in (names,) if isinstance(names, str) else names:
            out[name] = key
        base = modeling_auto.MODEL_MAPPING_NAMES.get(key)
        for name in (base,) if isinstance(base, str) else (base or ()):
            out[name] = key
    return dict(sorted(out.items()))


def build(name: str, key: str) -> Optional[torch.nn.Module]:
    """The class on its default config shrunk by ``SMALL``; where shrinking breaks the config (per-stage lists of
    widths: Swin, PVT, …), the default config on the ``meta`` device (no memory; enough to be refused)."""
    try:
        config = transformers.AutoConfig.for_model(key)
        for attr, value in SMALL.items():
            if hasattr(config, attr):
                setattr(config, attr, value)
        return getattr(transformers, name)(config).eval()
    except Exception:
        pass
    try:
        with torch.device("meta"):
            return getattr(transformers, name)(transformers.AutoConfig.for_model(key)).eval()
    except Exception:  # not buildable from its default config at all
        return None


def check_forward(model: torch.nn.Module) -> str:
    """VPT with K = 0 must return exactly the plain model's output; with K = 2 a tensor of the same shape."""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=x)
        plain = out.logits if hasattr(out, "logits") else out.pooler_output
        zero = VPT(model, num_prompts=0)(x)
    if not torch.equal(zero, plain):
        return f"K = 0 differs from the plain model by {float((zero - plain).abs().max()):.2e}"
    return "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the per-class outcomes here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows: Dict[str, dict] = {}
    for name, key in classes().items():
        model = build(name, key)
        if model is None:
            rows[name] = dict(config=key, built=False)
            continue
        row = dict(config=key, built=True)
        row["VPT"] = outcome(VPT, model, num_prompts=2, deep=True)
        row["ParallelPrefix"] = outcome(ParallelPrefix, model, bottleneck=8)
        row["Prefix"] = outcome(Prefix, model, length=2)
        if row["VPT"] == "ok":
            row["forward"] = check_forward(model) if next(model.parameters()).device.type != "meta" else "meta"
        rows[name] = row
    built = [r for r in rows.values() if r["built"]]
    ok = {n: r for n, r in rows.items() if r.get("VPT") == "ok"}
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {len(rows)} classes, {len(built)} "
          f"built, scanned in {time.perf_counter() - t0:.0f} s")
    print("| class | VPT | ParallelPrefix | Prefix | VPT(K = 0) == plain model |")
    print("|---|---|---|---|---|")
    for n, r in ok.items():
        print(f"| `{n}` | {r['VPT']} | {r['ParallelPrefix']} | {r['Prefix']} | {r['forward']} |")
    refused = sorted(n for n, r in rows.items() if r["built"] and n not in ok)
    reasons = {rows[n]["VPT"].split(":")[1].strip() for n in refused}
    print(f"refused ({len(refused)}, {', '.join(sorted(reasons))} naming the supported classes): "
          + ", ".join(refused))
    unbuilt = sorted(n for n, r in rows.items() if not r["built"])
    print(f"not built from their default config ({len(unbuilt)}): " + ", ".join(unbuilt))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
