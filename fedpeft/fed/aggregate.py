"""FedAvg: the weighted average of client state dicts, in one call or streamed one client at a time.

    avg[k] = Σ_i w_i · state_i[k] / Σ_i w_i        (McMahan et al., 2017; w_i = client i's sample count)

Rules, shared by :func:`average` and :class:`Averager`:

- Weights are relative: any finite weight >= 0 is valid and at least one must be > 0. They are normalised in float64
  before use (each client enters as ``p_i = w_i / Σ_{j≤i} w_j``, with the sum kept relative to the largest weight so
  far), so weights from 1e-300 to 1e300 give the correct mean: nothing overflows or underflows in the accumulator.
- Floating-point tensors keep a running weighted *mean* ``m ← m + p_i·(x_i − m)`` (``torch.lerp``) in float32
  (float64 when the first state's tensor is float64), returned in the dtype the first state had for that key, so
  fp16/bf16 models average without fp16 round-off piling up. The mean is a convex combination of the inputs: finite
  inputs give a finite mean. Where ``x_i − m`` could overflow (values beyond half the accumulator's range) or
  ``p_i`` is below the accumulator dtype's normal range, that tensor is updated as ``(1 − p_i)·m + p_i·x_i`` in
  float64 instead (slower, same result).
- Integer and bool tensors (counters such as BatchNorm's ``num_batches_tracked``) are not averaged: they must be equal
  in every state, with the same dtype, and come back unchanged. A difference raises ``ValueError``; keep such keys out
  of the aggregate with :func:`fedpeft.fed.split` if clients legitimately differ there. Complex, sparse and meta
  tensors are refused with ``TypeError``.
- Every state must have the first state's keys and shapes and only finite values; every weight must be a finite
  number >= 0. A refused state raises ``ValueError`` naming the key, and is refused *before* anything is accumulated:
  the aggregate is exactly as it was before the call. ``result()`` (and :func:`average`) refuse an all-zero total.
- Results live on the first state's device. Inputs are never modified; results are new tensors.
- Memory: :class:`Averager` holds one model's worth however many clients are added; :func:`average` streams too when
  ``states`` is an iterator (a generator yielding one client at a time), and holds only what the caller's list holds.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .._checks import check_dense, check_state, check_weight, check_weights, first_nonfinite, value_ranges

__all__ = ["Averager", "average"]


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _update_mean(mean: Tensor, x: Tensor, p: float, q: float, bound: float) -> None:
    """``mean ← q·mean + p·x`` in place (0 < p < 1, q = 1 − p given separately), without overflow or a lost ``p``.

    ``bound`` ≥ max|mean| + max|x|. Fast path: one ``lerp`` pass, ``mean + p·(x − mean)`` for p ≤ ½ and
    ``x + (1 − p)·(mean − x)`` above, exact to rounding when ``x − mean`` cannot overflow and the smaller of p and
    1 − p is a normal number in the accumulator dtype. Otherwise the convex combination
    is formed in float64, where neither can happen for float32 values.
    """
    info = torch.finfo(mean.dtype)
    if bound < info.max / 2 and min(p, q) >= info.tiny:
        x = x.to(device=mean.device, dtype=mean.dtype)
        if p <= 0.5:
            mean.lerp_(x, p)  # mean + p·(x − mean)
        else:  # x + q·(mean − x): a float32 p, or 1 − p formed from it, would lose q to rounding
            torch.lerp(x, mean, q, out=mean)
    elif mean.dtype == torch.float64:
        mean.mul_(q).add_(x.to(mean.device), alpha=p)
    else:
        mean.copy_(mean.double().mul_(q).add_(x.to(device=mean.device, dtype=torch.float64), alpha=p))


class Averager:
    """Streaming weighted average of state dicts (FedAvg): ``add`` clients one by one, then ``result()``.

    Memory is one model's worth (one float32/float64 accumulator per floating tensor, a copy of each integer tensor)
    however many clients are added; the Averager keeps no reference to an added state, so the caller can drop each
    client's state right after ``add``. ``add`` may continue after ``result()``.

    Example::

        acc = fed.Averager()
        for state, n in client_updates():      # a generator: one client in memory at a time
            acc.add(state, weight=n)           # weight = the client's sample count
        model.load_state_dict(acc.result(), strict=False)
    """

    def __init__(self) -> None:
        self._acc: Dict[str, Tensor] = {}  # the running weighted mean for floating keys, the common value otherwise
        self._dtypes: Dict[str, torch.dtype] = {}  # dtype to return per key (the first state's)
        self._bounds: Dict[str, float] = {}  # max |x| over the states so far, per floating key (bounds |mean| too)
        self._count = 0
        self._scale = 0.0  # the largest weight so far (0 while every weight was 0)
        self._total = 0.0  # Σ_i w_i / _scale: at most the number of states, whatever the weights' magnitude

    def __len__(self) -> int:
        """The number of states added so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """``Σ_i w_i`` over the states added so far (the number of states when every weight is 1).

        Informational: the mean itself never uses this sum (it may be ``inf`` for weights near float64's maximum).
        """
        return self._total * self._scale

    def __repr__(self) -> str:
        return f"Averager(states={self._count}, total_weight={self.total_weight:g}, keys={len(self._acc)})"

    def _next_share(self, w: float) -> Tuple[float, float, float, float]:
        """``(p, q, scale, total)`` after adding weight ``w``: p = w / Σ w and q = 1 − p = Σ_old / Σ w, each formed by
        one float64 division (never 1 − p, which cancels), with the sums kept relative to the largest weight."""
        if w == 0.0:
            return 0.0, 1.0, self._scale, self._total
        if w > self._scale:  # the new largest weight: re-express the running sum relative to it
            old = self._total * (self._scale / w) if self._scale else 0.0
            total = old + 1.0
            return 1.0 / total, old / total, w, total
        share = w / self._scale
        total = self._total + share
        return share / total, self._total / total, self._scale, total

    @torch.no_grad()
    def add(self, state: Mapping[str, Tensor], weight: float = 1.0) -> None:
        """Add one client's state with weight ``weight`` (e.g. its number of training samples).

        Raises:
            TypeError: ``state`` is not a ``Mapping[str, Tensor]``, holds a complex, sparse or meta tensor, or
                ``weight`` is not a real number.
            ValueError: ``weight`` is negative or not finite; ``state`` has other keys or shapes than the first state,
                a non-finite value, a floating tensor where the first state had an integer one (or vice versa), or an
                integer/bool tensor that differs from the first state's. Nothing is accumulated on error.
        """
        name = f"state #{self._count}"
        w = check_weight(weight, name=f"weight of {name}")
        if isinstance(state, Mapping):  # read once: every check and the accumulation see the same tensors
            state = dict(state.items())
        check_state(state, like=self._acc if self._count else None, name=name)
        check_dense(state, name)
        for k, t in state.items():
            if t.dtype.is_complex:
                raise TypeError(
                    f"{name}[{k!r}] is {t.dtype}; fed.average averages floating-point tensors and passes integer/bool "
                    "ones through, complex tensors are not supported (average .real and .imag separately)"
                )
        ranges = value_ranges(state)
        bad = first_nonfinite(ranges)
        if bad is not None:
            raise ValueError(f"{name}[{bad!r}] holds non-finite values (NaN or Inf); refusing it")
        if self._count:
            self._check_kinds(state, name)
        p, q, self._scale, self._total = self._next_share(w)  # everything is validated: nothing can be refused now
        if self._count == 0:
            self._dtypes = {k: t.dtype for k, t in state.items()}
            self._acc = {  # a new tensor either way; a weight-0 first state is a placeholder that p = 1 overwrites
                k: t.detach().to(_accumulator_dtype(t.dtype), copy=True) if t.is_floating_point() else t.detach().clone()
                for k, t in state.items()
            }
            self._bounds = {k: 0.0 for k, t in state.items() if t.is_floating_point()}
        for k, a in self._acc.items():
            if not a.is_floating_point():
                continue
            lo, hi = ranges.get(k, (0.0, 0.0))  # empty tensors have no range
            m = max(-lo, hi)
            if q == 0.0:  # the first positive weight (or one beside which the others vanish): the mean is this state
                a.copy_(state[k])
                self._bounds[k] = m
            elif p > 0.0:
                _update_mean(a, state[k], p, q, self._bounds[k] + m)
                self._bounds[k] = max(self._bounds[k], m)
        self._count += 1

    def _check_kinds(self, state: Mapping[str, Tensor], name: str) -> None:
        for k, a in self._acc.items():
            t = state[k]
            if a.is_floating_point() != t.is_floating_point():
                raise ValueError(f"{name}[{k!r}]: expected dtype {self._dtypes[k]} like the first state, got {t.dtype}")
            if a.is_floating_point():
                continue
            if t.dtype != a.dtype:
                raise ValueError(
                    f"{name}[{k!r}]: integer/bool tensors are not averaged and must match the first state's exactly; "
                    f"expected dtype {a.dtype}, got {t.dtype}"
                )
            if not torch.equal(t.to(a.device), a):
                raise ValueError(
                    f"{name}[{k!r}]: integer/bool tensors are not averaged and must equal the first state's "
                    f"({a.dtype}); got a different value. Keep this key out of the aggregate with fed.split(state, keys)"
                )

    @torch.no_grad()
    def result(self) -> Dict[str, Tensor]:
        """The weighted average ``Σ_i w_i x_i / Σ_i w_i`` of the states added so far, as a new state dict.

        Keys are in the first state's order; each tensor has the first state's dtype for that key.

        Raises:
            ValueError: no state has been added, or every weight so far was 0.
        """
        if self._count == 0:
            raise ValueError("Averager.result(): no state has been added yet")
        if self._scale == 0.0:
            raise ValueError(f"Averager.result(): all {self._count} weights are zero; at least one must be > 0")
        return {  # rounded once into the output dtype; always a new tensor
            k: a.to(self._dtypes[k], copy=True) for k, a in self._acc.items()
        }


