"""Every access fedpeft makes to the internals of timm's ``Eva`` family, in one place.

``timm.models.eva.Eva`` is the class behind DINOv3 (``vit_*_dinov3*``), EVA / EVA-02, the Perception Encoder
(``vit_pe_*``), Sapiens2, LingBot-Vision and the RoPE ViTs (``vit_*_rope_*``). Its ``forward_features`` is
``patch_embed → _pos_embed → norm_pre → blocks(x, rope=…) → norm``, where ``_pos_embed`` returns the tokens *and* the
rotary embedding (RoPE) every block receives; patch dropout happens inside ``_pos_embed`` (the RoPE is gathered with
the same keep indices). The attention (``EvaAttention`` or ``timm.layers.AttentionRope``) rotates q and k of every
token except the first ``attn.num_prefix_tokens`` (class / register tokens).

fedpeft's two needs, and how they are met here without touching the model:

- VPT prompts get no rotary embedding (the attention treats K prompts as K more prefix tokens): ``skip_rope`` puts K
  identity rotations (sin = 0, cos = 1) in front of the patch rows of the RoPE tensor, so the attention's own
  ``x·cos + rot(x)·sin`` returns the prompt's q and k unchanged, bit for bit.
- ParallelPrefix / Prefix change K and V after their projections: ``attention_forward`` is timm's Eva attention
  (same operations in the same order, so without adapters it is bit-identical on the fused SDPA path) with two
  optional inputs, a K/V offset and learned key/value tokens in front of K and V (no RoPE on them).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention
from torch import Tensor, nn

__all__ = [
    "ATTENTION_TYPES",
    "Eva",
    "attention_dims",
    "attention_forward",
    "attention_layer",
    "block_kwargs",
    "embed_tokens",
    "is_eva",
    "is_eva_attention",
    "skip_rope",
]

ATTENTION_TYPES = (EvaAttention, AttentionRope)


def is_eva(model: nn.Module) -> bool:
    """An ``Eva`` (or a subclass keeping its ``forward_features``, the stage order fedpeft re-runs)."""
    return isinstance(model, Eva) and type(model).forward_features is Eva.forward_features


def is_eva_attention(attn: nn.Module) -> bool:
    return type(attn) in ATTENTION_TYPES


# ---- token stages -------------------------------------------------------------------------------------------------


def embed_tokens(vit: Eva, images: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Images (B, C, H, W) → ``(tokens (B, n_p + N, D), rope)``: patch embedding, prefix tokens, absolute positions,
    patch dropout (``rope`` gathered with the same keep indices). ``rope`` is ``None`` without rotary embedding;
    its token axis is always ``-2`` (``(N, 2d)``, ``(B, 1, N, 2d)``, mixed mode ``(depth, [B,] H, N, 2d)``)."""
    return vit._pos_embed(vit.patch_embed(images))


def skip_rope(rope: Optional[Tensor], k: int) -> Optional[Tensor]:
    """``rope`` with ``k`` identity rotations in front of the patch rows (token axis ``-2``).

    The last axis of an Eva RoPE tensor is ``[sin | cos]`` (``apply_rot_embed_cat`` chunks it in two). An identity
    row is ``[0…0 | 1…1]``: ``x·1 + rot(x)·0 = x`` exactly, for interleaved and half-rotation layouts alike.
    """
    if rope is None or k == 0:
        return rope
    half = rope.shape[-1] // 2
    shape = (*rope.shape[:-2], k)
    ident = torch.cat([rope.new_zeros(*shape, half), rope.new_ones(*shape, half)], dim=-1)
    return torch.cat([ident, rope], dim=-2)


def block_kwargs(vit: Eva, rope: Optional[Tensor], index: int) -> Dict[str, Any]:
    """Keyword arguments of ``vit.blocks[index](x, **kw)``: the block's RoPE (per depth in mixed mode)."""
    if rope is not None and getattr(vit, "rope_mixed", False):
        rope = rope[index]
    return {"rope": rope}


# ---- attention ----------------------------------------------------------------------------------------------------


