"""Training losses of the personalization methods: FedPGP's knowledge-guided contrastive term.

FedPGP (Cui et al., ICML 2024) regularizes the global prompt σ and the personal prompt σ + U V of a
``LowRankPrompt`` with a two-way contrastive loss. For each sample, with cosine similarities

    pos = cos(f_anchor, f_global)        the frozen model's knowledge  vs  features with σ
    neg = cos(f_global, f_personal)      features with σ               vs  features with σ + U V

    L_con = −log( e^{pos/τ} / (e^{pos/τ} + e^{neg/τ}) ) = softplus( (neg − pos) / τ )

averaged over the batch; the client objective is ``CE + μ·L_con`` (τ = 0.5, μ = 1 in FedPGP). Minimizing it pulls σ's
features toward the anchor (generalization: σ must keep what the frozen model knows) and pushes σ + U V's features
away from σ's (personalization: U V must add something σ does not have). The anchor is a constant: σ receives
gradient through ``pos`` and ``neg``, U and V only through ``neg``.

The anchor, exactly: FedPGP's reference code encodes the placeholder prompt ``"X X … X {class}."`` (its K context
tokens left at the token "X") with CLIP's frozen text encoder, not a hand-crafted template such as "a photo of a
{class}."; for a vision-only ViT fedpeft's anchor is the frozen backbone without prompts (``fedpeft.fedpgp``).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knowledge_guided_loss"]


def _check_features(**features: Tensor) -> None:
    shape = None
    for name, f in features.items():
        if not isinstance(f, Tensor):
            raise TypeError(f"{name} must be a Tensor of shape (B, F), got {type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {f.dtype}")
        if f.dim() != 2 or f.shape[0] == 0 or f.shape[1] == 0:
            raise ValueError(f"{name} must have shape (B, F) with B, F >= 1, got {tuple(f.shape)}")
        if shape is None:
            shape = f.shape
        elif f.shape != shape:
            shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in features.items())
            raise ValueError(
                f"f_anchor, f_global and f_personal must have the same shape (B, F), got {shapes}"
            )


MIN_TEMPERATURE = 1e-4
"""The smallest τ :func:`knowledge_guided_loss` accepts. With cosines in [−1, 1] the loss is at most
softplus(2/τ) < 2/τ + log 2 and its gradient with respect to each cosine at most 1/τ, so τ ≥ 1e-4 keeps both below
2·10⁴, finite even in float16 (max 65504); below it they grow as 1/τ (τ = 1e-300 was NaN or Inf in float32).
Contrastive temperatures in use are ≥ 0.01 (CLIP clamps its learned one there; FedPGP uses 0.5)."""


def _check_temperature(temperature: object) -> float:
    tau = float("nan")
    if not isinstance(temperature, bool) and isinstance(temperature, numbers.Real):
        try:
            tau = float(temperature)
        except OverflowError:  # a Python int beyond float64
            tau = float("inf")
    if not MIN_TEMPERATURE <= tau < float("inf"):
        raise ValueError(
            f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (MIN_TEMPERATURE), got {temperature!r}"
        )
    return tau


def knowledge_guided_loss(
    f_anchor: Tensor, f_global: Tensor, f_personal: Tensor, *, temperature: float = 0.5
) -> Tensor:
    """FedPGP's knowledge-guided contrastive loss, a scalar (mean over the batch).

    Args:
        f_anchor: (B, F) features of the frozen model without prompts. (FedPGP's code encodes the placeholder
            prompt ``"X X … X {class}."`` with CLIP's frozen text encoder, not a hand-crafted template.)
            Treated as a constant: it is detached here, so it never receives gradient.
        f_global: (B, F) features with the global prompt σ only.
        f_personal: (B, F) features with the personal prompt σ + U V.
        temperature: τ, finite and ≥ ``MIN_TEMPERATURE`` = 1e-4 (FedPGP: 0.5); see ``MIN_TEMPERATURE`` for why.

    Returns:
        ``mean_b softplus((cos(f_global, f_personal) − cos(f_anchor, f_global)) / τ)``, which equals
        ``mean_b −log(e^{pos/τ} / (e^{pos/τ} + e^{neg/τ}))`` and FedPGP's ``cross_entropy([pos, neg] / τ, 0)``,
        computed without forming the exponentials (finite for every accepted τ). Half-precision inputs are computed
        in float32 (the result is float32); float64 stays float64.

    See ``fedpeft.fedpgp.fedpgp_forward`` for computing the three feature sets from one ``VPT``.
    """
    _check_features(f_anchor=f_anchor, f_global=f_global, f_personal=f_personal)
    tau = _check_temperature(temperature)
    dtype = torch.promote_types(torch.promote_types(f_anchor.dtype, f_global.dtype), f_personal.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    anchor = f_anchor.detach().to(dtype)
    f_global, f_personal = f_global.to(dtype), f_personal.to(dtype)
    pos = F.cosine_similarity(anchor, f_global, dim=-1)  # (B,)
    neg = F.cosine_similarity(f_global, f_personal, dim=-1)  # (B,)
    # −log(e^{pos/τ} / (e^{pos/τ} + e^{neg/τ})) = log(1 + e^{(neg − pos)/τ})
    return F.softplus((neg - pos) / tau).mean()
