"""Every access fedpeft makes to timm internals, in one place (with ``_timm_eva.py`` for the Eva family), and the
backbone interface every wrapper calls: for a Hugging Face ``transformers`` model each function below dispatches to
``_hf.py``, which holds every access to transformers internals (so the wrappers never ask which library built it).

fedpeft wraps a timm ``VisionTransformer`` without forking it: it runs the model's own public stages
(``patch_embed → _pos_embed → patch_drop → norm_pre → blocks → norm``, then ``forward_head``) and reads
``num_prefix_tokens``, ``blocks[i].attn`` and ``attn.qkv``. timm's ``Eva`` (DINOv3, EVA-02, PE, RoPE ViTs) has the
same stages except that ``_pos_embed`` also returns the rotary embedding each block takes; the functions below
dispatch to ``_timm_eva`` for it. If a timm release moves one of these, these two files are the ones to change;
everything else in fedpeft calls the functions below.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # timm >= 0.9
    from timm.layers import Attention as _TimmAttention
    from timm.layers import use_reentrant_ckpt
    from timm.models._features import feature_take_indices as _feature_take_indices
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import VisionTransformer
except ImportError as e:  # pragma: no cover - timm is a core dependency
    raise ImportError("fedpeft needs timm>=1.0 (pip install timm)") from e

from . import _hf, _timm_eva

__all__ = [
    "SUPPORTED_MODELS",
    "as_vision_transformer",
    "attention_forward",
    "attention_layer",
    "block_kwargs",
    "blocks",
    "classifier_modules",
    "depth",
    "embed_dim",
    "embed_positions",
    "embed_tokens",
    "feature_grid",
    "feature_take_indices",
    "final_norm",
    "forward",
    "forward_features",
    "forward_head",
    "is_eva",
    "num_prefix_tokens",
    "patch_area",
    "patch_size",
    "pre_norm",
    "register_block_input_hook",
    "skip_positions",
    "uses_grad_checkpointing",
    "uses_reentrant_checkpointing",
]

SUPPORTED_MODELS = (
    "timm's VisionTransformer family (timm.models.vision_transformer.VisionTransformer and subclasses that keep its "
    "forward_features, e.g. vit_*, deit_* incl. distilled, deit3_*, dinov2 ± registers, CLIP, SigLIP, gap/avg "
    "models, flexivit), timm's Eva family (timm.models.eva.Eva: DINOv3 vit_*_dinov3*, EVA / EVA-02 eva*, "
    "Perception Encoder vit_pe_*, Sapiens2, LingBot-Vision, RoPE ViTs vit_*_rope_*) and " + _hf.SUPPORTED
)

NAFLEX_NOT_YET = (
    "NaFlexVit (SigLIP2-NaFlex, RADIO) is not supported yet: its patch-dict / variable-resolution inputs would need "
    "the prompts inserted after the prefix tokens with its padding mask and per-sample RoPE extended so prompts are "
    "always visible and never padded, which fedpeft does not implement"
)


def is_eva(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped through the Eva path (RoPE passed to every block)."""
    return _timm_eva.is_eva(model)


def as_vision_transformer(model: nn.Module) -> nn.Module:
    """Return ``model`` if fedpeft can wrap it, else raise a ``TypeError`` naming its class and what is supported.

    A subclass is accepted only if it keeps ``VisionTransformer.forward_features`` (or ``Eva.forward_features``: the
    stage order fedpeft re-runs); ``VisionTransformerDistilled`` qualifies (it overrides ``_pos_embed`` and
    ``forward_head``, which fedpeft calls). BEiT, Swin, XCiT, SAM, relpos ViTs, NaFlexVit, CNNs are refused. A
    ``transformers`` model is checked by ``_hf.as_backbone`` (ViT, DeiT, DINOv2 ± registers; others refused).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a timm VisionTransformer or Eva (nn.Module), got {type(model).__name__}")
    if _hf.is_hf(model):
        return _hf.as_backbone(model)
    if isinstance(model, NaFlexVit):
        raise TypeError(
            f"fedpeft cannot wrap a {type(model).__module__}.{type(model).__name__}: {NAFLEX_NOT_YET}; "
            f"supported: {SUPPORTED_MODELS}"
        )
    if _timm_eva.is_eva(model):
        return model
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
    return embed_positions(vit, images)[0]


def embed_positions(vit: nn.Module, images: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Images → ``(tokens (B, n_p + N, D), positions)``: ``positions`` is what every block takes besides the tokens
    (an Eva's rotary embedding, see ``_timm_eva.embed_tokens``; ``None`` for a VisionTransformer)."""
    if _timm_eva.is_eva(vit):
        return _timm_eva.embed_tokens(vit, images)
    if _hf.is_hf(vit):
        return _hf.embed_tokens(vit, images), None
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    return vit.patch_drop(x), None


