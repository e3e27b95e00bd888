"""Parameter summaries and the wrapper-chain repr, against counts worked out by hand from the module shapes."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from torch import nn

from fedpeft import VPT, LowRankPrompt, ParallelPrefix, ParameterSummary, Prefix, parameter_summary

# A tiny ViT whose every shape is known: 32×32 images, 8×8 patches (N = 16), D = 24, 3 blocks, MLP hidden 48, 5 classes.
IMG, P, D, DEPTH, HIDDEN, CLASSES = 32, 8, 24, 3, 48, 5
N = (IMG // P) ** 2


def _hand_count_vit() -> dict:
    """timm's VisionTransformer (class token, qkv bias, LayerNorms, linear head), counted from the shapes."""
    block = (
        2 * D  # norm1
        + 3 * D * D + 3 * D  # attn.qkv
        + D * D + D  # attn.proj
        + 2 * D  # norm2
        + D * HIDDEN + HIDDEN  # mlp.fc1
        + HIDDEN * D + D  # mlp.fc2
    )
    head = D * CLASSES + CLASSES
    backbone = 3 * P * P * D + D + D + (N + 1) * D + DEPTH * block + 2 * D  # patch_embed, cls, pos_embed, blocks, norm
    return {"backbone": backbone, "head": head, "total": backbone + head}


HAND = _hand_count_vit()


def make_vit(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH,
        num_heads=2, mlp_ratio=HIDDEN / D, num_classes=CLASSES,
    )
    return vit.to(dtype)


def test_hand_count_of_the_test_vit():
    # the numbers the other tests build on: 19,853 = 4,632 + 24 + 408 + 3 · 4,872 + 48 + 125
    assert HAND == {"backbone": 19728, "head": 125, "total": 19853}
    s = parameter_summary(make_vit())
    assert (s.total_params, s.trainable_params) == (19853, 19853)
    assert s.method == "VisionTransformer"


@pytest.mark.parametrize("deep, depth", [(False, 1), (True, DEPTH)])
def test_vpt_counts(deep, depth):
    K = 4
    s = VPT(make_vit(), num_prompts=K, deep=deep).summary()
    prompts = depth * K * D
    assert s.total_params == HAND["total"] + prompts
    assert s.trainable_params == prompts + HAND["head"]
    assert s.trainable_bytes == 4 * (prompts + HAND["head"])
    assert s.trainable_percent == pytest.approx(100 * (prompts + HAND["head"]) / (HAND["total"] + prompts))
    # no split: everything trainable is shared
    assert (s.shared_params, s.personal_params, s.split) == (prompts + HAND["head"], 0, None)
    assert s.shared_keys == ("model.head.bias", "model.head.weight", "prompts")


def test_peft_style_line_for_deep_vpt():
    # deep VPT, K = 4: prompts 3·4·24 = 288, head 125 → 413 trainable of 19,853 + 288 = 20,141 (2.0505 %)
    m = VPT(make_vit(), num_prompts=4, deep=True)
    assert m.summary().trainable_line() == "trainable params: 413 || all params: 20,141 || trainable%: 2.0505"


def test_vit_small_deep_vpt_matches_the_issue():
    # issue 14: "49,930 of 21,715,594 = 0.230 % for a deep VPT on ViT-S" (prompts 12·10·384 + head 384·10 + 10)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)
        m = VPT(vit, num_prompts=10, deep=True)
    s = m.summary()
    assert (s.trainable_params, s.total_params) == (12 * 10 * 384 + 384 * 10 + 10, 21_715_594)
    assert f"{s.trainable_percent:.3f}" == "0.230"


def test_parallel_prefix_fedperfix_split():
    m_ = 6  # bottleneck; adapters on blocks 0 and 2: down D·m + m, up m·2D + 2D
    adapter = D * m_ + m_ + m_ * 2 * D + 2 * D
    assert adapter == 486
    frozen = ParallelPrefix(make_vit(), bottleneck=m_, blocks=[0, 2]).summary("fedperfix")
    assert frozen.total_params == HAND["total"] + 2 * adapter
    assert frozen.trainable_params == 2 * adapter + HAND["head"]
    assert (frozen.shared_params, frozen.personal_params) == (0, 2 * adapter + HAND["head"])
    assert frozen.split == ("fedperfix",)

    # FedPerfix proper trains the backbone: the whole backbone is shared, adapters + head personal
    full = ParallelPrefix(make_vit(), bottleneck=m_, blocks=[0, 2], train_backbone=True).summary("fedperfix")
    assert full.trainable_params == full.total_params == HAND["total"] + 2 * adapter
    assert (full.shared_params, full.shared_bytes) == (HAND["backbone"], 4 * HAND["backbone"])
    assert (full.personal_params, full.personal_bytes) == (2 * adapter + HAND["head"], 4 * (2 * adapter + HAND["head"]))
    assert all(k.startswith(("adapters.", "model.head.")) for k in full.personal_keys)
    assert len(full.personal_keys) == 2 * 4 + 2  # down/up weight+bias per adapter, head weight+bias


def test_prefix_counts():
    s = Prefix(make_vit(), length=3).summary(["prefix"])
    own = 2 * DEPTH * 3 * D  # keys and values, (depth, length, attn_dim) each
    assert s.total_params == HAND["total"] + own
    assert (s.personal_params, s.shared_params) == (own, HAND["head"])
    assert s.personal_keys == ("keys", "values")