def average(
    states: Iterable[Mapping[str, Tensor]], weights: Optional[Iterable[float]] = None
) -> Dict[str, Tensor]:
    """Weighted average of state dicts (FedAvg): ``avg[k] = Σ_i w_i · states[i][k] / Σ_i w_i``.

    Args:
        states: one or more state dicts with the same keys and shapes (e.g. each client's ``model.state_dict()``
            or the shared part from :func:`fedpeft.fed.split`).
        weights: one finite weight >= 0 per state (sample counts, as in FedAvg), not all zero; ``None`` gives the
            plain mean. Validated as a whole before any state is read.

    Returns:
        A new state dict; dtypes, key order and device follow the first state. See the module docstring for the
        accumulation precision and the rule for integer/bool tensors (they must be equal in every state).

    Raises:
        TypeError: ``states`` is not an iterable of state dicts (``None``, a single ``Mapping``).
        ValueError: no states, a weights/states length mismatch, a bad or all-zero weight vector, or any input
            :meth:`Averager.add` refuses (the message names the state's index and the key).

    Memory: pass a generator to stream (one client in memory at a time, as :class:`Averager`); a list is read in
    place, never copied.
    """
    if isinstance(states, Mapping):
        raise TypeError("average() takes an iterable of state dicts; got a single Mapping (wrap it in a list)")
    if not isinstance(states, Iterable):
        raise TypeError(f"states must be an iterable of state dicts (e.g. a list), got {type(states).__name__}")
    sized = hasattr(states, "__len__")
    if weights is not None:
        weights = check_weights(weights, count=len(states) if sized else None)  # all refused before any state is read
    acc = Averager()
    for i, state in enumerate(states):  # streamed: an iterator's states are dropped one by one
        if weights is not None and i >= len(weights):
            raise ValueError(f"average() got more states than its {len(weights)} weights")
        acc.add(state, 1.0 if weights is None else weights[i])
    if len(acc) == 0:
        raise ValueError("average() needs at least one state, got none")
    if weights is not None and len(acc) != len(weights):
        raise ValueError(f"average() got {len(acc)} states but {len(weights)} weights")
    return acc.result()
