"""Prefix: vanilla prefix tuning, learned key/value tokens in every attention layer (the FedPerfix paper's baseline,
Sun et al., ICCV 2023, Fig. 2b; Li & Liang, 2021).

Layer i owns ``keys[i]`` and ``values[i]`` (P, C), in the space of the K and V projections' outputs (before the head
split, C = ``attn_dim``). They are put in front of the layer's keys and values inside one SDPA call::

    q, k, v = split(qkv(X))                             (B, H, N, d)
    k' = k_norm([K_p ; k]),  v' = [V_p ; v]             (B, H, P + N, d)   K_p, V_p split into heads like k, v
    out = proj(SDPA(q_norm(q), k', v'))                 (B, N, C): queries stay the N tokens, no mask needed

Mechanism: each adapted timm ``attn`` gets an instance-level ``forward`` that calls ``_timm.attention_forward`` with the
prefix (so hooks on ``attn.qkv``, e.g. a ``ParallelPrefix``, still apply); ``eject()`` deletes it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _timm
from ._attach import (
    AttentionWrapper,
    adapter_slot,
    clear_adapter_slot,
    has_forward_override,
    set_adapter_slot,
)
from ._checks import check_positive_int
from .summary import SummaryMixin

__all__ = ["Prefix", "prefix_attn_mask"]

INIT_STD = 0.02


def prefix_attn_mask(
    attn_mask: Optional[Tensor], is_causal: bool, n: int, p: int, device=None
) -> Optional[Tensor]:
    """An attention mask for N queries over ``[P prefix keys ; N keys]``: prefix columns always visible.

    ``attn_mask`` (…, N, N) (bool: True = attend; float: added to the logits) gets P leading columns of True / 0;
    ``is_causal`` becomes an explicit lower-triangular mask over the N tokens (the prefix stays visible to all).
    ``None`` and not causal → ``None`` (no mask: SDPA's fastest path).
    """
    if is_causal:
        attn_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return None
    if attn_mask.shape[-1] != n:  # broadcast over keys
        attn_mask = attn_mask.expand(*attn_mask.shape[:-1], n)
    pad = attn_mask.new_ones if attn_mask.dtype == torch.bool else attn_mask.new_zeros
    return torch.cat([pad(*attn_mask.shape[:-1], p), attn_mask], dim=-1)


class _PrefixForward:
    """Instance-level ``forward`` of an adapted ``attn``: timm's attention on SDPA with layer ``index``'s prefix.

    Holds the ``Prefix`` (not its tensors) and reads ``owner.keys[index]`` at call time, so ``load_state_dict``
    (also with ``assign=True``) and ``.to()`` are seen; ``copy.deepcopy`` of the wrapper maps it onto the copy.
    """

    def __init__(self, owner: Prefix, attn: nn.Module, index: int) -> None:
        self.owner, self.attn, self.index = owner, attn, index

    def __call__(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        k_p, v_p = self.owner.keys[self.index], self.owner.values[self.index]  # (P, C)
        mask = prefix_attn_mask(attn_mask, is_causal, x.shape[1], k_p.shape[0], device=x.device)
        return _timm.attention_forward(self.attn, x, kv_prefix=(k_p, v_p), attn_mask=mask)


class _PrefixTokens:
    """What a ``Prefix`` puts in an Eva attention's ``prefix`` slot (``_attach.EvaAdapterSlots``): layer
    ``index``'s tokens, read at call time, and the mask extension for them."""

    def __init__(self, owner: Prefix, index: int) -> None:
        self.owner, self.index = owner, index

    def tokens(self) -> Tuple[Tensor, Tensor]:
        return self.owner.keys[self.index], self.owner.values[self.index]  # (P, C) each

    @staticmethod
    def mask(attn_mask: Optional[Tensor], is_causal: bool, n: int, p: int, device) -> Optional[Tensor]:
        return prefix_attn_mask(attn_mask, is_causal, n, p, device=device)


class Prefix(SummaryMixin, AttentionWrapper):
    """Vanilla prefix tuning for a timm or transformers ViT (or a fedpeft wrapper of one): ``length`` key and value
    tokens per layer.

    Args:
        vit_or_wrapper: a timm ``VisionTransformer`` (``Block`` + ``timm.layers.Attention`` with a fused ``qkv``), an
            ``Eva`` (``EvaAttention`` / ``AttentionRope``; the prefix keys get ``k_norm`` and no RoPE), or
            a ``transformers`` ViT / DeiT / DINOv2 model (``fedpeft._hf``), or a fedpeft wrapper of one such as
            ``VPT`` (``Prefix(VPT(vit))(x, prompts=P)``). Held as ``self.model``.
        length: P, the prefix tokens per layer.
        train_backbone: train the whole backbone too. ``False`` freezes it, or, around a wrapper, keeps that
            wrapper's choices.
        train_head: classifier(s) trainable. ``None``: ``True`` for a plain ViT, the wrapper's choice around one.

    Attributes:
        keys, values: ``nn.Parameter`` (depth, length, attn_dim), init N(0, 0.02²): small, so the prefix starts
            close to a no-op (near-zero values, keys that barely move the attention logits).

    Every attention runs ``torch.nn.functional.scaled_dot_product_attention`` with the prefix, also on layers built
    with ``fused_attn=False`` (which would otherwise take timm's explicit-softmax path). Masks passed to the model
    (``attn_mask``, ``is_causal``) are extended so every query sees the whole prefix (``prefix_attn_mask``).

    Raises ``TypeError`` / ``NotImplementedError`` naming the layer for anything other than timm's plain fused-qkv
    ``Attention`` or Eva's (gated or grouped-query attention included) and ``ValueError`` when a layer's ``forward`` is already overridden (a second ``Prefix``); the
    model is left untouched then.
    """

    def __init__(
        self,
        vit_or_wrapper: nn.Module,
        *,
        length: int,
        train_backbone: bool = False,
        train_head: Optional[bool] = None,
    ) -> None:
        length = check_positive_int("length", length)
        super().__init__(vit_or_wrapper, train_backbone=train_backbone, train_head=train_head)
        layers = self._attention_layers(range(self.depth))
        for i, attn in layers.items():
            if _timm.uses_adapter_slots(attn):
                if adapter_slot(attn, "prefix") is not None:  # (raises for someone else's forward)
                    raise ValueError(
                        f"blocks.{i}.attn already has a Prefix attached; eject() it first (the model is unchanged)"
                    )
            elif has_forward_override(attn):
                raise ValueError(
                    f"blocks.{i}.attn already has an instance-level forward (a Prefix is attached?); eject() it "
                    "first (the model is unchanged)"
                )
        attn_dims = {_timm.attention_dims(attn)[1] for attn in layers.values()}
        if len(attn_dims) != 1:
            raise ValueError(f"Prefix needs one attn_dim across blocks, got {sorted(attn_dims)}")
        self.length = length
        self.attn_dim = attn_dims.pop()
        ref = self._reference_tensor()
        shape = (self.depth, length, self.attn_dim)
        self.keys = nn.Parameter(torch.empty(shape, device=ref.device, dtype=ref.dtype))
        self.values = nn.Parameter(torch.empty(shape, device=ref.device, dtype=ref.dtype))
        self.reset_parameters()
        for i, attn in layers.items():
            if _timm.uses_adapter_slots(attn):  # Eva: the tokens sit in the attention's prefix slot (_attach.py)
                set_adapter_slot(attn, "prefix", _PrefixTokens(self, i))
            else:
                attn.forward = _PrefixForward(self, attn, i)
        self._configure_training()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw ``keys`` and ``values`` from N(0, 0.02²)."""
        nn.init.normal_(self.keys, std=INIT_STD)
        nn.init.normal_(self.values, std=INIT_STD)

    def _detach(self) -> None:
        for i in range(self.depth):
            attn = _timm.attention_layer(self._vit(), i)
            if _timm.uses_adapter_slots(attn):
                slot = adapter_slot(attn, "prefix")
                if isinstance(slot, _PrefixTokens) and slot.owner is self:
                    clear_adapter_slot(attn, "prefix", slot)
            elif isinstance(vars(attn).get("forward"), _PrefixForward) and vars(attn)["forward"].owner is self:
                del attn.forward

    def adapter_config(self) -> Dict[str, Any]:
        """Hyper-parameters recorded in adapter files (see ``fedpeft.save_adapter``)."""
        return {"method": "Prefix", "length": self.length, "attn_dim": self.attn_dim, **self._common_config()}

    def extra_repr(self) -> str:
        return f"length={self.length}, attn_dim={self.attn_dim}, train_backbone={self.train_backbone}"
