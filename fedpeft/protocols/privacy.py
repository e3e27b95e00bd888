"""User-level central differential privacy: the settings, the clipping, the seeded Gaussian noise.

A trusted server adds the noise (central DP); what it protects is everything the server *releases* — the shared state
or pFedPG's generator after each step, and all that is computed from them (the payloads, the deployed models). The
unit of privacy is one client: all of its data together (user-level DP, McMahan et al., ICLR 2018).

DP-FedAvg, for the averaging methods (:class:`~fedpeft.protocols.AveragingServer`), with m the number of clients the
round was sent to (a fixed denominator: a client that drops out adds 0, it does not shrink m)::

    client n   Δ_n = upload_n − download;  Δ_n ← Δ_n · min(1, C / ‖Δ_n‖₂)       (‖·‖ over all shared tensors jointly)
    server     refuses ‖Δ_n‖ > C (up to rounding), clips again, then
               shared ← shared + (Σ_n Δ_n + σ C z) / m,   z ~ N(0, I)           (noise std σ·C/m on the mean)

pFedPG (:class:`~fedpeft.protocols.PFedPGServer`): each accepted client's contribution to the generator's gradient,
``g_n = ∇_φ ½‖gen(n) − P̃_n‖²`` over *all* of φ (its descriptor row included), is clipped to C, then
``g = (Σ_n g_n + σ C z) / m`` is the gradient of one optimizer step; every step is one release
(:func:`private_generator_grads`).

The noise is drawn from ``torch.Generator`` seeded by ``(noise seed, round, release)``, so a run is reproducible and
identical on every engine. The noise seed is as secret as the server's state: whoever knows it can subtract the noise.
Accounting: :mod:`~fedpeft.protocols.accountant`. Guide: docs/privacy.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_finite_float

__all__ = [
    "ACCOUNTANTS",
    "Privacy",
    "add_noise",
    "clip_update",
    "clip_upload",
    "gaussian_noise",
    "global_norm",
    "private_generator_grads",
    "upload_norm_bound",
]

#: the accountants :class:`Privacy` accepts (dp-accounting's RDP accountant: the only one of the maintained libraries
#: that accounts for the engines' fixed-size sampling without replacement)
ACCOUNTANTS = ("rdp",)


@dataclass(frozen=True)
class Privacy:
    """User-level central DP settings (see the module docstring and docs/privacy.md).

    Args:
        clip_norm: C > 0, the L2 bound on one client's contribution per release (an averaging method's update over
            all shared tensors jointly; pFedPG's gradient contribution over all of the generator).
        noise_multiplier: σ ≥ 0; the Gaussian noise on the clipped sum has std σ·C. ``0`` clips without noise
            (ε = ∞: no privacy, but the clipping's cost can be measured on its own).
        delta: δ in (0, 1), the δ of the reported (ε, δ); well below 1 / (number of clients).
        accountant: ``"rdp"`` (dp-accounting's Rényi-DP accountant, :data:`ACCOUNTANTS`).

    Raises:
        ValueError: naming the argument, for a non-finite value, ``clip_norm ≤ 0``, ``noise_multiplier < 0``,
            ``delta`` outside (0, 1) or an unknown accountant.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        clip = check_finite_float("clip_norm", self.clip_norm)
        if clip <= 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm!r}")
        sigma = check_finite_float("noise_multiplier", self.noise_multiplier)
        if sigma < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        delta = check_finite_float("delta", self.delta)
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}")
        for name, v in (("clip_norm", clip), ("noise_multiplier", sigma), ("delta", delta)):
            object.__setattr__(self, name, v)

    def as_dict(self) -> Dict[str, Any]:
        """``{"clip_norm", "noise_multiplier", "delta", "accountant"}`` (JSON-ready; :meth:`from_dict` inverts it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Privacy:
        """The inverse of :meth:`as_dict`; ``ValueError`` on missing or unknown keys."""
        if not isinstance(d, Mapping) or set(d) - {"clip_norm", "noise_multiplier", "delta", "accountant"} \
                or not {"clip_norm", "noise_multiplier"} <= set(d):
            raise ValueError(f"privacy: expected a dict with clip_norm, noise_multiplier[, delta, accountant], got {d!r}")
        return cls(**d)


def global_norm(tensors: Mapping[str, Tensor]) -> float:
    """``‖x‖₂`` over every tensor of ``tensors`` jointly (accumulated in float64)."""
    total = sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in tensors.values())
    return math.sqrt(total)


def clip_update(update: Mapping[str, Tensor], clip_norm: float) -> Tuple[Dict[str, Tensor], float]:
    """``(update · min(1, C / ‖update‖), ‖update‖)``: the joint L2 clip, computed in float64, returned in each
    tensor's dtype (the input is not modified)."""
    norm = global_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    out = {k: (v.detach().to(torch.float64) * scale).to(v.dtype) for k, v in update.items()}
    return out, norm


