"""What each method uploads and keeps, against hand-written key lists and parameter counts."""

from __future__ import annotations

import pytest
import torch
from protocol_models import NUM_CLASSES, K, client_data, model_for, vit

from fedpeft import fed, protocols

D, DEPTH = 64, 2
HEAD = ["head.bias", "head.weight"]


def _vit_keys():
    return sorted(n for n, _ in vit().named_parameters())


def _expected_uploads():
    all_vit = _vit_keys()
    body = [k for k in all_vit if k not in HEAD]
    return {
        "Local": [],
        "SingleSet-VPT": [],
        "FedAvg": all_vit,
        "FedAvg-FT": all_vit,
        "FedRep": body,
        "FedVPT": ["prompts"],
        "FedVPT-deep": ["prompts"],
        "pFedPG": ["prompts"],
        "FedPerfix": ["model." + k for k in body],
        "FedPGP": ["prompts.global_prompt"],
        "VanillaAttention": [k for k in body if ".attn." not in k],
    }


def test_every_method_is_known():
    assert set(protocols.METHODS) == set(_expected_uploads())


@pytest.mark.parametrize("method", sorted(_expected_uploads()))
def test_upload_keys_are_the_hand_list(method):
    model = model_for(method)
    assert protocols.upload_keys(model, method) == _expected_uploads()[method]
    assert protocols.get(method.upper()).upload_keys(model) == _expected_uploads()[method]  # case-insensitive


@pytest.mark.parametrize("method", sorted(_expected_uploads()))
def test_personal_and_upload_partition_the_trainable_keys(method):
    model = model_for(method)
    p = protocols.get(method)
    personal, upload = set(p.personal_keys(model)), set(p.upload_keys(model))
    trainable = {n for n, t in model.named_parameters() if t.requires_grad}
    assert not personal & upload
    assert personal | upload == trainable
    assert set(p.download_keys(model)) == upload


def test_upload_counts_match_hand_counts():
    counts = {m: fed.num_params(protocols.upload_state(model_for(m), m)) for m in protocols.METHODS}
    total = sum(p.numel() for p in vit().parameters())
    head = D * NUM_CLASSES + NUM_CLASSES
    attn_per_block = (D * 3 * D + 3 * D) + (D * D + D)  # qkv + proj, weights and biases
    assert counts["Local"] == counts["SingleSet-VPT"] == 0
    assert counts["FedVPT"] == counts["pFedPG"] == counts["FedPGP"] == K * D
    assert counts["FedVPT-deep"] == DEPTH * K * D
    assert counts["FedAvg"] == counts["FedAvg-FT"] == total
    assert counts["FedRep"] == counts["FedPerfix"] == total - head
    assert counts["VanillaAttention"] == total - head - DEPTH * attn_per_block


def test_pfedpg_uploads_its_prompts_as_the_preset_says():
    """The preset "pfedpg" is pFedPG's key split: the head is personal, the prompts are uploaded."""
    model = model_for("pFedPG")
    shared, personal = fed.split(fed.trainable_state(model), fed.personal_keys(model, "pfedpg"))
    assert list(shared) == ["prompts"] and list(personal) == ["model.head.bias", "model.head.weight"]
    up = protocols.upload_state(model, "pFedPG")
    assert list(up) == ["prompts"] and torch.equal(up["prompts"], model.prompts.detach())
    assert up["prompts"].data_ptr() != model.prompts.data_ptr()  # a copy


def test_shared_personal_takes_any_pattern_for_a_users_model():
    model = vit()
    p = protocols.SharedPersonal(["head", "*blocks.1.*"])
    assert p.personal_keys(model) == sorted(HEAD + [k for k in _vit_keys() if k.startswith("blocks.1.")])
    assert "blocks.1.mlp.fc1.weight" not in p.upload_keys(model) and "blocks.0.mlp.fc1.weight" in p.upload_keys(model)


def test_frozen_parameters_are_neither_personal_nor_uploaded():
    model = model_for("FedVPT")
    p = protocols.SharedPersonal(["*"])  # every key matches, but only trainable ones count
    assert p.personal_keys(model) == ["model.head.bias", "model.head.weight", "prompts"]


def test_unknown_method_and_bad_options():
    with pytest.raises(ValueError, match="unknown method 'FedFoo'"):
        protocols.get("FedFoo")
    with pytest.raises(TypeError):
        protocols.get("FedAvg", nonsense=1)
    with pytest.raises(TypeError, match="already a Protocol"):
        protocols.get(protocols.get("FedAvg"), name="x")
    with pytest.raises(TypeError, match="VPT"):
        protocols.upload_keys(vit(), "pFedPG")


@pytest.mark.parametrize("method", sorted(_expected_uploads()))
def test_a_real_round_uploads_exactly_the_upload_keys(method):
    model = model_for(method)
    p = protocols.get(method)
    server = p.make_server(model, num_clients=2)
    result = p.client_update(model, shared=server.payloads([1])[1], personal=None, data=client_data(2, n=6)[1],
                             round=0, client_id=1, trainer=protocols.LocalTrainer(batch_size=6))
    assert sorted(result.upload) == _expected_uploads()[method]
    assert not set(result.upload) & set(result.personal)
    assert sorted(result.personal) == p.personal_keys(model)
    assert server.update([result.reply(1)]).accepted == [1]
