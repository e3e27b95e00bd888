"""fed.personal_keys / WORDS / PRESETS / trainable_keys / split / merge against hand-listed key names."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

from fedpeft import fed

DEPTH = 6  # test_vit's blocks


@pytest.fixture(scope="module")
def test_vit():
    return timm.create_model("test_vit", pretrained=False, num_classes=5)


def _blocks(*suffixes: str) -> list:
    return sorted(f"blocks.{i}.{s}" for i in range(DEPTH) for s in suffixes)


def test_words_on_a_real_timm_test_vit(test_vit):
    expected = {
        "head": ["head.bias", "head.weight"],
        "pos_embed": ["pos_embed"],
        "patch_embed": ["patch_embed.proj.bias", "patch_embed.proj.weight"],
        "attn": _blocks("attn.proj.bias", "attn.proj.weight", "attn.qkv.bias", "attn.qkv.weight"),
        "mlp": _blocks("mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight"),
        "norm": sorted([*_blocks("norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"), "norm.bias",
                        "norm.weight"]),
    }
    for word, keys in expected.items():
        assert fed.personal_keys(test_vit, word) == keys, word
    # the six layer types of the FedPerfix study cover the ViT, except the class token, without overlap
    covered = [k for keys in expected.values() for k in keys]
    assert len(covered) == len(set(covered))
    assert set(test_vit.state_dict()) - set(covered) == {"cls_token"}


def test_frozen_parameters_are_still_selected(test_vit):
    for p in test_vit.parameters():
        p.requires_grad_(False)
    try:
        assert fed.personal_keys(test_vit, "head") == ["head.bias", "head.weight"]
        assert fed.trainable_keys(test_vit) == []
        test_vit.head.weight.requires_grad_(True)
        assert fed.trainable_keys(test_vit) == ["head.weight"]
    finally:
        for p in test_vit.parameters():
            p.requires_grad_(True)


# A composite state: backbone keys of several timm variants, nested in fedpeft wrappers (``model.``), and
# fedpeft's own parts, named as in .notes/CONVENTIONS.md.
KEYS = [
    "model.model.cls_token", "model.model.reg_token", "model.model.dist_token", "model.model.pos_embed",
    "model.model.patch_embed.proj.weight", "model.model.patch_embed.norm.weight", "model.model.norm_pre.weight",
    "model.model.blocks.0.norm1.weight", "model.model.blocks.0.attn.qkv.weight", "model.model.blocks.0.attn.proj.bias",
    "model.model.blocks.0.attn.q_norm.weight", "model.model.blocks.0.attn.k_norm.bias",
    "model.model.blocks.0.attn.norm.weight", "model.model.blocks.0.ls1.gamma", "model.model.blocks.0.norm2.bias",
    "model.model.blocks.0.mlp.fc1.weight", "model.model.blocks.0.mlp.fc2.bias", "model.model.blocks.0.ls2.gamma",
    "model.model.blocks.1.attn.q_proj.weight",  # an Eva-style attention: not the generator
    "model.model.norm.weight", "model.model.fc_norm.bias",
    "model.model.attn_pool.latent", "model.model.attn_pool.kv.weight", "model.model.attn_pool.norm.weight",
    "model.model.attn_pool.mlp.fc1.weight",
    "model.model.head.weight", "model.model.head.bias", "model.model.head_dist.weight",
    "model.prompts", "model.prompts.global_prompt", "model.prompts.u", "model.prompts.v",
    "adapters.0.down.weight", "adapters.0.down.bias", "adapters.11.up.weight", "adapters.11.up.bias",
    "model.keys", "model.values",
    "gen.prompt_base", "gen.descriptors", "gen.q_proj.weight", "gen.k_proj.bias", "gen.v_proj.weight",
    "gen.out_proj.bias",
    "model.model.blocks.0.attn.qkv.lora_A.default.weight", "model.model.blocks.0.attn.qkv.lora_B.default.weight",
]
STATE = {k: torch.zeros(1) for k in KEYS}
MM = "model.model."
EXPECTED = {
    "head": [MM + "head.bias", MM + "head.weight", MM + "head_dist.weight"],
    "pos_embed": [MM + "pos_embed"],
    "patch_embed": [MM + "patch_embed.norm.weight", MM + "patch_embed.proj.weight"],
    "attn": [MM + f"blocks.0.attn.{s}" for s in (
        "k_norm.bias", "norm.weight", "proj.bias", "q_norm.weight", "qkv.lora_A.default.weight",
        "qkv.lora_B.default.weight", "qkv.weight")] + [MM + "blocks.1.attn.q_proj.weight"],
    "mlp": [MM + "attn_pool.mlp.fc1.weight", MM + "blocks.0.mlp.fc1.weight", MM + "blocks.0.mlp.fc2.bias"],
    "norm": [MM + s for s in (
        "attn_pool.norm.weight", "blocks.0.attn.k_norm.bias", "blocks.0.attn.norm.weight",
        "blocks.0.attn.q_norm.weight", "blocks.0.norm1.weight", "blocks.0.norm2.bias", "fc_norm.bias",
        "norm.weight", "norm_pre.weight", "patch_embed.norm.weight")],
    "prompts": ["model.prompts", "model.prompts.global_prompt", "model.prompts.u", "model.prompts.v"],
    "lowrank": ["model.prompts.u", "model.prompts.v"],
    "prefix": ["adapters.0.down.bias", "adapters.0.down.weight", "adapters.11.up.bias", "adapters.11.up.weight",
               "model.keys", "model.values"],
    "generator": ["gen.descriptors", "gen.k_proj.bias", "gen.out_proj.bias", "gen.prompt_base",
                  "gen.q_proj.weight", "gen.v_proj.weight"],
    "lora": [MM + "blocks.0.attn.qkv.lora_A.default.weight", MM + "blocks.0.attn.qkv.lora_B.default.weight"],
}


def test_every_word_is_tested():
    assert set(EXPECTED) == set(fed.WORDS)


@pytest.mark.parametrize("word", sorted(EXPECTED))
def test_word_matches_exactly_the_hand_listed_keys(word):
    assert fed.personal_keys(STATE, word) == sorted(EXPECTED[word])


def test_words_ignore_the_nesting_prefix():
    unwrapped = {k.removeprefix(MM): v for k, v in STATE.items() if k.startswith(MM)}
    for word in ("head", "pos_embed", "patch_embed", "attn", "mlp", "norm", "lora"):
        assert fed.personal_keys(unwrapped, word) == sorted(k.removeprefix(MM) for k in EXPECTED[word]), word


@pytest.mark.parametrize(
    "preset, words",
    [("fedavg", []), ("fedbn", ["norm"]), ("fedrep", ["head"]), ("fedvpt", ["head"]),
     ("pfedpg", ["head"]), ("fedperfix", ["prefix", "head"]), ("fedpgp", ["lowrank", "head"]),
     ("vanilla_attention", ["attn", "head"])],
)
def test_presets(preset, words):
    assert fed.personal_keys(STATE, preset) == sorted({k for w in words for k in EXPECTED[w]})
    assert fed.PRESETS[preset] == tuple(words)


def test_fedpgp_keeps_the_global_prompt_shared():
    personal = fed.personal_keys(STATE, "fedpgp")
    assert "model.prompts.global_prompt" not in personal and "model.prompts.u" in personal


def test_globs_and_unions():
    assert fed.personal_keys(STATE, "*ls?.gamma") == [MM + "blocks.0.ls1.gamma", MM + "blocks.0.ls2.gamma"]
    assert fed.personal_keys(STATE, "model.keys") == ["model.keys"]  # a dotted name is an exact key
    assert fed.personal_keys(STATE, ["head", "*_token", "head"]) == sorted(
        EXPECTED["head"] + [MM + "cls_token", MM + "dist_token", MM + "reg_token"]
    )
    assert fed.personal_keys(STATE, ["fedperfix", "*blocks.1.*"]) == sorted(
        EXPECTED["prefix"] + EXPECTED["head"] + [MM + "blocks.1.attn.q_proj.weight"]
    )
    with pytest.warns(UserWarning, match="matches no key"):
        assert fed.personal_keys(STATE, "*HEAD*") == []  # case-sensitive


def test_unknown_word_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown word 'haed'.*'attn'.*'prompts'.*'fedperfix'.*'\*haed\*'"):
        fed.personal_keys(STATE, ["head", "haed"])


def test_a_pattern_matching_nothing_warns_but_fedavg_does_not():
    with pytest.warns(UserWarning, match="'lora' matches no key"):
        assert fed.personal_keys({"head.weight": torch.zeros(1)}, ["head", "lora"]) == ["head.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fed.personal_keys(STATE, "fedavg") == []


def test_bad_arguments():
    with pytest.raises(TypeError, match="patterns must be str"):
        fed.personal_keys(STATE, ["head", 3])
    with pytest.raises(TypeError, match="Mapping"):
        fed.personal_keys(list(STATE), "head")
    with pytest.raises(TypeError, match="Module"):
        fed.trainable_keys(STATE)


def test_split_and_merge():
    state = {"a": torch.zeros(2), "h.w": torch.ones(3), "b": torch.arange(4)}
    shared, personal = fed.split(state, ["h.w"])
    assert list(shared) == ["a", "b"] and list(personal) == ["h.w"]
    assert shared["a"] is state["a"] and personal["h.w"] is state["h.w"]  # no copies
    merged = fed.merge(shared, personal)
    assert merged.keys() == state.keys() and all(merged[k] is state[k] for k in state)
    assert list(state) == ["a", "h.w", "b"]  # input untouched
    assert fed.split(state, []) == (state, {})


def test_split_and_merge_refuse_bad_keys():
    state = {"a": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match="keys not in state: \\['c'\\]"):
        fed.split(state, ["a", "c"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        fed.split(state, "a")
    with pytest.raises(ValueError, match="keys in both shared and personal: \\['b'\\]"):
        fed.merge(state, {"b": torch.zeros(1), "c": torch.zeros(1)})
    with pytest.raises(TypeError, match="personal must be a Mapping"):
        fed.merge(state, [torch.zeros(1)])


def test_presets_on_the_fedpeft_wrappers():
    """The words match the names the wrappers really use (DESIGN §1, .notes/CONVENTIONS.md)."""
    from fedpeft import VPT, LowRankPrompt, ParallelPrefix, Prefix, PromptGenerator

    def vit():
        return timm.create_model("test_vit", pretrained=False, num_classes=5)

    head = ["model.head.bias", "model.head.weight"]
    perfix = ParallelPrefix(VPT(vit(), num_prompts=2), bottleneck=8)
    adapters = sorted(f"adapters.{i}.{p}.{w}" for i in range(DEPTH) for p in ("down", "up") for w in ("bias", "weight"))
    assert fed.personal_keys(perfix, "fedperfix") == [*adapters, "model.model.head.bias", "model.model.head.weight"]
    assert fed.personal_keys(perfix, "prompts") == ["model.prompts"]
    assert fed.personal_keys(Prefix(vit(), length=2), "fedperfix") == ["keys", *head, "values"]

    lowrank = VPT(vit(), num_prompts=2, prompts=LowRankPrompt(num_prompts=2, embed_dim=64, rank=2))
    assert fed.personal_keys(lowrank, "fedpgp") == [*head, "prompts.u", "prompts.v"]
    assert fed.personal_keys(lowrank, "pfedpg") == head  # pFedPG's split: the head; the prompts are uploaded
    assert fed.trainable_keys(lowrank) == [*head, "prompts.global_prompt", "prompts.u", "prompts.v"]

    gen = PromptGenerator(num_clients=3, num_prompts=2, embed_dim=64)
    assert fed.personal_keys(gen, "generator") == sorted(gen.state_dict())


def test_trainable_state_is_detached_copies_of_exactly_the_trainable_parameters():
    import timm

    from fedpeft import VPT

    model = VPT(timm.create_model("test_vit", pretrained=False, num_classes=3), num_prompts=2)
    state = fed.trainable_state(model)
    assert list(state) == ["model.head.bias", "model.head.weight", "prompts"]  # hand-listed, sorted
    live = dict(model.named_parameters())
    for key, value in state.items():
        assert torch.equal(value, live[key].detach()) and not value.requires_grad
    before = state["prompts"].clone()
    with torch.no_grad():
        model.prompts.add_(1.0)  # training goes on after the upload
    assert torch.equal(state["prompts"], before)  # the upload did not change with it
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fed.trainable_state(dict(model.state_dict()))
