"""Independent oracles for fedpeft on timm's Eva family (DINOv3, EVA-02, PE, RoPE ViTs), written from DESIGN §2.1
and §2.3, not from fedpeft's code.

- ``vpt_eva_oracle``: the model's own stages run by hand on a deep copy whose every attention is *told* that K more
  tokens are prefix tokens (``attn.num_prefix_tokens += K``), so timm itself skips the prompts when applying RoPE.
- ``eva_adapter_oracle``: every block re-done from the model's weights with an explicit softmax: q/k/v from the
  projection weights (fused with q/v biases, or separate), ``+ s·A`` on K and V (ParallelPrefix), q/k norms, RoPE
  (timm's ``apply_rot_embed_cat`` on the non-prefix rows), learned key/value tokens in front (Prefix, no RoPE),
  softmax(q kᵀ/√d) v, inner norm, proj, layer scale, residual, MLP (the block's own), layer scale, residual.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Tuple

import timm
import torch
from timm.layers import apply_rot_embed_cat
from torch import Tensor, nn

# key -> (timm name, kwargs, image size): depth-2 members of every code path the issue names.
EVA_MODELS = {
    "dinov3": ("vit_small_patch16_dinov3", {}, 48),  # 4 registers + cls, DINOv3 RoPE, fused qkv, no bias, avg
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", {}, 48),  # F.linear on qkv.weight with q/v biases
    "eva02": ("eva02_tiny_patch14_224", {}, 42),  # abs pos + RoPE (cat), fused qkv + q/v bias, SwiGLU, avg
    "eva02_separate": ("eva02_base_patch14_224", dict(embed_dim=64, num_heads=2), 42),  # q_proj/k_proj/v_proj
    "rope_vit": ("vit_small_patch16_rope_224", {}, 48),  # AttentionRope, token pooling
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}, 48),  # per-depth RoPE (rope_mixed)
    "pe": ("vit_pe_core_tiny_patch16_384", {}, 48),  # Perception Encoder: map attention pooling, norm_pre
}


@torch.no_grad()
def make_eva(key: str, *, seed: int = 0, num_classes: int = 5, dtype=torch.float64, **extra) -> Tuple[nn.Module, int]:
    """A depth-2 Eva with non-trivial weights (non-zero biases, tokens, layer scale, head), eval, float64."""
    name, kwargs, size = EVA_MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, depth=2, img_size=size,
                              **{**kwargs, **extra})
    randomize_(model)
    return model.to(dtype).eval(), size


@torch.no_grad()
def randomize_(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        if p.dim() <= 1 or float(p.abs().max()) == 0.0:
            p.add_(0.1 * torch.randn_like(p))
        if "qkv" in n or "q_proj" in n or "k_proj" in n:
            p.mul_(4.0)  # logits of order 1: a peaky softmax
    for name_ in ("cls_token", "reg_token", "pos_embed"):
        t = getattr(model, name_, None)
        if t is not None:
            t.normal_(0, 0.5)
    if isinstance(model.head, nn.Linear):
        model.head.weight.normal_(0, 1.0)  # timm scales the head init by 1e-3: logits would hide every difference


def images(size: int, batch: int = 2, *, seed: int = 1, dtype=torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(dtype)


def _block_rope(model: nn.Module, rope: Optional[Tensor], i: int) -> Optional[Tensor]:
    return rope[i] if rope is not None and model.rope_mixed else rope


def vpt_eva_oracle(model: nn.Module, x: Tensor, prompts: Tensor, *, deep: bool, pre_logits: bool = False) -> Tensor:
    """``prompts`` (L, K, D) or (B, L, K, D). The attention of a deep copy is told the K prompts are prefix tokens."""
    m = copy.deepcopy(model)
    tokens, rope = m._pos_embed(m.patch_embed(x))  # (B, n_p + N, D), rope of the N patch tokens
    B, T, D = tokens.shape
    if prompts.dim() == 3:
        prompts = prompts.unsqueeze(0).expand(B, -1, -1, -1)
    K, n_p = prompts.shape[2], m.num_prefix_tokens
    for block in m.blocks:
        block.attn.num_prefix_tokens = n_p + K
    seq = tokens.new_zeros(B, T + K, D)
    seq[:, :n_p], seq[:, n_p : n_p + K], seq[:, n_p + K :] = tokens[:, :n_p], prompts[:, 0], tokens[:, n_p:]
    seq = m.norm_pre(seq)
    for i, block in enumerate(m.blocks):
        if deep and i > 0:
            seq = seq.clone()
            seq[:, n_p : n_p + K] = prompts[:, i]
        seq = block(seq, rope=_block_rope(m, rope, i))
    keep = [j for j in range(T + K) if not n_p <= j < n_p + K]
    return m.forward_head(m.norm(seq[:, keep]), pre_logits=pre_logits)


def _linear(weight: Tensor, bias: Optional[Tensor], x: Tensor) -> Tensor:
    y = x @ weight.T
    return y if bias is None else y + bias


def explicit_eva_attention(
    attn: nn.Module,
    x: Tensor,
    rope: Optional[Tensor],
    *,
    offset: Optional[Tuple[nn.Linear, nn.Linear, float]] = None,
    prefix: Optional[Tuple[Tensor, Tensor]] = None,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """``attn_mask`` (N, N) bool (True = attend) over the tokens; prefix keys are always visible."""
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    C = H * d
    if attn.qkv is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])  # EVA: no k bias
        qkv = _linear(attn.qkv.weight, bias, x)
        q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    else:
        q, k, v = (_linear(p.weight, p.bias, x) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if offset is not None:
        down, up, s = offset
        a = _linear(up.weight, up.bias, torch.tanh(_linear(down.weight, down.bias, x)))  # (B, N, 2C)
        k, v = k + s * a[..., :C], v + s * a[..., C:]

    def heads(t: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, d)
        return t.reshape(B, t.shape[1], H, d).permute(0, 2, 1, 3)

    q, k, v = attn.q_norm(heads(q)), attn.k_norm(heads(k)), heads(v)
    if rope is not None:
        n = attn.num_prefix_tokens
        half = attn.rotate_half
        q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=half)], dim=2)
    if prefix is not None:
        k_p, v_p = prefix  # (P, C): no RoPE, k_norm like every key
        k = torch.cat([attn.k_norm(heads(k_p.expand(B, -1, -1))), k], dim=2)
        v = torch.cat([heads(v_p.expand(B, -1, -1)), v], dim=2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if attn_mask is not None:
        P = k.shape[2] - N
        logits = torch.cat([logits[..., :P], logits[..., P:].masked_fill(~attn_mask, float("-inf"))], dim=-1)
    w = torch.exp(logits - logits.amax(-1, keepdim=True))
    out = (w / w.sum(-1, keepdim=True)) @ v  # (B, H, N, d)
    out = attn.norm(out.permute(0, 2, 1, 3).reshape(B, N, C))
    return _linear(attn.proj.weight, attn.proj.bias, out)


def _scaled(gamma: Optional[Tensor], x: Tensor) -> Tensor:
    return x if gamma is None else gamma * x


def explicit_eva_block(block: nn.Module, x: Tensor, rope: Optional[Tensor], **kw) -> Tensor:
    if type(block).__name__ == "EvaBlockPostNorm":
        x = x + block.norm1(explicit_eva_attention(block.attn, x, rope, **kw))
        return x + block.norm2(block.mlp(x))
    x = x + _scaled(block.gamma_1, explicit_eva_attention(block.attn, block.norm1(x), rope, **kw))
    return x + _scaled(block.gamma_2, block.mlp(block.norm2(x)))


def eva_adapter_oracle(
    model: nn.Module,
    x: Tensor,
    *,
    adapters: Optional[Dict[int, Tuple[nn.Linear, nn.Linear]]] = None,
    scale: float = 1.5,
    prefix: Optional[Tuple[Tensor, Tensor]] = None,
    prompts: Optional[Tensor] = None,
    deep: bool = False,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """Logits with ParallelPrefix ``adapters[i] = (down, up)``, Prefix ``prefix = (keys, values)`` (depth, P, C),
    and optional VPT ``prompts`` (L, K, D): the attention of a deep copy is told K more prefix tokens."""
    m = copy.deepcopy(model)
    adapters = adapters or {}
    t, rope = m._pos_embed(m.patch_embed(x))
    n_p = m.num_prefix_tokens
    K = 0 if prompts is None else prompts.shape[1]
    for block in m.blocks:
        block.attn.num_prefix_tokens = n_p + K
    if K:
        t = torch.cat([t[:, :n_p], prompts[0].expand(t.shape[0], -1, -1), t[:, n_p:]], dim=1)
    t = m.norm_pre(t)
    for i, block in enumerate(m.blocks):
        if K and deep and i > 0:
            t = torch.cat([t[:, :n_p], prompts[i].expand(t.shape[0], -1, -1), t[:, n_p + K :]], dim=1)
        kw = {} if attn_mask is None else {"attn_mask": attn_mask}
        if i in adapters:
            kw["offset"] = (*adapters[i], scale)
        if prefix is not None:
            kw["prefix"] = (prefix[0][i], prefix[1][i])
        # a block with nothing attached is the model's own stage (this also covers grouped-query blocks)
        t = explicit_eva_block(block, t, _block_rope(m, rope, i), **kw) if kw else block(t, rope=_block_rope(m, rope, i))
    if K:
        t = torch.cat([t[:, :n_p], t[:, n_p + K :]], dim=1)
    return m.forward_head(m.norm(t))
