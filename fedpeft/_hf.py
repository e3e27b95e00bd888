"""Every access fedpeft makes to Hugging Face ``transformers`` internals, in one place.

fedpeft wraps a ``transformers`` ViT the way it wraps a timm one: it re-runs the model's own stages,
``embeddings → layers → layernorm``, then the classification model's own pooling and classifier, and inserts its
prompts / attention adapters in between. ``_timm.py`` dispatches every backbone query here for a transformers model,
so the wrappers never see which library built the model. Nothing here imports ``transformers`` (it stays an optional
dependency): models are recognised by class and read by attribute. Attribute layouts covered (tested on 4.57 and
5.25)::

    transformers 4.x                                    transformers 5.x
    <base>.encoder.layer[i]                             <base>.layers[i] (ViT, DeiT) / <base>.encoder.layer[i] (DINOv2)
    layer.attention.attention.{query,key,value}         layer.attention.{q,k,v}_proj
    layer.attention.output.dense (out projection)       layer.attention.o_proj (inside the attention)

``<base>`` is ``model.base_model`` (``model.vit`` / ``.deit`` / ``.dinov2`` / ``.dinov2_with_registers`` of a
classification model, the model itself otherwise). The attention fedpeft adapts ("core") is the module that owns the
q/k/v projections; its ``forward`` returns ``(out, weights)`` in both layouts.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SUPPORTED_CLASSES",
    "as_backbone",
    "attention_dims",
    "attention_forward",
    "attention_layer",
    "blocks",
    "classifier_modules",
    "embed_dim",
    "embed_tokens",
    "final_norm",
    "forward_features",
    "forward_head",
    "is_hf",
    "is_hf_attention",
    "num_prefix_tokens",
    "patch_size",
    "register_block_input_hook",
]

#: class name → how its output is read from the normed tokens ``x`` (B, n_p + N, D); HF's own rule for each
HEADS = {
    "ViTModel": "pooler",  # pooler(x) = tanh(dense(x[:, 0])) if the model has one, else x[:, 0]
    "DeiTModel": "pooler",
    "Dinov2Model": "cls",  # HF's pooler_output: x[:, 0]
    "Dinov2WithRegistersModel": "cls",
    "ViTForImageClassification": "token",  # classifier(x[:, 0])
    "DeiTForImageClassification": "token",
    "DeiTForImageClassificationWithTeacher": "distilled",  # (cls_classifier(x[:, 0]) + distillation_classifier(x[:, 1])) / 2
    "Dinov2ForImageClassification": "cls_mean",  # classifier([x[:, 0] ; mean(x[:, n_p:])])
    "Dinov2WithRegistersForImageClassification": "cls_mean",
}
SUPPORTED_CLASSES = tuple(HEADS)
SUPPORTED = "transformers' " + ", ".join(SUPPORTED_CLASSES)

_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))  # transformers 5.x, 4.x


def is_hf(model: object) -> bool:
    """Whether ``model`` was built by ``transformers`` (supported or not: unsupported ones are refused here)."""
    return isinstance(model, nn.Module) and type(model).__module__.startswith("transformers.")


def _supported_class(model: nn.Module) -> Optional[type]:
    for cls in type(model).__mro__:
        if cls.__name__ in HEADS and cls.__module__.startswith("transformers.models."):
            return cls
    return None


def _kind(model: nn.Module) -> str:
    return HEADS[_supported_class(model).__name__]  # type: ignore[union-attr]


def as_backbone(model: nn.Module) -> nn.Module:
    """``model`` if fedpeft can wrap it, else a ``TypeError`` naming its class and the supported ones.

    A subclass is accepted if it keeps its supported parent's ``forward`` (fedpeft re-runs those stages).
    """
    cls = _supported_class(model)
    if cls is None or type(model).forward is not cls.forward:
        hint = "; it holds a timm model: wrap its .timm_model" if isinstance(getattr(model, "timm_model", None),
                                                                            nn.Module) else ""
        raise TypeError(
            f"fedpeft cannot wrap a {type(model).__module__}.{type(model).__name__}; supported: {SUPPORTED} "
            f"(and timm's VisionTransformer / Eva families){hint}"
        )
    base = _base(model)
    for name in ("embeddings", "layernorm"):
        if not isinstance(getattr(base, name, None), nn.Module):
            raise TypeError(f"{type(model).__name__} lacks `{name}`; this transformers version may have moved it "
                            "(fedpeft/_hf.py is the one place to adapt)")
    blocks(model)
    return model


def _base(model: nn.Module) -> nn.Module:
    """The encoder model: ``model.vit`` / ``.deit`` / ``.dinov2`` … of a classification model, else ``model``."""
    return model.base_model


# ---- token stages -------------------------------------------------------------------------------------------------


def embed_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """Images (B, C, H, W) → tokens (B, n_p + N, D): the model's ``embeddings`` (patches, class / distillation /
    register tokens, positions, dropout). Pixels are cast to the patch projection's dtype, as the model's forward
    does; ViT / DeiT refuse another image size (no ``interpolate_pos_encoding``), DINOv2 interpolates."""
    emb = _base(model).embeddings
    return emb(images.to(emb.patch_embeddings.projection.weight.dtype))


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer layers, in order (``layers`` in transformers 5.x's ViT / DeiT, else ``encoder.layer``)."""
    base = _base(model)
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has neither `layers` nor `encoder.layer`; this transformers version "
                        "may have moved them (fedpeft/_hf.py is the one place to adapt)")
    return layers


