"""Partial participation: which clients take part in a round, the same answer on every engine and machine.

    k = max(1, ⌊fraction · C + ½⌋)          clients per round (rounded to nearest, at least one)
    sampled = sorted(randperm(C, generator seeded by (seed, round))[:k])

``fraction = 1`` takes every client without drawing anything. The draw uses its own ``torch.Generator`` (CPU
``randperm`` is deterministic across machines and torch versions of the same generator algorithm), never Python's global
``random`` (which Flower's stock strategies use, unseeded, and which rounds ``C · fraction`` down, possibly to zero).
"""

from __future__ import annotations

import math
import numbers
from typing import List

import torch

from .._checks import check_positive_int

__all__ = ["check_fraction", "sample_clients"]


def check_fraction(fraction: float, name: str = "fraction") -> float:
    """``fraction`` as a float; ``ValueError`` naming ``name`` unless it is a finite number in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
        math.isfinite(float(fraction)) and 0.0 < float(fraction) <= 1.0
    ):
        raise ValueError(f"{name} must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def sample_clients(num_clients: int, fraction: float, *, seed: int, round: int) -> List[int]:
    """The sorted client ids ``⊆ [0, num_clients)`` that take part in ``round`` (see the module docstring).

    Args:
        num_clients: C, the number of clients (ids 0 … C−1).
        fraction: the share of clients per round, in (0, 1].
        seed: the run's seed.
        round: the round index; each round draws independently.

    Raises:
        ValueError: ``num_clients`` not a positive int, or ``fraction`` not a finite number in (0, 1].
    """
    check_positive_int("num_clients", num_clients)
    fraction = check_fraction(fraction)
    k = max(1, min(num_clients, math.floor(float(fraction) * num_clients + 0.5)))
    if k == num_clients:
        return list(range(num_clients))
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(round)) % (1 << 63))
    return sorted(torch.randperm(num_clients, generator=g)[:k].tolist())