def skip_positions(vit: nn.Module, positions: Optional[Tensor], k: int) -> Optional[Tensor]:
    """``positions`` for a sequence with ``k`` more tokens right after the prefix tokens that get no position
    (VPT prompts): identity rotations for an Eva's RoPE (``_timm_eva.skip_rope``); nothing to do for a ViT."""
    return _timm_eva.skip_rope(positions, k) if _timm_eva.is_eva(vit) else positions


def block_kwargs(vit: nn.Module, positions: Optional[Tensor], index: int) -> Dict[str, Any]:
    """Keyword arguments of ``blocks[index](x, **kw)``: ``{}`` for a ViT, the block's ``rope`` for an Eva."""
    return _timm_eva.block_kwargs(vit, positions, index) if _timm_eva.is_eva(vit) else {}


def pre_norm(vit: VisionTransformer, x: Tensor) -> Tensor:
    """``norm_pre`` (CLIP's ``ln_pre``; identity for most ViTs and every transformers model)."""
    return x if _hf.is_hf(vit) else vit.norm_pre(x)


def blocks(vit: VisionTransformer) -> nn.Sequential:
    """The transformer blocks, in order."""
    return _hf.blocks(vit) if _hf.is_hf(vit) else vit.blocks


def depth(vit: VisionTransformer) -> int:
    return len(blocks(vit))


