"""Statistics over seeds: mean ± 95 % t-interval, and paired comparisons with a three-way verdict.

A seed is one independent repetition of the whole experiment (new split, new backbone pre-training, new heads, new
batch order), so seeds are the unit of replication; the clients of one seed are not independent of each other.

For values ``v_1 … v_n`` (one per seed)::

    mean = Σ v_s / n,   s = sqrt(Σ (v_s − mean)² / (n − 1)),   half = t_{0.975, n−1} · s / sqrt(n)

and the interval is ``mean ± half`` (Student's t; ``half`` is ``nan`` for a single seed: no interval exists).

A paired comparison "A beats B" uses the per-seed differences ``d_s = A_s − B_s`` (same seed: same split, same
backbone, same batches), and reads its interval:

- ``holds``: the whole interval is above 0;
- ``does not hold``: the whole interval is below 0 (B beats A);
- ``not resolved at this budget``: the interval contains 0, or fewer than 3 seeds were run (with 2 seeds the
  interval has one degree of freedom, and two equal differences, common with accuracies on ~50 test images, would
  give it zero width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

__all__ = ["COMPARISONS", "Interval", "Paired", "paired", "t_interval", "t_quantile"]

HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolved at this budget"
MIN_SEEDS = 3  # fewer seeds never decide a comparison


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile ``t_{(1+level)/2, df}`` (``scipy.stats.t.ppf``)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2.0, df))


@dataclass(frozen=True)
class Interval:
    """``mean ± half`` over ``n`` values; ``half`` is ``nan`` when ``n == 1``."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and half-width of the ``level`` t-interval of ``values`` (see the module docstring)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value, got none")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, float("nan"), 1)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Interval(mean, t_quantile(n - 1, level) * math.sqrt(var / n), n)


@dataclass(frozen=True)
class Paired:
    """The claim "``a`` beats ``b``" checked on the per-seed differences."""

    a: str
    b: str
    claim: str
    diff: Interval
    per_seed: Tuple[float, ...]

    @property
    def verdict(self) -> str:
        if self.diff.n < MIN_SEEDS or math.isnan(self.diff.half):
            return UNRESOLVED
        if self.diff.low > 0:
            return HOLDS
        if self.diff.high < 0:
            return FAILS
        return UNRESOLVED


def paired(a: str, b: str, claim: str, values: Dict[str, Sequence[float]], level: float = 0.95) -> Paired:
    """Compare method ``a`` with ``b`` from ``values[name]`` = one value per seed, same seed order."""
    va, vb = values[a], values[b]
    if len(va) != len(vb):
        raise ValueError(f"{a} has {len(va)} seeds and {b} {len(vb)}: a paired comparison needs the same seeds")
    d = tuple(x - y for x, y in zip(va, vb))
    return Paired(a, b, claim, t_interval(d, level), d)


#: (a, b, the paper's claim "a beats b"). "Personalized vs FedAvg" expands to every personalized method present.
COMPARISONS: List[Tuple[str, str, str]] = [
    ("pFedPG", "FedVPT", "pFedPG Tables 1-3: generated prompts beat averaged prompts"),
    ("FedVPT", "SingleSet-VPT", "pFedPG Table 1: federated prompts beat each client's own prompts"),
    ("FedPerfix", "VanillaAttention", "FedPerfix Table 2: prefix adapters beat personal attention layers"),
    ("FedPerfix", "FedAvg", "FedPerfix Table 2: partial personalization beats FedAvg"),
]
PERSONALIZED = ("pFedPG", "FedVPT", "FedVPT-deep", "FedPerfix", "FedPGP", "FedRep", "FedAvg-FT", "VanillaAttention")


def comparisons(methods: Sequence[str]) -> List[Tuple[str, str, str]]:
    """The comparisons whose two methods are both in ``methods``, then every personalized method vs FedAvg."""
    out = [c for c in COMPARISONS if c[0] in methods and c[1] in methods]
    if "FedAvg" in methods:
        seen = {(a, b) for a, b, _ in out}
        out += [(m, "FedAvg", "personalized beats FedAvg (both papers)") for m in PERSONALIZED
                if m in methods and (m, "FedAvg") not in seen]
    return out