def clip_upload(upload: Mapping[str, Tensor], download: Mapping[str, Tensor],
                clip_norm: float) -> Dict[str, Tensor]:
    """``download + clip(upload − download)`` over the keys of ``upload`` (the client's side of DP-FedAvg).

    Raises:
        ValueError: ``clip_norm`` not a finite number > 0, or ``download`` lacks a key of ``upload``.
    """
    clip = check_finite_float("clip_norm", clip_norm)
    if clip <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    missing = sorted(set(upload) - set(download))
    if missing:
        raise ValueError(f"clip_upload: the download has no {missing[:3]}: the update upload − download is undefined")
    delta = {k: v.detach().to(torch.float64) - download[k].detach().to(v.device, torch.float64)
             for k, v in upload.items()}
    clipped, _ = clip_update(delta, clip)
    return {k: (download[k].detach().to(v.device, torch.float64) + clipped[k]).to(v.dtype) for k, v in upload.items()}


def upload_norm_bound(clip_norm: float, reference: Mapping[str, Tensor]) -> float:
    """The largest ``‖upload − reference‖`` a server accepts from a client that clipped to ``clip_norm``.

    The client sends ``reference + clipped Δ`` in the tensors' dtype; each coordinate's rounding is at most one ulp
    of ``|reference| + |Δ|``, so ``‖upload − reference‖ ≤ C + ε_dtype · (‖reference‖ + C) · 2`` (plus 1e-6·C).
    The server clips to C again after this check, so the bound only decides refusal, never the DP guarantee.
    """
    eps = max((torch.finfo(v.dtype).eps for v in reference.values() if v.is_floating_point()), default=0.0)
    return clip_norm * (1 + 1e-6) + 2 * eps * (global_norm(reference) + clip_norm)


def _generator(seed: int, round_: int, release: int) -> torch.Generator:
    mixed = (int(seed) * 1_000_003 + int(round_)) * 1_009 + int(release)
    return torch.Generator().manual_seed(mixed % (1 << 63))


def gaussian_noise(shapes: Mapping[str, torch.Size], std: float, *, seed: int, round: int,
                   release: int = 0) -> Dict[str, Tensor]:
    """``{key: std · z}``, z ~ N(0, I) in float64 on the CPU, drawn key by key in ``shapes``' order from a generator
    seeded by ``(seed, round, release)``: the same numbers on every machine and engine."""
    g = _generator(seed, round, release)
    return {k: torch.randn(tuple(s), generator=g, dtype=torch.float64) * std for k, s in shapes.items()}


def add_noise(total: Dict[str, Tensor], std: float, *, seed: int, round: int, release: int = 0) -> Dict[str, Tensor]:
    """``total + std · z`` (float64 ``total``; see :func:`gaussian_noise`); with ``std == 0`` nothing is drawn."""
    if std == 0:
        return total
    noise = gaussian_noise({k: v.shape for k, v in total.items()}, std, seed=seed, round=round, release=release)
    return {k: v + noise[k].to(v.device) for k, v in total.items()}


