"""LowRankPrompt: a shared global prompt plus a personal low-rank term (FedPGP, Cui et al., ICML 2024).

FedPGP ("Harmonizing Generalization and Personalization in Federated Prompt Learning") writes each client's prompt as

    P = σ + U V        σ: (L, K, D) global, shared;  U: (L, K, r), V: (L, r, D) personal

σ is averaged across clients like a FedVPT prompt; ``U`` and ``V`` never leave the client, so each client adds a
rank-``r`` correction to the shared prompt of every layer. Use it as the prompt source of ``VPT``::

    prompts = LowRankPrompt(num_prompts=K, embed_dim=vit.embed_dim, rank=r, depth=len(vit.blocks) if deep else 1)
    model = VPT(vit, num_prompts=K, deep=deep, prompts=prompts)

and train with FedPGP's contrastive term (``fedpeft.losses.knowledge_guided_loss``, ``fedpeft.fedpgp``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ._checks import check_flag, check_float_dtype, check_positive_int

__all__ = ["LowRankPrompt"]

INIT_STD = 0.02  # FedPGP initialises σ, U and V with N(0, 0.02²)


class LowRankPrompt(nn.Module):
    """Prompts ``σ + U V`` per layer: a global prompt σ plus a rank-``r`` personal term (FedPGP).

    Args:
        num_prompts: K, prompt tokens per layer (≥ 1).
        embed_dim: D, the ViT's embedding width.
        rank: r, the rank of the personal term, ``1 ≤ r ≤ min(K, D)``. A larger r cannot raise the rank of
            ``U V`` (at most ``min(K, D)``) and only adds personal parameters (FedPGP keeps r small, e.g. 4).
        depth: L, prompt sets: 1 for VPT-shallow, the number of blocks for VPT-deep.
        device, dtype: where and how the parameters are created.

    Parameters (state-dict names are fixed; ``fedpeft.fed`` presets rely on them):
        ``global_prompt``: σ, (L, K, D), shared and averaged across clients.
        ``u``: U, (L, K, r), personal.
        ``v``: V, (L, r, D), personal.
        All three are initialised N(0, 0.02²) as in FedPGP, so ``U V`` is small but non-zero at the start.

    ``forward(personal=True)`` returns ``σ + U V`` (L, K, D), one batched matmul over the L layers;
    ``forward(personal=False)`` returns σ alone (the generalizing prompt: FedPGP's global branch, or a client that has
    no personal term yet).
    """

    def __init__(
        self,
        *,
        num_prompts: int,
        embed_dim: int,
        rank: int,
        depth: int = 1,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        K = check_positive_int("num_prompts", num_prompts)
        D = check_positive_int("embed_dim", embed_dim)
        r = check_positive_int("rank", rank)
        L = check_positive_int("depth", depth)
        if r > min(K, D):
            raise ValueError(
                f"rank must be <= min(num_prompts, embed_dim) = {min(K, D)}, got {r}: U V has rank at most "
                f"min(K, D), so a larger rank only adds personal parameters"
            )
        self.num_prompts, self.embed_dim, self.rank, self.depth = K, D, r, L
        factory = {"device": device, "dtype": check_float_dtype("dtype", dtype)}
        self.global_prompt = nn.Parameter(torch.empty(L, K, D, **factory))  # σ
        self.u = nn.Parameter(torch.empty(L, K, r, **factory))  # U
        self.v = nn.Parameter(torch.empty(L, r, D, **factory))  # V
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw σ, U and V from N(0, 0.02²) (FedPGP's init)."""
        for p in (self.global_prompt, self.u, self.v):
            nn.init.normal_(p, mean=0.0, std=INIT_STD)

    def forward(self, personal: bool = True) -> Tensor:
        """``σ + U V`` (L, K, D) if ``personal`` else ``σ`` (the parameter itself, not a copy)."""
        if not check_flag("personal", personal):
            return self.global_prompt
        # (L, K, D) + (L, K, r) @ (L, r, D), fused into one batched matmul-add
        return torch.baddbmm(self.global_prompt, self.u, self.v)

    def adapter_config(self) -> Dict[str, Any]:
        """Hyper-parameters recorded in adapter files, under the ``VPT`` that reads its prompts from this module."""
        return {
            "method": "LowRankPrompt",
            "num_prompts": self.num_prompts,
            "embed_dim": self.embed_dim,
            "rank": self.rank,
            "depth": self.depth,
        }

    def extra_repr(self) -> str:
        return f"num_prompts={self.num_prompts}, embed_dim={self.embed_dim}, rank={self.rank}, depth={self.depth}"