def forward_features(model: nn.Module, images: Tensor) -> Tensor:
    """Images → normed tokens (B, n_p + N, D): ``embeddings``, every layer, ``layernorm`` (the model's forward
    without masks, head masks or recorded outputs); attention adapters attached to the layers apply."""
    x = embed_tokens(model, images)
    for layer in blocks(model):
        x = layer(x)
    return final_norm(model, x)


def final_norm(model: nn.Module, x: Tensor) -> Tensor:
    return _base(model).layernorm(x)


def register_block_input_hook(model: nn.Module, hook: Any) -> Any:
    """A forward hook on ``embeddings`` (what the first layer receives without prompts)."""
    return _base(model).embeddings.register_forward_hook(hook)


def forward_head(model: nn.Module, x: Tensor, pre_logits: bool = False) -> Tensor:
    """The model's own reading of its normed tokens ``x`` (B, n_p + N, D), as in its ``forward``:

    - ``*ForImageClassification``: logits (B, num_labels); ``pre_logits``: the classifier's input (ViT / DeiT
      ``x[:, 0]``; DINOv2 ``[x[:, 0] ; mean(x[:, n_p:])]``, (B, 2D); DeiT with teacher ``(x[:, 0] + x[:, 1]) / 2``);
    - ``*Model``: HF's ``pooler_output`` (ViT / DeiT: ``tanh(dense(x[:, 0]))`` if built with a pooler, else
      ``x[:, 0]``; DINOv2 ``x[:, 0]``), also for ``pre_logits``.
    """
    kind = _kind(model)
    if kind == "pooler":
        pooler = getattr(model, "pooler", None)
        return pooler(x) if pooler is not None else x[:, 0]
    if kind == "cls":
        return x[:, 0]
    if kind == "distilled":
        if pre_logits:
            return (x[:, 0] + x[:, 1]) / 2
        return (model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2
    if kind == "cls_mean":
        x = torch.cat([x[:, 0], x[:, num_prefix_tokens(model):].mean(dim=1)], dim=-1)  # (B, 2D)
    else:  # "token"
        x = x[:, 0]
    return x if pre_logits else model.classifier(x)


# ---- geometry -----------------------------------------------------------------------------------------------------


def num_prefix_tokens(model: nn.Module) -> int:
    """Class token + distillation token (DeiT) + register tokens (DINOv2 with registers)."""
    emb = _base(model).embeddings
    n = 1
    if isinstance(getattr(emb, "distillation_token", None), Tensor):
        n += 1
    registers = getattr(emb, "register_tokens", None)
    if isinstance(registers, Tensor):
        n += int(registers.shape[1])
    return n


def embed_dim(model: nn.Module) -> int:
    return int(_base(model).config.hidden_size)


def patch_size(model: nn.Module) -> Tuple[int, int]:
    ps = _base(model).embeddings.patch_embeddings.patch_size
    ph, pw = (ps, ps) if isinstance(ps, int) else tuple(ps)
    return int(ph), int(pw)


def classifier_modules(model: nn.Module) -> List[nn.Module]:
    """The classifier(s): ``classifier``, or DeiT-with-teacher's ``cls_classifier`` and ``distillation_classifier``;
    none for a bare ``*Model`` (its pooler, if any, is part of the backbone)."""
    kind = _kind(model)
    if kind == "distilled":
        return [model.cls_classifier, model.distillation_classifier]
    return [model.classifier] if kind in ("token", "cls_mean") else []


# ---- attention ----------------------------------------------------------------------------------------------------


def _projections(core: nn.Module) -> Optional[Tuple[nn.Linear, nn.Linear, nn.Linear]]:
    for names in _QKV_NAMES:
        lins = tuple(getattr(core, n, None) for n in names)
        if all(type(m) is nn.Linear for m in lins):
            return lins  # type: ignore[return-value]
    return None


def is_hf_attention(attn: nn.Module) -> bool:
    """A transformers attention core fedpeft adapts (the module owning the q / k / v projections)."""
    return is_hf(attn) and _projections(attn) is not None


def attention_layer(model: nn.Module, index: int) -> nn.Module:
    """The attention core of layer ``index``: ``layer.attention`` (5.x) or ``layer.attention.attention`` (4.x)."""
    layer = blocks(model)[index]
    attn = getattr(layer, "attention", None)
    inner = getattr(attn, "attention", None)
    core = inner if isinstance(inner, nn.Module) else attn
    if core is None or not is_hf_attention(core):
        got = "no `attention`" if core is None else f"{type(core).__module__}.{type(core).__name__}"
        raise TypeError(f"layer {index}'s attention is {got}; fedpeft's attention adapters need separate q/k/v "
                        "nn.Linear projections")
    return core


def _head_dim(core: nn.Module) -> int:
    return int(getattr(core, "head_dim", None) or core.attention_head_size)


def attention_dims(core: nn.Module) -> Tuple[int, int, int]:
    """``(dim, attn_dim, num_heads)``: input width, width of each of Q, K, V, heads."""
    q = _projections(core)[0]  # type: ignore[index]
    return int(q.in_features), int(q.out_features), int(core.num_attention_heads)


def _dropout(core: nn.Module) -> float:
    p = getattr(core, "attention_dropout", None)  # 5.x
    if p is None:
        p = getattr(core, "dropout_prob", 0.0)  # 4.x
    return float(p) if core.training else 0.0


def attention_forward(
    core: nn.Module,
    x: Tensor,
    *args: Any,
    kv_offset: Optional[Any] = None,
    kv_prefix: Optional[Tuple[Tensor, Tensor]] = None,
    **kwargs: Any,
) -> Tuple[Tensor, None]:
    """The transformers attention on SDPA, with fedpeft's two optional K/V changes (as ``_timm_eva``)::

        q, k, v = q_proj(x), k_proj(x), v_proj(x)         (B, N, C), C = attn_dim
        k, v   += kv_offset(x)                            ParallelPrefix: s·A_k, s·A_v
        k = [K_p ; k],  v = [V_p ; v]                     Prefix: (B, H, P + N, d)
        out = SDPA(q, k, v, scale=core.scaling)           (B, N, C), then o_proj in 5.x (4.x applies it outside)

    Returns ``(out, None)`` like the module's own forward. An attention mask or head mask is refused
    (``NotImplementedError``): the image models pass none.
    """
    mask = args[0] if args else next((kwargs[k] for k in ("attention_mask", "head_mask") if k in kwargs), None)
    if mask is not None:
        raise NotImplementedError("fedpeft's attention adapters on transformers models take no attention or head mask")
    B, N, _ = x.shape
    H, d = int(core.num_attention_heads), _head_dim(core)
    q_lin, k_lin, v_lin = _projections(core)  # type: ignore[misc]
    q, k, v = q_lin(x), k_lin(x), v_lin(x)  # (B, N, C) each
    if kv_offset is not None:
        k, v = kv_offset.offset_kv(x, k, v)
    q, k, v = (t.reshape(B, N, H, d).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    if kv_prefix is not None:
        k_p, v_p = kv_prefix
        if k_p.dim() == 2:
            k_p, v_p = k_p.expand(B, -1, -1), v_p.expand(B, -1, -1)
        P = k_p.shape[1]
        k = torch.cat([k_p.to(k.dtype).reshape(B, P, H, d).transpose(1, 2), k], dim=2)  # (B, H, P + N, d)
        v = torch.cat([v_p.to(v.dtype).reshape(B, P, H, d).transpose(1, 2), v], dim=2)
    scale = float(getattr(core, "scaling", 1.0 / math.sqrt(d)))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=_dropout(core), scale=scale)
    out = out.transpose(1, 2).reshape(B, N, H * d)
    o_proj = getattr(core, "o_proj", None)
    return (o_proj(out) if o_proj is not None else out), None