def private_generator_grads(generated: Tensor, trained: Tensor, params: Sequence[Tuple[str, nn.Parameter]],
                            privacy: Privacy, *, num_sampled: int, seed: int, round: int, release: int = 0,
                            rows: Optional[Mapping[str, Sequence[int]]] = None) -> List[float]:
    """Write the DP gradient of ``½ Σ_i ‖generated_i − trained_i‖²`` into each parameter's ``.grad``.

    ``g_i = ∇_φ ½‖generated_i − trained_i‖² = J_iᵀ (generated_i − trained_i)``, each clipped jointly over every
    parameter of ``params`` to C, then ``.grad = (Σ_i s_i g_i + σ C z) / m`` with ``s_i = min(1, C / ‖g_i‖)`` and
    m = ``num_sampled`` (the clients the round was sent to). Every parameter gets noise, also the descriptor rows of
    clients not in the round (the release must not reveal who took part). Returns the norms ‖g_i‖ before clipping.

    Two passes, memory O(|φ|): (1) the norms ‖g_i‖, by one ``torch.autograd.grad`` per client through the shared
    graph of ``generated`` over the parameters every client shares (a parameter named in ``rows`` is
    *row-separable*: client i's gradient lives in row ``rows[name][i]`` only — pFedPG's descriptor bank, gen(n) reads
    row n — so one batched backward gives every client's part); (2) ``Σ_i s_i g_i = Jᵀ (s ⊙ (generated − trained))``,
    one batched backward, since g_i is linear in its own row of the output gradient.

    Args:
        generated: ``gen(ids)`` with its graph, ``(n, ...)``; row i is client i's.
        trained: the clients' trained prompts, the same shape.
        params: ``(name, parameter)`` of the generator, in a fixed order (the noise is drawn in this order).
        rows: ``{name: [row of client i for i in range(n)]}`` for row-separable parameters (distinct rows).
    """
    if generated.shape != trained.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and trained {tuple(trained.shape)} differ in shape")
    rows = dict(rows or {})
    n = generated.shape[0]
    for name, r in rows.items():
        if len(r) != n or len(set(r)) != n:
            raise ValueError(f"rows[{name!r}] must give {n} distinct rows, one per client, got {list(r)}")
    shared = [p for k, p in params if k not in rows]
    separable = [(k, p) for k, p in params if k in rows]
    tensors = [p for _, p in params]
    diff = (generated.detach() - trained.detach().to(generated.dtype)).contiguous()
    sq = torch.zeros(n, dtype=torch.float64)
    if separable and n:  # pass 1a: every client's rows at once
        grads = torch.autograd.grad(generated, [p for _, p in separable], grad_outputs=diff, retain_graph=True,
                                    allow_unused=True)
        for (k, p), g in zip(separable, grads):
            if g is not None:
                idx = torch.as_tensor(list(rows[k]), dtype=torch.long, device=p.device)
                sq += g.index_select(0, idx).to(torch.float64).flatten(1).pow(2).sum(1).cpu()
    for i in range(n if shared else 0):  # pass 1b: ‖g_i‖² over the shared parameters, one client at a time
        grads = torch.autograd.grad(generated[i], shared, grad_outputs=diff[i], retain_graph=True, allow_unused=True)
        sq[i] += sum(float(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2) for g in grads if g is not None)
    norms = sq.sqrt()
    scale = torch.where(norms > privacy.clip_norm, privacy.clip_norm / norms.clamp_min(1e-300), torch.ones_like(norms))
    total = {k: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for k, p in params}
    if n:  # pass 2: the clipped sum in one backward
        weighted = diff * scale.to(diff.device, diff.dtype).view(-1, *[1] * (diff.dim() - 1))
        grads = torch.autograd.grad(generated, tensors, grad_outputs=weighted, allow_unused=True)
        for (k, _), g in zip(params, grads):
            if g is not None:
                total[k] += g.to(torch.float64)
    noisy = add_noise(total, privacy.noise_multiplier * privacy.clip_norm, seed=seed, round=round, release=release)
    for k, p in params:
        p.grad = (noisy[k] / num_sampled).to(p.dtype)
    return norms.tolist()
