"""``import fedpeft`` / ``import fedpeft.flower`` import neither timm nor scikit-learn (a deployed ClientApp pays its
imports on every message); timm is loaded on the first use of a wrapper, and module scans do not trigger it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


HEAVY = "sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'sklearn', 'scipy', 'torchvision'})"


@pytest.mark.parametrize("module", ["fedpeft", "fedpeft.protocols"])
def test_import_does_not_load_timm_or_sklearn(module):
    assert _run(f"import sys, inspect, {module}; inspect.getmodule(inspect.getmodule); print({HEAVY})") == "[]"


def test_import_flower_does_not_load_timm_or_sklearn():
    pytest.importorskip("flwr")
    assert _run(f"import sys, fedpeft.flower; print({HEAVY})") == "[]"


def test_timm_loads_on_first_use_and_the_wrapper_works():
    out = _run("import sys, torch, timm, fedpeft\n"
               "torch.manual_seed(0)\n"
               "m = timm.create_model('test_vit', pretrained=False, num_classes=3)\n"
               "x = torch.randn(2, 3, 160, 160)\n"
               "v = fedpeft.VPT(m, num_prompts=0)\n"  # no prompts: exactly the plain model (the oracle)
               "print(torch.equal(v(x), m(x)), type(fedpeft._timm).__name__, fedpeft._timm.VisionTransformer.__name__)")
    assert out == "True _LazyModule VisionTransformer"