def attention_layer(vit: Eva, index: int) -> nn.Module:
    """``blocks[index].attn``, checked to be an attention fedpeft's adapters handle exactly.

    Accepted: ``EvaAttention`` (fused ``qkv`` with or without q/v biases, separate bias add or not, or separate
    ``q_proj``/``k_proj``/``v_proj``) and ``AttentionRope``. Refused (``NotImplementedError``): grouped-query
    attention (``num_kv_heads < num_heads``: K/V have fewer heads than Q) and gated attention (``attn.gate``).
    """
    block = vit.blocks[index]
    attn = getattr(block, "attn", None)
    where = f"blocks.{index}.attn"
    if attn is None or not is_eva_attention(attn):
        got = "no `attn`" if attn is None else f"{type(attn).__module__}.{type(attn).__name__}"
        raise TypeError(
            f"{where} is {got}; fedpeft's attention adapters support timm.models.eva.EvaAttention and "
            "timm.layers.AttentionRope in an Eva"
        )
    if int(getattr(attn, "num_kv_groups", 1)) > 1:
        raise NotImplementedError(
            f"{where} is grouped-query attention (num_kv_heads={attn.num_kv_heads} < num_heads={attn.num_heads}); "
            "fedpeft's ParallelPrefix / Prefix do not support it (VPT does)"
        )
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError(f"{where} is a gated attention (attn.gate); not supported by fedpeft's adapters")
    return attn


def attention_dims(attn: nn.Module) -> Tuple[int, int, int]:
    """``(dim, attn_dim, num_heads)``: input width, width of each of Q, K, V, heads."""
    proj_in = attn.qkv if attn.qkv is not None else attn.q_proj
    return int(proj_in.in_features), int(attn.num_heads * attn.head_dim), int(attn.num_heads)


def attention_forward(
    attn: nn.Module,
    x: Tensor,
    rope: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    *,
    kv_offset: Optional[Any] = None,
    kv_prefix: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """timm's ``EvaAttention`` / ``AttentionRope`` forward on SDPA, with fedpeft's two optional K/V changes::

        q, k, v = projections(x)                          (B, N, C) each, C = attn_dim (q/v biases as timm)
        k, v   += kv_offset(x)                            ParallelPrefix: s·A_k, s·A_v (after the projections)
        q, k    = q_norm(q), k_norm(k)                    per head, (B, H, N, d)
        q, k    = rope on tokens n_p: (prefix tokens skipped, as timm)
        k       = [k_norm(K_p) ; k],  v = [V_p ; v]       Prefix: (B, H, P + N, d), no RoPE on K_p
        out     = proj(norm(SDPA(q, k, v, attn_mask)))    (B, N, dim)

    ``kv_offset`` has ``offset_qkv(x, qkv)`` (fused layout ``[Q | K | V]``) and ``offset_kv(x, k, v)`` (a
    ``KVAdapter``). ``kv_prefix = (K_p, V_p)``, (P, C) or (B, P, C). ``attn_mask`` must already cover the P + N keys.
    """
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    C = H * d
    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        if kv_offset is not None:
            qkv = kv_offset.offset_qkv(x, qkv)
        q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)  # (B, N, C) each
        if kv_offset is not None:
            k, v = kv_offset.offset_kv(x, k, v)
        q, k, v = (t.reshape(B, N, H, d).transpose(1, 2) for t in (q, k, v))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    if kv_prefix is not None:
        k_p, v_p = kv_prefix
        if k_p.dim() == 2:
            k_p, v_p = k_p.expand(B, -1, -1), v_p.expand(B, -1, -1)
        P = k_p.shape[1]
        k_p = attn.k_norm(k_p.to(k.dtype).reshape(B, P, H, d).transpose(1, 2))  # (B, H, P, d)
        v_p = v_p.to(v.dtype).reshape(B, P, H, d).transpose(1, 2)
        k = torch.cat([k_p, k], dim=2)
        v = torch.cat([v_p, v], dim=2)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop.p if attn.training else 0.0, is_causal=is_causal
    )
    out = attn.norm(out.transpose(1, 2).reshape(B, N, C))
    return attn.proj_drop(attn.proj(out))
