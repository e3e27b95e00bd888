"""bf16 client models and deep prompts through the protocols: state keeps the model's dtype, servers stay consistent."""

from __future__ import annotations

import torch
from protocol_models import K, client_data, model_for

from fedpeft import VPT, protocols
from fedpeft.protocols import LocalTrainer

TRAINER = LocalTrainer(batch_size=6, lr=1e-2)


def _bf16_data():
    return [torch.utils.data.TensorDataset(d.tensors[0].bfloat16(), d.tensors[1]) for d in client_data(2)]


def test_bf16_fedvpt_round_keeps_bf16_and_averages_in_float32():
    model = model_for("FedVPT").bfloat16()
    p = protocols.get("FedVPT")
    server = p.make_server(model, num_clients=2)
    data, initial = _bf16_data(), p.initial_personal(model)
    results = [p.client_update(model, shared=server.payloads([n])[n], personal=initial, data=data[n], round=0,
                               client_id=n, trainer=TRAINER) for n in range(2)]
    assert all(t.dtype == torch.bfloat16 for r in results for t in [*r.upload.values(), *r.personal.values()])
    report = server.update([r.reply(n) for n, r in enumerate(results)])
    assert report.accepted == [0, 1]
    ups = [r.upload["prompts"].float() for r in results]
    expected = (ups[0] * results[0].num_examples + ups[1] * results[1].num_examples) / (
        results[0].num_examples + results[1].num_examples)
    assert server.shared["prompts"].dtype == torch.bfloat16
    assert torch.equal(server.shared["prompts"], expected.bfloat16())  # one rounding from the float32 mean
    server.payloads([0])  # round 1 in flight: an update with no round in flight refuses every reply
    wrong = server.update([(0, {"prompts": results[0].upload["prompts"].float()}, 1)])
    assert wrong.accepted == [] and "expected dtype torch.bfloat16" in wrong.rejected[0].reason


def test_bf16_pfedpg_keeps_a_float32_generator():
    model = model_for("pFedPG").bfloat16()
    p = protocols.get("pFedPG", server_optimizer="SGD", server_lr=0.05)
    server = p.make_server(model, num_clients=2, seed=0)
    assert server.generator.prompt_base.dtype == torch.float32
    payloads = server.payloads([0, 1])
    assert payloads[0]["prompts"].dtype == torch.bfloat16
    data, initial = _bf16_data(), p.initial_personal(model)
    replies = [p.client_update(model, shared=payloads[n], personal=initial, data=data[n], round=0, client_id=n,
                               trainer=TRAINER).reply(n) for n in range(2)]
    report = server.update(replies)
    assert report.accepted == [0, 1] and report.updated
    assert all(a < b for a, b in zip(report.diagnostics["dist_after"], report.diagnostics["dist_before"]))


def test_pfedpg_with_deep_prompts_generates_every_layer():
    torch.manual_seed(0)
    model = VPT(model_for("FedAvg"), num_prompts=K, deep=True)
    server = protocols.get("pFedPG").make_server(model, num_clients=3, seed=1)
    assert server.generator.depth == 2
    assert server.payloads([2])[2]["prompts"].shape == model.prompts.shape == (2, K, 64)
