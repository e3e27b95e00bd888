"""The privacy ledger of a run and its ε, computed by dp-accounting's RDP accountant (``pip install "fedpeft[privacy]"``).

What the engines do, and therefore what is accounted (no hand-written accountant):

- Sampling: :func:`~fedpeft.protocols.sample_clients` draws exactly m of the C clients uniformly *without
  replacement* each round (m = C at fraction 1). dp-accounting accounts for that with
  ``SampledWithoutReplacementDpEvent`` under the *replace-one* neighbouring relation (C is public; two neighbouring
  federations differ in one client's data) — Wang, Balle & Kasiviswanathan (AISTATS 2019), Thm. 27.
- Mechanism: per release, a sum of per-client contributions each clipped to C plus N(0, σ²C²). Replacing one
  client's data moves the sum by at most 2C, so the Gaussian's noise multiplier relative to that sensitivity is σ/2
  (:data:`SENSITIVITY`). (Under add-or-remove with Poisson sampling, the usual DP-SGD setting, it would be σ; fedpeft
  does not sample that way, so it does not report that smaller ε.)
- Releases: one per averaging round; one per generator step for pFedPG. k steps on one round's sample are one
  sampled event whose inner mechanism is k composed Gaussians (the sample is drawn once).

Every round composes ``SampledWithoutReplacementDpEvent(C, m, SelfComposedDpEvent(GaussianDpEvent(σ/2), k))``;
σ = 0 composes ``NonPrivateDpEvent`` per round (ε = ∞). ε(δ) is recomputed from the whole ledger with a fresh accountant, so
a ledger restored from a checkpoint gives exactly the ε of one that was never interrupted.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Tuple

from .._checks import check_positive_int
from .privacy import Privacy

__all__ = ["SENSITIVITY", "PrivacyLedger", "dp_accounting"]

#: the L2 sensitivity of a sum of C-clipped contributions, in units of C, under replace-one neighbours
SENSITIVITY = 2.0


def dp_accounting() -> Any:
    """The ``dp_accounting`` module, or an ``ImportError`` saying how to install it."""
    try:
        import dp_accounting as lib
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError('privacy accounting needs dp-accounting: pip install "fedpeft[privacy]"') from None
    return lib


class PrivacyLedger:
    """The releases of a run so far and their (ε, δ) (see the module docstring).

    Args:
        privacy: the run's :class:`~fedpeft.protocols.Privacy`.
        num_clients: C, the number of clients sampled from.

    ``record(sample_size, releases)`` after every server round; ``epsilon`` then is ε(δ) of all rounds so far.
    The ledger is a list of runs ``[sample_size, releases, rounds]`` of identical rounds: JSON-ready and small.
    """

    def __init__(self, privacy: Privacy, num_clients: int) -> None:
        if not isinstance(privacy, Privacy):
            raise TypeError(f"privacy must be a fedpeft.protocols.Privacy, got {type(privacy).__name__}")
        self.privacy = privacy
        self.num_clients = check_positive_int("num_clients", num_clients)
        self.runs: List[List[int]] = []  # [sample_size, releases, count]
        self._cache: Tuple[Tuple[Tuple[int, ...], ...], float] = ((), 0.0)
        dp_accounting()  # fail at construction, not after the first round

    @property
    def rounds(self) -> int:
        """Rounds recorded."""
        return sum(c for _, _, c in self.runs)

    @property
    def releases(self) -> int:
        """Gaussian releases recorded (server steps)."""
        return sum(k * c for _, k, c in self.runs)

    def record(self, sample_size: int, releases: int = 1) -> None:
        """One round whose ``sample_size`` clients (drawn without replacement) fed ``releases`` noisy releases."""
        m = check_positive_int("sample_size", sample_size)
        if m > self.num_clients:
            raise ValueError(f"sample_size must be <= num_clients = {self.num_clients}, got {m}")
        k = check_positive_int("releases", releases)
        if self.runs and self.runs[-1][:2] == [m, k]:
            self.runs[-1][2] += 1
        else:
            self.runs.append([m, k, 1])

    def event(self) -> Any:
        """The ledger as one dp-accounting ``DpEvent`` (``ComposedDpEvent`` of the runs)."""
        E = dp_accounting().dp_event
        sigma = self.privacy.noise_multiplier
        events = []
        for m, k, count in self.runs:
            if sigma == 0:  # no noise: nothing to amplify, the release is not private
                events.append(E.SelfComposedDpEvent(E.NonPrivateDpEvent(), count))
                continue
            inner = E.SelfComposedDpEvent(E.GaussianDpEvent(sigma / SENSITIVITY), k)
            events.append(E.SelfComposedDpEvent(E.SampledWithoutReplacementDpEvent(self.num_clients, m, inner), count))
        return E.ComposedDpEvent(events)

    @property
    def epsilon(self) -> float:
        """ε at the run's δ after every recorded round (0 before any; ``inf`` when σ = 0)."""
        key = tuple(tuple(r) for r in self.runs)
        if key != self._cache[0]:
            lib = dp_accounting()
            acc = lib.rdp.RdpAccountant(neighboring_relation=lib.NeighboringRelation.REPLACE_ONE)
            acc.compose(self.event())
            self._cache = (key, float(acc.get_epsilon(self.privacy.delta)) if self.runs else 0.0)
        return self._cache[1]

    def summary(self, sample_size: int, releases: int) -> Dict[str, Any]:
        """The round record's ``privacy`` entry: ``{epsilon, delta, noise_multiplier, clip_norm, sampling_rate,
        releases}`` (``releases``: this round's; ``total_releases``: the run's; ``rounds``: accounted rounds)."""
        eps = self.epsilon
        return {"epsilon": eps if math.isfinite(eps) else math.inf, "delta": self.privacy.delta,
                "noise_multiplier": self.privacy.noise_multiplier, "clip_norm": self.privacy.clip_norm,
                "sampling_rate": sample_size / self.num_clients, "releases": releases,
                "total_releases": self.releases, "rounds": self.rounds}

    def state_dict(self) -> Dict[str, Any]:
        """``{"privacy": settings, "num_clients": C, "runs": [[m, k, rounds], ...]}`` (JSON-ready)."""
        return {"privacy": self.privacy.as_dict(), "num_clients": self.num_clients, "runs": [list(r) for r in self.runs]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ``ValueError`` (ledger untouched) when the checkpoint's privacy
        settings or number of clients differ from this run's, or the runs are malformed."""
        if not isinstance(state, Mapping):
            raise ValueError(f"privacy: expected the ledger's state dict, got {type(state).__name__}")
        theirs = Privacy.from_dict(state.get("privacy", {}))
        if theirs != self.privacy:
            raise ValueError(f"privacy: the checkpoint was run with {theirs.as_dict()}, this run has "
                             f"{self.privacy.as_dict()}; resume with the same settings")
        if state.get("num_clients") != self.num_clients:
            raise ValueError(f"privacy: the checkpoint's ledger has {state.get('num_clients')!r} clients, this run "
                             f"{self.num_clients}")
        runs = state.get("runs")
        ok = isinstance(runs, list) and all(
            isinstance(r, list) and len(r) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                        for x in r) and r[0] <= self.num_clients for r in runs)
        if not ok:
            raise ValueError(f"privacy: the checkpoint's ledger runs must be [[sample_size, releases, rounds], ...] "
                             f"of positive ints, got {runs!r}")
        self.runs = [list(r) for r in runs]
