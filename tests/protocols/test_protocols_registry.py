"""The registry: one entry per method, and everything that lists methods reads from it.

Oracles: ``fed.personal_keys`` with the entry's preset against the protocol's own key split, the server's class, the
model's parameters counted by hand, and the model each entry builds compared with the wrapper written out.
"""

from __future__ import annotations

import pytest
import torch
from protocol_models import K, vit

from fedpeft import VPT, LowRankPrompt, ParallelPrefix, fed, protocols
from fedpeft.protocols import REGISTRY, AveragingServer, FedAvgFT, PFedPGServer


def _build(name):
    return protocols.method(name).build(vit(0), num_prompts=K, bottleneck=8, prefix_scale=1.5, rank=2)


def test_the_registry_is_the_list_of_methods():
    assert protocols.METHODS == tuple(REGISTRY) == (
        "Local", "SingleSet-VPT", "FedAvg", "FedAvg-FT", "FedRep", "FedVPT", "FedVPT-deep", "pFedPG", "FedPerfix",
        "FedPGP", "VanillaAttention")
    for name, entry in REGISTRY.items():
        assert entry.name == name and protocols.get(name).name == name
        assert protocols.method(name.lower()) is entry
    with pytest.raises(ValueError, match="unknown method 'FedNope'; known: Local, "):
        protocols.method("FedNope")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_entry_key_split_is_its_protocols_split(name):
    """``fed.PRESETS`` and the protocols agree: the preset in the entry selects exactly the protocol's personal keys."""
    entry, model = REGISTRY[name], _build(name)
    trainable = {k: p for k, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert fed.personal_keys(trainable, list(entry.key_split)) == entry.protocol().personal_keys(model)
    server = entry.protocol().make_server(model, num_clients=2, seed=0)
    assert isinstance(server, PFedPGServer if entry.server == "generator" else AveragingServer)


def test_entries_build_the_documented_models():
    """The wrappers written out by hand, under the same seeds, hold the same values."""
    torch.manual_seed(1)
    want = {
        "Local": VPT(vit(0), num_prompts=0), "FedVPT": VPT(vit(0), num_prompts=K),
        "FedVPT-deep": VPT(vit(0), num_prompts=K, deep=True),
        "FedPerfix": ParallelPrefix(vit(0), bottleneck=8, scale=1.5, train_backbone=True),
        "FedPGP": VPT(vit(0), num_prompts=K, prompts=LowRankPrompt(num_prompts=K, embed_dim=64, rank=2)),
    }
    for name, ref in want.items():
        got = _build(name)
        assert type(got) is type(ref)
        assert got.state_dict().keys() == ref.state_dict().keys(), name
        assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert type(_build("FedAvg")) is type(vit(0))
    assert _build("FedVPT-deep").prompts.shape[0] == 2  # one prompt set per block


def test_costs_and_deploy_phases_come_from_the_entry():
    model = _build("pFedPG")
    server = REGISTRY["pFedPG"].protocol().make_server(model, num_clients=3, seed=0)
    costs = REGISTRY["pFedPG"].costs(model, server)
    head = sum(p.numel() for n, p in model.named_parameters() if "head" in n)
    assert costs["trainable"] == K * 64 + head and costs["communicated"] == K * 64
    assert costs["server"] == sum(p.numel() for p in server.generator.parameters()) > 0
    avg = _build("FedVPT")
    assert REGISTRY["FedVPT"].costs(avg, REGISTRY["FedVPT"].protocol().make_server(avg))["server"] == 0
    for name, entry in REGISTRY.items():
        model = _build(name)
        phases = entry.protocol().deploy_phases(model)
        if name == "FedAvg-FT":  # the one method whose deployed model needs local work: a fine-tuning phase
            assert isinstance(entry.protocol(), FedAvgFT)
            assert phases == [("finetune", tuple(fed.trainable_keys(model)), None)]
        else:
            assert phases == []
