"""The free oracle for transformers models: a tiny random timm ViT whose weights are copied one-to-one into a tiny
random transformers config (no download), on 4.x and 5.x layouts alike.

``pair(name)`` returns ``(timm_model, hf_model)`` in float64 and eval mode, with equal weights: ``check_copy`` first
asserts that the two *plain* models give the same tokens, so every later comparison of wrapped models tests fedpeft,
not the copy. ``head_oracle`` is each transformers class's pooling and classifier written from its modeling file, by
hand, on the timm model's tokens.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

IMG, PATCH, DIM, DEPTH, HEADS, CLASSES, REGISTERS = 16, 4, 32, 2, 2, 5, 2
COMMON = dict(
    hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=IMG, patch_size=PATCH,
    num_labels=CLASSES, layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
TIMM = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0,
            num_classes=CLASSES, qkv_bias=True)

#: class name → (family, timm builder, transformers config builder)
FAMILIES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], object]]] = {
    "vit": (lambda: VisionTransformer(**TIMM), lambda: transformers.ViTConfig(intermediate_size=2 * DIM, **COMMON)),
    "deit": (lambda: VisionTransformerDistilled(**TIMM),
             lambda: transformers.DeiTConfig(intermediate_size=2 * DIM, **COMMON)),
    "dinov2": (lambda: VisionTransformer(init_values=0.5, **TIMM),
               lambda: transformers.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **COMMON)),
    "dinov2_reg": (lambda: VisionTransformer(init_values=0.5, reg_tokens=REGISTERS, no_embed_class=True, **TIMM),
                   lambda: transformers.Dinov2WithRegistersConfig(
                       mlp_ratio=2, layerscale_value=0.5, num_register_tokens=REGISTERS, **COMMON)),
}

CLASSES_BY_FAMILY = {
    "vit": ("ViTModel", "ViTForImageClassification"),
    "deit": ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
    "dinov2": ("Dinov2Model", "Dinov2ForImageClassification"),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"),
}
ALL_CLASSES = [(fam, cls) for fam, names in CLASSES_BY_FAMILY.items() for cls in names]


def _layer_names(hf_keys: set, prefix: str, i: int) -> str:
    return f"{prefix}layers.{i}." if any(k.startswith(f"{prefix}layers.") for k in hf_keys) else \
        f"{prefix}encoder.layer.{i}."


def copy_timm_into_hf(vit: nn.Module, hf: nn.Module) -> None:
    """Copy every timm weight into its transformers twin (fused qkv split in three); the classifier too when the
    shapes agree. Asserts that nothing of the transformers backbone was left out."""
    hf_sd = hf.state_dict()
    keys = set(hf_sd)
    prefix = next(k for k in keys if k.endswith("embeddings.cls_token"))[: -len("embeddings.cls_token")]
    emb = prefix + "embeddings."
    out: Dict[str, Tensor] = {}

    def put(candidates, value):
        name = next((c for c in candidates if c in keys), None)
        assert name is not None, f"no transformers key among {candidates}"
        if hf_sd[name].shape == value.shape:
            out[name] = value

    for key, value in vit.state_dict().items():
        w = key.rsplit(".", 1)[-1]
        if key == "cls_token":
            put([emb + "cls_token"], value)
        elif key == "dist_token":
            put([emb + "distillation_token"], value)
        elif key == "reg_token":
            put([emb + "register_tokens"], value)
        elif key == "pos_embed":
            target = hf_sd[emb + "position_embeddings"]
            if value.shape[1] + 1 == target.shape[1]:  # timm no_embed_class: the class token gets no position
                value = torch.cat([value.new_zeros(1, 1, DIM), value], dim=1)
            put([emb + "position_embeddings"], value)
        elif key.startswith("patch_embed.proj."):
            put([emb + "patch_embeddings.projection." + w], value)
        elif key.startswith("norm."):
            put([prefix + "layernorm." + w], value)
        elif key.startswith("head."):
            if {"classifier." + w, "cls_classifier." + w} & keys:  # a bare *Model has no classifier
                put(["classifier." + w, "cls_classifier." + w], value)
        elif key.startswith("head_dist."):
            if "distillation_classifier." + w in keys:
                put(["distillation_classifier." + w], value)
        elif key.startswith("blocks."):
            i, rest = int(key.split(".")[1]), key.split(".", 2)[2]
            lp = _layer_names(keys, prefix, i)
            if rest.startswith("attn.qkv."):
                for part, names in zip(value.chunk(3, dim=0), (("q_proj", "query"), ("k_proj", "key"),
                                                                ("v_proj", "value"))):
                    put([f"{lp}attention.{names[0]}.{w}", f"{lp}attention.attention.{names[1]}.{w}"], part)
            else:
                table = {
                    "attn.proj": ["attention.o_proj", "attention.output.dense"],
                    "norm1": ["layernorm_before", "norm1"], "norm2": ["layernorm_after", "norm2"],
                    "mlp.fc1": ["mlp.fc1", "intermediate.dense"], "mlp.fc2": ["mlp.fc2", "output.dense"],
                    "ls1": ["layer_scale1"], "ls2": ["layer_scale2"],
                }
                mod = rest.rsplit(".", 1)[0]
                w = "lambda1" if w == "gamma" else w
                put([f"{lp}{c}.{w}" for c in table[mod]], value)
        else:
            raise AssertionError(f"unmapped timm key {key}")
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert not unexpected
    left = [k for k in missing if not k.endswith("mask_token") and "pooler" not in k and "classifier" not in k]
    assert not left, left


def pair(family: str, cls_name: str, *, seed: int = 0) -> Tuple[nn.Module, nn.Module]:
    """(timm model, transformers ``cls_name``) of one family with equal weights, float64, eval mode."""
    make_timm, make_config = FAMILIES[family]
    torch.manual_seed(seed)
    vit = make_timm().double().eval()
    with torch.no_grad():  # LayerNorm / LayerScale / biases away from their init, so every weight matters
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = make_config()
    config._attn_implementation = "sdpa"
    hf = getattr(transformers, cls_name)(config).double().eval()
    copy_timm_into_hf(vit, hf)
    return vit, hf


def images(batch: int = 3, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def num_prefix(family: str) -> int:
    return {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_reg": 1 + REGISTERS}[family]


def head_oracle(hf: nn.Module, tokens: Tensor, n_p: int) -> Tensor:
    """What ``hf``'s forward makes of its normed tokens (B, n_p + N, D), by hand from its modeling file."""
    name = type(hf).__name__
    cls = tokens[:, 0]
    if name in ("ViTModel", "DeiTModel"):
        return torch.tanh(F.linear(cls, hf.pooler.dense.weight, hf.pooler.dense.bias))
    if name.startswith("Dinov2") and name.endswith("Model"):
        return cls
    if name == "DeiTForImageClassificationWithTeacher":
        return (F.linear(cls, hf.cls_classifier.weight, hf.cls_classifier.bias)
                + F.linear(tokens[:, 1], hf.distillation_classifier.weight, hf.distillation_classifier.bias)) / 2
    if name.startswith("Dinov2"):
        cls = torch.cat([cls, tokens[:, n_p:].mean(dim=1)], dim=-1)
    return F.linear(cls, hf.classifier.weight, hf.classifier.bias)


def hf_output(hf: nn.Module, x: Tensor) -> Tensor:
    """The plain transformers model's own tensor output: logits, or the pooled output of a ``*Model``."""
    out = hf(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def hf_tokens(hf: nn.Module, x: Tensor) -> Tensor:
    return hf.base_model(pixel_values=x).last_hidden_state
