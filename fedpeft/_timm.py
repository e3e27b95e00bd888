"""Every access fedpeft makes to timm internals, in one place.

fedpeft wraps a timm ``VisionTransformer`` without forking it: it runs the model's own public stages
(``patch_embed → _pos_embed → patch_drop → norm_pre → blocks → norm``, then ``forward_head``) and reads
``num_prefix_tokens``, ``blocks[i].attn`` and ``attn.qkv``. If a timm release moves one of these, this file is the
one to change; everything else in fedpeft calls the functions below.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # timm >= 0.9
    from timm.layers import Attention as _TimmAttention
    from timm.models.vision_transformer import VisionTransformer
except ImportError as e:  # pragma: no cover - timm is a core dependency
    raise ImportError("fedpeft needs timm>=1.0 (pip install timm)") from e

__all__ = [
    "SUPPORTED_MODELS",
    "as_vision_transformer",
    "attention_forward",
    "attention_layer",
    "blocks",
    "classifier_modules",
    "depth",
    "embed_dim",
    "embed_tokens",
    "final_norm",
    "forward_head",
    "num_prefix_tokens",
    "patch_area",
    "patch_size",
    "pre_norm",
    "uses_grad_checkpointing",
]

SUPPORTED_MODELS = (
    "timm's VisionTransformer family (timm.models.vision_transformer.VisionTransformer and subclasses that keep its "
    "forward_features, e.g. vit_*, deit_* incl. distilled, deit3_*, dinov2 ± registers, CLIP, SigLIP, gap/avg "
    "models, flexivit)"
)


def as_vision_transformer(model: nn.Module) -> VisionTransformer:
    """Return ``model`` if fedpeft can wrap it, else raise a ``TypeError`` naming its class and what is supported.

    A subclass is accepted only if it keeps ``VisionTransformer.forward_features`` (the stage order fedpeft re-runs);
    ``VisionTransformerDistilled`` qualifies (it overrides ``_pos_embed`` and ``forward_head``, which fedpeft calls).
    Eva (RoPE), BEiT, Swin, XCiT, SAM, relpos ViTs, CNNs are different classes and are refused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a timm VisionTransformer (nn.Module), got {type(model).__name__}")
    if not isinstance(model, VisionTransformer) or (
        type(model).forward_features is not VisionTransformer.forward_features
    ):
        raise TypeError(
            f"fedpeft cannot wrap a {type(model).__module__}.{type(model).__name__}; supported: {SUPPORTED_MODELS}. "
            "If you passed a fedpeft wrapper, note that VPT must wrap the ViT directly (e.g. ParallelPrefix(VPT(vit)))."
        )
    for name in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head"):
        if not hasattr(model, name):
            raise TypeError(
                f"{type(model).__name__} lacks `{name}`, which fedpeft needs; this timm version may have moved it "
                "(fedpeft/_timm.py is the one place to adapt)"
            )
    return model


# ---- token stages -------------------------------------------------------------------------------------------------


