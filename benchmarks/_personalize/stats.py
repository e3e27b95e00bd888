"""Statistics over seeds: mean ± 95 % t-interval, and paired comparisons with a three-way verdict.

A seed is one independent repetition of the experiment on the one shipped backbone (new client split, shift
strengths, heads, prompts and batch order; the backbone is *not* re-trained per seed), so seeds are the unit of
replication and every interval and verdict is conditional on that backbone; the clients of one seed are not
independent of each other.

For values ``v_1 … v_n`` (one per seed)::

    mean = Σ v_s / n,   s = sqrt(Σ (v_s − mean)² / (n − 1)),   half = t_{0.975, n−1} · s / sqrt(n)

and the interval is ``mean ± half`` (Student's t; ``half`` is ``nan`` for a single seed: no interval exists).

A paired comparison "A beats B" uses the per-seed differences ``d_s = A_s − B_s`` (same seed: same split, same
backbone, same batches).

**Primary claims** (:data:`PRIMARY`, a fixed list): a two-sided paired t-test per claim, p-values adjusted by
Holm–Bonferroni over the claims whose methods ran (family-wise α = 0.05): ``holds`` / ``does not hold`` when the
adjusted p-value is below α (by the sign of the mean difference), else ``not resolved at this budget``; with each,
the minimal detectable difference (:func:`mdd`, from the exact non-central t).

**Exploratory comparisons** read their uncorrected 95 % interval, in words that are hints, not findings:

- ``hint: A ahead``: the whole interval is above 0;
- ``hint: B ahead``: the whole interval is below 0;
- ``no hint``: the interval contains 0, or fewer than 3 seeds were run (with 2 seeds the interval has one degree of
  freedom, and two equal differences, common with accuracies on 100 test images, would give it zero width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

__all__ = ["ALPHA", "EXPLORATORY", "PRIMARY", "Claim", "Interval", "Paired", "comparisons", "holm", "holm_claims",
           "mdd", "p_value", "paired", "primary", "t_interval", "t_quantile"]

HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolved at this budget"
HINT_A, HINT_B, NO_HINT = "hint: A ahead", "hint: B ahead", "no hint"
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
    def hint(self) -> str:
        """What the uncorrected interval hints (module docstring): never a verdict."""
        if self.diff.n < MIN_SEEDS or math.isnan(self.diff.half):
            return NO_HINT
        if self.diff.low > 0:
            return HINT_A
        if self.diff.high < 0:
            return HINT_B
        return NO_HINT


def paired(a: str, b: str, claim: str, values: Dict[str, Sequence[float]], level: float = 0.95) -> Paired:
    """Compare method ``a`` with ``b`` from ``values[name]`` = one value per seed, same seed order."""
    va, vb = values[a], values[b]
    if len(va) != len(vb):
        raise ValueError(f"{a} has {len(va)} seeds and {b} {len(vb)}: a paired comparison needs the same seeds")
    d = tuple(x - y for x, y in zip(va, vb))
    return Paired(a, b, claim, t_interval(d, level), d)


#: The fixed list of primary claims "a beats b" (deployed accuracy), Holm-corrected together. "Personalized beats
#: FedAvg" is carried by pFedPG, the library's headline method (the other personalized methods vs FedAvg are
#: exploratory).
PRIMARY: List[Tuple[str, str, str]] = [
    ("pFedPG", "FedVPT", "pFedPG Tables 1-3: generated prompts beat averaged prompts"),
    ("pFedPG", "SingleSet-VPT", "pFedPG Table 1: generated prompts beat each client's own prompts"),
    ("FedVPT", "Local", "pFedPG Table 1: federated prompts beat a client's own linear probe"),
    ("FedPerfix", "FedAvg", "FedPerfix Table 2: partial personalization beats FedAvg"),
    ("FedPerfix", "Local-FT", "FedPerfix Table 2: federated partial personalization beats training alone"),
    ("FedPerfix", "VanillaAttention", "FedPerfix Table 2: prefix adapters beat personal attention layers"),
    ("pFedPG", "FedAvg", "both papers: personalized beats FedAvg"),
]
#: exploratory comparisons (uncorrected 95 % intervals), when both methods ran
EXPLORATORY: List[Tuple[str, str, str]] = [
    ("Clustered-FedVPT", "FedVPT", "the oracle's margin: structure a generator could exploit"),
    ("Clustered-FedVPT", "pFedPG", "how far pFedPG is from the family oracle"),
    ("FedVPT", "SingleSet-VPT", "pFedPG Table 1: federated prompts beat each client's own prompts"),
    ("SingleSet-VPT", "Local", "prompts beat a linear probe (the pilot's go/no-go)"),
    ("Local-FT", "Local", "fine-tuning the whole model beats a linear probe"),
    ("FedPerfix", "Local", "FedPerfix Table 2: FedPerfix beats Local (linear probe)"),
]
ALPHA = 0.05  # family-wise error rate of the primary claims
POWER = 0.80  # for the minimal detectable difference


def primary(methods: Sequence[str]) -> List[Tuple[str, str, str]]:
    """The primary claims whose two methods are both in ``methods`` (Holm runs over these)."""
    return [c for c in PRIMARY if c[0] in methods and c[1] in methods]


def comparisons(methods: Sequence[str]) -> List[Tuple[str, str, str]]:
    """The exploratory comparisons whose two methods ran, then every other personalized method vs FedAvg."""
    taken = {(a, b) for a, b, _ in primary(methods)}
    out = [c for c in EXPLORATORY if c[0] in methods and c[1] in methods and (c[0], c[1]) not in taken]
    if "FedAvg" in methods:
        from .methods import select

        seen = taken | {(a, b) for a, b, _ in out}
        out += [(m, "FedAvg", "personalized beats FedAvg (both papers)") for m in select("P", methods)
                if (m, "FedAvg") not in seen]
    return out


def p_value(d: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of the differences ``d`` (H0: mean 0), ``t = mean / (s / √n)``, df = n − 1.

    Zero spread: ``p = 1`` if every difference is 0, else ``p = 0``; fewer than 2 values: ``nan``.
    """
    n = len(d)
    if n < 2:
        return float("nan")
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    from scipy.stats import t

    return float(2.0 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(p: Sequence[float]) -> List[float]:
    """Holm–Bonferroni adjusted p-values: with ``p`` sorted ascending as ``p_(1) ≤ … ≤ p_(k)``,
    ``p̃_(i) = max_{j ≤ i} min(1, (k − j + 1) · p_(j))``; claim i is decided at family-wise level α iff ``p̃_i < α``.
    A ``nan`` p-value stays ``nan`` and counts in k."""
    k = len(p)
    order = sorted(range(k), key=lambda i: (math.isnan(p[i]), p[i]))
    out = [float("nan")] * k
    running = 0.0
    for rank, i in enumerate(order):
        if math.isnan(p[i]):
            continue
        running = max(running, min(1.0, (k - rank) * p[i]))
        out[i] = running
    return out


def mdd(d: Sequence[float], k: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimal detectable difference of a two-sided paired t-test on ``d`` at level α / k (Holm's strictest step).

    The smallest true mean difference δ that this many seeds (n, df = n − 1), with this spread s of the
    differences, detect with probability ``power``, from the exact power of the t-test: with c = t_{1−α/(2k), df}
    and non-centrality λ = δ √n / s, ``power = P(T' > c) + P(T' < −c)``, T' ~ non-central t(df, λ); solved for δ.
    (The normal-style ``(c + t_{power, df}) · s / √n`` is about 7 % optimistic at n = 5.) ``nan`` with fewer than 2
    values; 0 when every difference is the same."""
    n = len(d)
    if n < 2:
        return float("nan")
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0.0:
        return 0.0
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    df = n - 1
    c = float(t.ppf(1.0 - alpha / (2 * k), df))

    def shortfall(lam: float) -> float:
        low = float(nct.cdf(-c, df, lam))  # the wrong-sign rejections: negligible, nan far out in the tail
        return float(nct.sf(c, df, lam)) + (low if math.isfinite(low) else 0.0) - power

    high = c + 3.0
    while shortfall(high) < 0:
        high *= 2.0
    lam = brentq(shortfall, 0.0, high)
    return float(lam * sd / math.sqrt(n))


@dataclass(frozen=True)
class Claim:
    """A primary claim after Holm: the paired comparison, its p-value, Holm-adjusted p-value and MDD."""

    pair: Paired
    p: float
    p_holm: float
    mdd: float

    @property
    def verdict(self) -> str:
        if self.pair.diff.n < MIN_SEEDS or math.isnan(self.p_holm) or self.p_holm >= ALPHA:
            return UNRESOLVED
        return HOLDS if self.pair.diff.mean > 0 else FAILS


def holm_claims(values: Dict[str, Sequence[float]], methods: Sequence[str]) -> List[Claim]:
    """The primary claims among ``methods``, paired on ``values[name]`` (one value per seed), Holm-corrected."""
    pairs = [paired(a, b, claim, values) for a, b, claim in primary(methods)]
    ps = [p_value(q.per_seed) for q in pairs]
    adjusted = holm(ps)
    k = len(pairs)
    return [Claim(q, p, ph, mdd(q.per_seed, k)) for q, p, ph in zip(pairs, ps, adjusted)]