def forward(vit: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """The model's forward as a tensor: ``vit(*args, **kwargs)`` for timm; logits (or the pooled output of a bare
    ``*Model``) for a transformers model, whose own forward returns a ``ModelOutput``."""
    if _hf.is_hf(vit):
        return _hf.forward_head(vit, _hf.forward_features(vit, *args, **kwargs))
    return vit(*args, **kwargs)


def forward_features(vit: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """Images → normed tokens (B, n_p + N, D), the model's own stages (``_hf.forward_features`` for transformers)."""
    return _hf.forward_features(vit, *args, **kwargs) if _hf.is_hf(vit) else vit.forward_features(*args, **kwargs)


def final_norm(vit: VisionTransformer, x: Tensor) -> Tensor:
    """The norm after the blocks (identity for fc_norm models, which normalise after pooling)."""
    return _hf.final_norm(vit, x) if _hf.is_hf(vit) else vit.norm(x)


def forward_head(vit: VisionTransformer, x: Tensor, pre_logits: bool = False) -> Tensor:
    """timm's own pooling (token/avg/avgmax/max/map/…), ``fc_norm``, head dropout and classifier (a transformers
    model's own pooling and classifier, ``_hf.forward_head``)."""
    if _hf.is_hf(vit):
        return _hf.forward_head(vit, x, pre_logits=pre_logits)
    return vit.forward_head(x, pre_logits=pre_logits)


def uses_grad_checkpointing(vit: VisionTransformer) -> bool:
    """timm's ``set_grad_checkpointing()``: fedpeft then checkpoints the blocks it runs. A transformers model's layers
    checkpoint themselves (``gradient_checkpointing_enable()``, in training mode only): ``False`` here."""
    return not _hf.is_hf(vit) and bool(getattr(vit, "grad_checkpointing", False))


def uses_reentrant_checkpointing(vit: nn.Module) -> bool:
    """The model's own forward checkpoints its blocks with torch's *reentrant* checkpoint
    (``set_grad_checkpointing()`` plus ``timm.layers.set_reentrant_ckpt(True)`` / ``TIMM_REENTRANT_CKPT=1``)."""
    return uses_grad_checkpointing(vit) and bool(use_reentrant_ckpt())


def register_block_input_hook(vit: nn.Module, hook: Any) -> Any:
    """A forward hook on ``norm_pre``, whose output is what ``blocks[0]`` receives (ViT and Eva alike)."""
    if _hf.is_hf(vit):
        return _hf.register_block_input_hook(vit, hook)
    return vit.norm_pre.register_forward_hook(hook)


def feature_take_indices(depth: int, indices: Optional[Any]) -> Tuple[List[int], int]:
    """timm's ``forward_intermediates`` rule: ``None`` → all blocks, int n → the last n, list → those indices
    (negative ones count from the end). ``ValueError`` for what timm would only ``assert``."""
    try:
        take, max_index = _feature_take_indices(depth, indices)
    except (AssertionError, TypeError) as e:
        raise ValueError(
            f"indices must be None, an int n in 1..{depth} (the last n blocks) or a list of block indices in "
            f"-{depth}..{depth - 1}, got {indices!r}"
        ) from e
    return list(take), int(max_index)


def feature_grid(vit: nn.Module, img_size: Tuple[int, int]) -> Tuple[int, int]:
    """The patch grid (H', W') of an input of ``img_size`` (H, W)."""
    if _hf.is_hf(vit):
        ph, pw = _hf.patch_size(vit)
        return img_size[0] // ph, img_size[1] // pw
    return tuple(vit.patch_embed.dynamic_feat_size(img_size))


# ---- geometry -----------------------------------------------------------------------------------------------------


def num_prefix_tokens(vit: VisionTransformer) -> int:
    """Class + register + distillation tokens in front of the patches."""
    return _hf.num_prefix_tokens(vit) if _hf.is_hf(vit) else int(vit.num_prefix_tokens)


def embed_dim(vit: VisionTransformer) -> int:
    return _hf.embed_dim(vit) if _hf.is_hf(vit) else int(vit.embed_dim)


def patch_size(vit: VisionTransformer) -> Tuple[int, int]:
    """``(p_h, p_w)``, the patch size of the ViT's patch embedding."""
    if _hf.is_hf(vit):
        return _hf.patch_size(vit)
    ps = vit.patch_embed.patch_size
    ph, pw = (ps, ps) if isinstance(ps, int) else tuple(ps)
    return int(ph), int(pw)


def patch_area(vit: VisionTransformer) -> int:
    """p² for VPT's init (``p_h·p_w`` for non-square patches)."""
    ph, pw = patch_size(vit)
    return ph * pw


def classifier_modules(vit: VisionTransformer) -> List[nn.Module]:
    """The classifier(s): ``head`` (and ``head_dist`` for distilled DeiT); ``_hf.classifier_modules``."""
    if _hf.is_hf(vit):
        return _hf.classifier_modules(vit)
    cls = vit.get_classifier()
    return list(cls) if isinstance(cls, (tuple, list)) else [cls]


# ---- attention ----------------------------------------------------------------------------------------------------


def attention_layer(vit: VisionTransformer, index: int) -> _TimmAttention:
    """The ``Attention`` of block ``index``, checked to be timm's plain fused-``qkv`` self-attention.

    Raises ``TypeError`` for anything fedpeft's attention adapters would silently get wrong: another class (e.g. the
    fused ``ParallelScalingBlock``, Eva/BEiT attention that calls ``F.linear`` on ``qkv.weight``), a gated
    attention, or a ``qkv`` that is not an ``nn.Linear``.
    """
    if _timm_eva.is_eva(vit):
        return _timm_eva.attention_layer(vit, index)
    if _hf.is_hf(vit):
        return _hf.attention_layer(vit, index)
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

__all__ += [
    "attention_dims",
    "eva_attention_forward",
    "hf_attention_forward",
    "is_eva_attention",
    "qkv_projection",
    "uses_adapter_slots",
    "uses_fused_attention",
]

is_eva_attention = _timm_eva.is_eva_attention
eva_attention_forward = _timm_eva.attention_forward
hf_attention_forward = _hf.attention_forward


def uses_adapter_slots(attn: nn.Module) -> bool:
    """Whether the adapters attach to ``attn`` through one instance-level ``forward`` with slots
    (``_attach.AdapterSlots``: an Eva or a transformers attention) rather than a hook on a fused ``qkv``."""
    return _timm_eva.is_eva_attention(attn) or _hf.is_hf_attention(attn)


def qkv_projection(attn: _TimmAttention) -> nn.Linear:
    """The fused projection of an attention validated by ``attention_layer``: ``Linear(dim → 3·attn_dim)``, its
    output laid out ``[Q | K | V]`` (each ``attn_dim`` wide, heads contiguous inside each part)."""
    return attn.qkv


def attention_dims(attn: _TimmAttention) -> Tuple[int, int, int]:
    """``(dim, attn_dim, num_heads)``: the attention's input width, the width of each of Q, K, V, and the heads."""
    if _timm_eva.is_eva_attention(attn):
        return _timm_eva.attention_dims(attn)
    if _hf.is_hf_attention(attn):
        return _hf.attention_dims(attn)
    return int(attn.qkv.in_features), int(attn.attn_dim), int(attn.num_heads)


def uses_fused_attention(attn: _TimmAttention) -> bool:
    """timm's per-layer switch: ``True`` → ``Attention.forward`` runs SDPA; ``False`` → its explicit-softmax path
    (set at construction from ``TIMM_FUSED_ATTN`` / ``timm.layers.set_fused_attn``). An adapted Eva attention
    always runs fedpeft's SDPA forward (``_timm_eva.attention_forward``), and so does an adapted transformers one."""
    if uses_adapter_slots(attn):
        return True
    return bool(getattr(attn, "fused_attn", False))