def embed_tokens(vit: VisionTransformer, images: Tensor) -> Tensor:
    """Images (B, C, H, W) → tokens (B, num_prefix + N, D): patch embedding, positions, prefix tokens, patch drop."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    return vit.patch_drop(x)


def pre_norm(vit: VisionTransformer, x: Tensor) -> Tensor:
    """``norm_pre`` (CLIP's ``ln_pre``; identity for most ViTs)."""
    return vit.norm_pre(x)


def blocks(vit: VisionTransformer) -> nn.Sequential:
    """The transformer blocks, in order."""
    return vit.blocks


def depth(vit: VisionTransformer) -> int:
    return len(vit.blocks)


def final_norm(vit: VisionTransformer, x: Tensor) -> Tensor:
    """The norm after the blocks (identity for fc_norm models, which normalise after pooling)."""
    return vit.norm(x)


def forward_head(vit: VisionTransformer, x: Tensor, pre_logits: bool = False) -> Tensor:
    """timm's own pooling (token/avg/avgmax/max/map/…), ``fc_norm``, head dropout and classifier."""
    return vit.forward_head(x, pre_logits=pre_logits)


def uses_grad_checkpointing(vit: VisionTransformer) -> bool:
    return bool(getattr(vit, "grad_checkpointing", False))


# ---- geometry -----------------------------------------------------------------------------------------------------


def num_prefix_tokens(vit: VisionTransformer) -> int:
    """Class + register + distillation tokens in front of the patches."""
    return int(vit.num_prefix_tokens)


def embed_dim(vit: VisionTransformer) -> int:
    return int(vit.embed_dim)


def patch_size(vit: VisionTransformer) -> Tuple[int, int]:
    """``(p_h, p_w)``, the patch size of the ViT's patch embedding."""
    ps = vit.patch_embed.patch_size
    ph, pw = (ps, ps) if isinstance(ps, int) else tuple(ps)
    return int(ph), int(pw)


def patch_area(vit: VisionTransformer) -> int:
    """p² for VPT's init (``p_h·p_w`` for non-square patches)."""
    ph, pw = patch_size(vit)
    return ph * pw


def classifier_modules(vit: VisionTransformer) -> List[nn.Module]:
    """The classifier(s): ``head`` (and ``head_dist`` for distilled DeiT)."""
    cls = vit.get_classifier()
    return list(cls) if isinstance(cls, (tuple, list)) else [cls]


# ---- attention ----------------------------------------------------------------------------------------------------


def attention_layer(vit: VisionTransformer, index: int) -> _TimmAttention:
    """The ``Attention`` of block ``index``, checked to be timm's plain fused-``qkv`` self-attention.

    Raises ``TypeError`` for anything fedpeft's attention adapters would silently get wrong: another class (e.g. the
    fused ``ParallelScalingBlock``, Eva/BEiT attention that calls ``F.linear`` on ``qkv.weight``), a gated
    attention, or a ``qkv`` that is not an ``nn.Linear``.
    """
    block = vit.blocks[index]
    attn = getattr(block, "attn", None)
    where = f"blocks.{index}.attn"
    if attn is None:
        raise TypeError(
            f"blocks.{index} ({type(block).__name__}) has no `attn`; fedpeft's attention adapters support timm's "
            "Block with timm.layers.Attention"
        )
    if type(attn) is not _TimmAttention:
        raise TypeError(
            f"{where} is {type(attn).__module__}.{type(attn).__name__}; fedpeft's attention adapters support only "
            "timm.layers.Attention with a fused qkv projection"
        )
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError(f"{where} is a gated attention (attn.gate); not supported by fedpeft's adapters")
    if type(attn.qkv) is not nn.Linear:
        raise TypeError(f"{where}.qkv is {type(attn.qkv).__name__}, expected torch.nn.Linear")
    return attn


def attention_forward(
    attn: _TimmAttention,
    x: Tensor,
    *,
    kv_prefix: Optional[Tuple[Tensor, Tensor]] = None,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
) -> Tensor:
    """timm ``Attention.forward`` on SDPA, optionally with learned key/value tokens in front of K and V.

    With ``kv_prefix = (k_p, v_p)`` of shape (P, attn_dim) or (B, P, attn_dim), in the space of the qkv projection's
    output (before the head split)::

        q, k, v = split(qkv(x))                         # (B, H, N, d)
        k = k_norm([k_p ; k]),  v = [v_p ; v]           # (B, H, P+N, d)
        out = proj(norm(SDPA(q_norm(q), k, v)))         # (B, N, C); no mask needed

    ``attn.qkv`` is called as a module, so forward hooks on it (ParallelPrefix) still apply. With no prefix this is
    exactly timm's fused path.
    """
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
    q, k, v = qkv.unbind(0)
    if kv_prefix is not None:
        k_p, v_p = kv_prefix
        if k_p.dim() == 2:
            k_p, v_p = k_p.expand(B, -1, -1), v_p.expand(B, -1, -1)
        P = k_p.shape[1]
        k_p = k_p.to(k.dtype).reshape(B, P, H, d).transpose(1, 2)  # (B, H, P, d)
        v_p = v_p.to(v.dtype).reshape(B, P, H, d).transpose(1, 2)
        k = torch.cat([k_p, k], dim=2)
        v = torch.cat([v_p, v], dim=2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop.p if attn.training else 0.0, is_causal=is_causal
    )
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    return attn.proj_drop(attn.proj(out))


# ---- attention adapters: ParallelPrefix / Prefix (appended) ---------------------------------------------------------

__all__ += ["attention_dims", "qkv_projection", "uses_fused_attention"]


def qkv_projection(attn: _TimmAttention) -> nn.Linear:
    """The fused projection of an attention validated by ``attention_layer``: ``Linear(dim → 3·attn_dim)``, its
    output laid out ``[Q | K | V]`` (each ``attn_dim`` wide, heads contiguous inside each part)."""
    return attn.qkv


def attention_dims(attn: _TimmAttention) -> Tuple[int, int, int]:
    """``(dim, attn_dim, num_heads)``: the attention's input width, the width of each of Q, K, V, and the heads."""
    return int(attn.qkv.in_features), int(attn.attn_dim), int(attn.num_heads)


def uses_fused_attention(attn: _TimmAttention) -> bool:
    """timm's per-layer switch: ``True`` → ``Attention.forward`` runs SDPA; ``False`` → its explicit-softmax path
    (set at construction from ``TIMM_FUSED_ATTN`` / ``timm.layers.set_fused_attn``)."""
    return bool(getattr(attn, "fused_attn", False))
