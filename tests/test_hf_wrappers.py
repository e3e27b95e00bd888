"""transformers models through the rest of fedpeft: refusals, the frozen / trainable split, ``fed`` key words,
adapter files (safetensors, strict load) and a whole federated round of every protocol, each against the same thing
done on the timm twin (``hf_oracle.pair``) or against explicit expectations."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_oracle import COMMON, DIM, IMG, pair, transformers
from torch.utils.data import TensorDataset

from fedpeft import VPT, ParallelPrefix, Prefix, fed, load_adapter, protocols, save_adapter
from fedpeft._hf import SUPPORTED_CLASSES
from fedpeft.protocols import Federation, LocalTrainer

REFUSED = [
    ("ViTForMaskedImageModeling", lambda: transformers.ViTConfig(intermediate_size=2 * DIM, encoder_stride=4, **COMMON)),
    ("ViTMAEModel", lambda: transformers.ViTMAEConfig(intermediate_size=2 * DIM, **COMMON)),
    ("BeitModel", lambda: transformers.BeitConfig(intermediate_size=2 * DIM, **COMMON)),
    ("Dinov2Backbone", lambda: transformers.Dinov2Config(mlp_ratio=2, **COMMON)),
]


@pytest.mark.parametrize("name,config", REFUSED, ids=[r[0] for r in REFUSED])
@pytest.mark.parametrize("wrapper", [lambda m: VPT(m, num_prompts=2), ParallelPrefix, lambda m: Prefix(m, length=2)])
def test_unsupported_transformers_models_are_refused_by_name(name, config, wrapper):
    model = getattr(transformers, name)(config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(TypeError, match=name) as err:
        wrapper(model)
    for cls in SUPPORTED_CLASSES:
        assert cls in str(err.value)
    assert [p.requires_grad for p in model.parameters()] == flags  # untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_vpt_output_and_freezing_match_the_plain_model_and_timm():
    vit, hf = pair("vit", "ViTForImageClassification")
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    want = hf(pixel_values=x).logits
    model = VPT(hf, num_prompts=0)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # K = 0: exactly the plain model
    assert model.unwrap() is hf
    trainable = sorted(n for n, p in hf.named_parameters() if p.requires_grad)
    assert trainable == ["classifier.bias", "classifier.weight"]
    timm_model = VPT(vit, num_prompts=4, deep=True)
    hf_model = VPT(copy.deepcopy(hf), num_prompts=4, deep=True)
    assert hf_model.summary().trainable_params == timm_model.summary().trainable_params == 2 * 4 * DIM + DIM * 5 + 5
    model.train()
    assert not hf.training  # a frozen backbone stays in eval mode (no dropout in it)


def test_fed_words_name_the_transformers_parts():
    _, hf = pair("vit", "ViTForImageClassification")
    model = ParallelPrefix(hf, bottleneck=4, train_backbone=True)
    keys = fed.personal_keys(model, "fedperfix")
    assert keys == sorted([f"adapters.{i}.{m}.{w}" for i in (0, 1) for m in ("down", "up") for w in ("weight", "bias")]
                          + ["model.classifier.bias", "model.classifier.weight"])
    state = model.state_dict()
    for word, needle, count in [("attn", ".attention.", 2 * 8), ("norm", "layernorm", 2 * 4 + 2),
                                ("patch_embed", "patch_embeddings", 2), ("pos_embed", "position_embeddings", 1)]:
        got = fed.personal_keys(state, word)  # attn: q, k, v, out (weight, bias) per layer
        assert len(got) == count and all(needle in k for k in got), (word, got)
    mlp = fed.personal_keys(state, "mlp")  # fc1, fc2 (5.x) or intermediate.dense, output.dense (4.x), 2 layers
    assert len(mlp) == 8 and not any("attention" in k for k in mlp), mlp
    with pytest.warns(UserWarning, match="matches no key"):  # q_proj inside a layer is not a generator's
        assert fed.personal_keys(state, "generator") == []


def test_adapter_files_round_trip_strictly():
    _, hf = pair("deit", "DeiTForImageClassificationWithTeacher")
    model = ParallelPrefix(VPT(hf, num_prompts=3, deep=True), bottleneck=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    want = model(x)
    _, hf2 = pair("deit", "DeiTForImageClassificationWithTeacher")
    fresh = ParallelPrefix(VPT(hf2, num_prompts=3, deep=True), bottleneck=4)
    assert not torch.allclose(fresh(x), want)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)
        load_adapter(fresh, d)
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
        _, hf3 = pair("deit", "DeiTForImageClassificationWithTeacher")
        other = ParallelPrefix(VPT(hf3, num_prompts=2, deep=True), bottleneck=4)
        with pytest.raises(ValueError, match="num_prompts"):
            load_adapter(other, d)


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, 5, (n,), generator=g))


#: every registered method, those that train the bare backbone (FedAvg, FedRep, …) included
ALL_METHODS = sorted(protocols.REGISTRY)


def _client_model(method: str, backbone: torch.nn.Module) -> torch.nn.Module:
    return protocols.method(method).build(backbone, num_prompts=2, bottleneck=4, rank=2)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_federated_round_equals_the_timm_twins(method):
    """Each protocol, unchanged, on a transformers ViT gives the timm twin's round (same seeds, same weights)."""
    records = []
    for side in (0, 1):
        vit, hf = pair("vit", "ViTForImageClassification")
        backbone = (vit, hf)[side].float()
        torch.manual_seed(7)
        model = _client_model(method, backbone)
        federation = Federation(method, model, [_data(8, s) for s in (1, 2)],
                                test_data=[_data(4, s) for s in (3, 4)], trainer=LocalTrainer(epochs=1, batch_size=4),
                                seed=0)
        records.append(federation.run_round(0))
    timm_rec, hf_rec = records
    assert hf_rec.participants == timm_rec.participants == [0, 1]
    assert hf_rec.train_loss.keys() == timm_rec.train_loss.keys() == {0, 1}
    for c in (0, 1):
        assert hf_rec.train_loss[c] == pytest.approx(timm_rec.train_loss[c], rel=1e-4, abs=1e-5)
    assert hf_rec.deployed == timm_rec.deployed


@pytest.mark.parametrize("train_backbone", [True, False])
def test_transformers_gradient_checkpointing_gives_the_same_gradients(train_backbone):
    """``activation_checkpointing_enable()`` (4.x: ``gradient_checkpointing_enable()``): the layers checkpoint
    themselves (training mode only); the same gradients."""
    grads = []
    for checkpointed in (False, True):
        _, hf = pair("vit", "ViTForImageClassification")
        if checkpointed:  # transformers 5.x's name, 4.x's
            (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()
        torch.manual_seed(0)
        model = ParallelPrefix(VPT(hf, num_prompts=2, deep=True), bottleneck=4, train_backbone=train_backbone).train()
        model(torch.randn(2, 3, IMG, IMG, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
              ).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > (20 if train_backbone else 5)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-12, atol=1e-14)
