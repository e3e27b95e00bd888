"""fedpeft's main job: per-client accuracy of each personalization method on heterogeneous clients, with its cost.

Runs offline on a CPU: scikit-learn's bundled digits split over clients by visual domain or by Dirichlet label skew,
a small timm ViT pre-trained on a held-out public split, then 11 methods (Local, FedAvg, FedVPT, FedVPT-deep, pFedPG,
FedPerfix, FedPGP, vanilla attention, SingleSet-VPT, FedRep, FedAvg-FT) side by side with the same budget, over
several seeds in parallel worker processes. Prints the table (per-client accuracy; deployed and after-local-training
accuracy as mean ± 95 % interval over seeds; trainable and communicated parameters; time and FLOPs), the paired
verdicts on the papers' claims and pFedPG's server diagnostics, and writes CSV, JSON and a PNG plot into a new results
folder. See docs/benchmark.md.

Usage::

    python benchmarks/personalize.py                                   # domain split, 6 clients, 3 seeds
    python benchmarks/personalize.py --pretrain broad                  # backbone pre-trained under broad augmentation
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