def test_composition_with_lowrank_prompt_fedpgp_split():
    K, r = 4, 2
    lr = LowRankPrompt(num_prompts=K, embed_dim=D, rank=r)
    m = Prefix(VPT(make_vit(), num_prompts=K, prompts=lr), length=2)
    s = m.summary("fedpgp")
    sigma, u, v, prefix = K * D, K * r, r * D, 2 * DEPTH * 2 * D
    assert s.method == "Prefix+VPT"
    assert s.total_params == HAND["total"] + sigma + u + v + prefix
    assert s.trainable_params == sigma + u + v + prefix + HAND["head"]
    # fedpgp: U, V and head personal; σ (global_prompt) and the prefix shared
    assert s.personal_keys == ("model.model.head.bias", "model.model.head.weight", "model.prompts.u", "model.prompts.v")
    assert (s.personal_params, s.personal_bytes) == (u + v + HAND["head"], 4 * (u + v + HAND["head"]))
    assert s.shared_keys == ("keys", "model.prompts.global_prompt", "values")
    assert (s.shared_params, s.shared_bytes) == (sigma + prefix, 4 * (sigma + prefix))


def test_pfedpg_split_counts_what_is_averaged():
    # the pfedpg preset is pFedPG's split: the head stays, the prompts are uploaded (as P̃ for the generator)
    s = VPT(make_vit(), num_prompts=4).summary("pfedpg")
    assert (s.shared_params, s.personal_params) == (4 * D, HAND["head"])


def test_bytes_follow_the_parameter_dtype():
    s = VPT(make_vit(torch.float16), num_prompts=4).summary("head")
    assert (s.shared_params, s.shared_bytes) == (4 * D, 2 * 4 * D)
    assert s.trainable_bytes == 2 * (4 * D + HAND["head"])


def test_tied_parameters_count_once_in_totals_and_per_key_in_the_split():
    lin = nn.Linear(3, 2)  # 8 parameters, registered under two names
    s = parameter_summary(nn.Sequential(lin, lin))
    assert (s.total_params, s.trainable_params) == (8, 8)
    assert s.shared_keys == ("0.bias", "0.weight", "1.bias", "1.weight")
    assert s.shared_params == 16  # sent once per key, as fed.trainable_state would


def test_model_without_parameters():
    s = parameter_summary(nn.ReLU())
    assert (s.total_params, s.trainable_params, s.trainable_percent) == (0, 0, 0.0)


def test_repr_shows_the_wrapper_chain():
    m_ = 6
    m = ParallelPrefix(VPT(make_vit(), num_prompts=4, deep=True), bottleneck=m_, blocks=[0, 2])
    adapters, prompts = 2 * (D * m_ + m_ + m_ * 2 * D + 2 * D), DEPTH * 4 * D
    trainable = adapters + prompts + HAND["head"]
    total = HAND["total"] + adapters + prompts
    assert repr(m).splitlines() == [
        "ParallelPrefix(bottleneck=6, scale=1.5, blocks=[0, 2], init='fedperfix', train_backbone=False)"
        f"  [own params: {adapters:,}]",
        f"└─ VPT(num_prompts=4, deep=True, prompt_depth=3)  [own params: {prompts:,}]",
        f"   └─ VisionTransformer  [params: {HAND['total']:,}, trainable: {HAND['head']}]",
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}",
    ]
    assert "└─ VPT(" in repr(nn.Sequential(m))  # nested in a container, still the short form


def test_repr_names_a_prompt_module():
    m = VPT(make_vit(), num_prompts=4, prompts=LowRankPrompt(num_prompts=4, embed_dim=D, rank=2))
    first = repr(m).splitlines()[0]
    assert first.startswith("VPT(num_prompts=4, deep=False, prompt_depth=1, prompts=LowRankPrompt(")
    assert first.endswith(f"[own params: {4 * D + 4 * 2 + 2 * D}]")


def test_print_trainable_parameters(capsys):
    m = Prefix(make_vit(), length=1)
    own = 2 * DEPTH * 1 * D
    m.print_trainable_parameters("fedperfix")
    out = capsys.readouterr().out.splitlines()
    total, trainable = HAND["total"] + own, own + HAND["head"]
    assert out[0] == (
        f"Prefix: trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    assert out[1] == "personalization split: ['fedperfix']"
    assert out[2].split() == "shared (sent and averaged each round): 0 params, 0 B in 0 tensors".split()
    assert out[3].split() == (
        f"personal (kept on the client): {trainable:,} params, {4 * trainable:,} B "
        f"({4 * trainable / 1024:.1f} KiB) in 4 tensors"
    ).split()
    buf = io.StringIO()
    m.print_trainable_parameters(file=buf)
    assert buf.getvalue().splitlines()[1] == "personalization split: none (every trainable parameter is shared)"


def test_bad_input():
    m = VPT(make_vit(), num_prompts=2)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module, got str"):
        parameter_summary("vit")
    with pytest.raises(TypeError, match="personal must be None, a pattern str"):
        m.summary(3)
    with pytest.raises(TypeError, match="must be str, got int"):
        m.summary(["head", 1])
    with pytest.raises(ValueError, match="unknown word 'heads'"):
        m.summary("heads")
    with pytest.warns(UserWarning, match="matches no key"):
        s = m.summary(["head", "*nothing*"])
    assert s.personal_params == HAND["head"]
    assert isinstance(s, ParameterSummary)
    with pytest.raises(AttributeError):
        s.total_params = 0  # frozen
