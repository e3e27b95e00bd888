"""pFedPG's server: own prompts per client, a step that descends on the accepted replies only, diagnostics."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from protocol_models import K, model_for

from fedpeft import PromptGenerator, protocols

C, LR = 5, 0.5


def _server(optimizer="SGD", lr=LR, seed=0, steps=1):
    model = model_for("pFedPG")
    return protocols.get("pFedPG", server_optimizer=optimizer, server_lr=lr, server_steps=steps).make_server(
        model, num_clients=C, seed=seed)


def _trained(server, ids, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gen = server.generator(torch.tensor(ids))
    return {c: gen[i] + scale * torch.randn(gen[i].shape, generator=g) for i, c in enumerate(ids)}


def test_each_client_gets_its_own_generated_prompts():
    server = _server()
    payloads = server.payloads([0, 2, 4])
    assert set(payloads) == {0, 2, 4}
    for c, state in payloads.items():
        assert list(state) == ["prompts"] and state["prompts"].shape == (1, K, 64)
        with torch.no_grad():
            own = server.generator(torch.tensor([c]))[0]  # one client alone: the independent reference
        assert torch.allclose(state["prompts"], own, atol=1e-6)
    assert not torch.allclose(payloads[0]["prompts"], payloads[2]["prompts"])


def test_seeded_generator_is_reproducible_and_leaves_the_global_rng_alone():
    a, b = _server(seed=7), _server(seed=7)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.generator.parameters(), b.generator.parameters()))
    model = model_for("pFedPG")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    protocols.get("pFedPG").make_server(model, num_clients=C, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)


def _hand_step(gen: PromptGenerator, trained: dict, lr: float, steps: int = 1) -> PromptGenerator:
    """½ Σ_n ‖gen(n) − P̃_n‖² over the given clients, ``steps`` plain gradient-descent steps (one: the paper's Eq. 5,
    descending)."""
    gen = copy.deepcopy(gen)
    ids = sorted(trained)
    for _ in range(steps):
        loss = 0.5 * sum((gen(torch.tensor([c]))[0] - trained[c]).pow(2).sum() for c in ids)
        grads = torch.autograd.grad(loss, list(gen.parameters()))
        with torch.no_grad():
            for p, g in zip(gen.parameters(), grads):
                p -= lr * g
    return gen


@pytest.mark.parametrize("steps", [1, 4])
def test_the_fit_is_plain_descent_on_the_accepted_replies(steps):
    server = _server(lr=0.1, steps=steps)
    ids = [0, 1, 3]
    server.payloads(ids)
    trained = _trained(server, ids)
    bad = {**trained, 1: torch.full_like(trained[1], float("nan"))}  # client 1's reply is refused
    ref = _hand_step(server.generator, {c: trained[c] for c in (0, 3)}, 0.1, steps)
    report = server.update([(c, {"prompts": bad[c]}, 10) for c in reversed(ids)])
    assert report.accepted == [0, 3] and [r.client_id for r in report.rejected] == [1]
    assert report.diagnostics["steps"] == steps and server.steps_taken == steps
    for p, q in zip(server.generator.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_every_accepted_prompt_moves_toward_its_trained_one_and_absent_rows_stay():
    server = _server(lr=0.05)
    ids = [1, 2, 4]
    server.payloads(ids)
    trained = _trained(server, ids)
    with torch.no_grad():
        before = {c: (server.generator(torch.tensor([c]))[0] - trained[c]).norm().item() for c in ids}
    descriptors = server.generator.descriptors.detach().clone()
    report = server.update([(c, {"prompts": trained[c]}, 1) for c in ids])
    with torch.no_grad():
        after = {c: (server.generator(torch.tensor([c]))[0] - trained[c]).norm().item() for c in ids}
    assert all(after[c] < before[c] for c in ids)
    for c in (0, 3):  # absent: no gradient, plain SGD leaves the row as it was
        assert torch.equal(server.generator.descriptors[c], descriptors[c])
    for c in ids:
        assert not torch.equal(server.generator.descriptors[c], descriptors[c])
    d = report.diagnostics
    assert d["clients"] == ids
    assert d["dist_before"] == pytest.approx([before[c] for c in ids], rel=1e-5)
    assert d["dist_after"] == pytest.approx([after[c] for c in ids], rel=1e-5)
    assert d["trained_norm"] == pytest.approx([trained[c].norm().item() for c in ids], rel=1e-6)
    with torch.no_grad():
        everyone = torch.stack([server.generator(torch.tensor([c]))[0] for c in range(C)])
    mean = everyone.mean(0)
    spread = sum((everyone[c] - mean).norm() for c in range(C)) / C / mean.norm()
    assert d["spread"] == pytest.approx(float(spread), rel=1e-4)


def test_bad_replies_leave_the_generator_untouched():
    server = _server()
    server.payloads([0, 1])
    params = [p.detach().clone() for p in server.generator.parameters()]
    shape = (1, K, 64)
    report = server.update([
        (0, {"prompts": torch.full(shape, float("inf"))}, 1),
        (1, {"prompts": torch.zeros(1, K + 1, 64)}, 1),
        (2, {"prompts": torch.zeros(shape)}, 1),  # was not sent anything this round
    ])
    assert report.accepted == [] and not report.updated and len(report.rejected) == 3
    assert "not sent anything" in report.rejected[2].reason
    assert all(torch.equal(p, q) for p, q in zip(server.generator.parameters(), params))


def test_update_without_payloads_refuses_everything():
    server = _server()
    report = server.update([(0, {"prompts": torch.zeros(1, K, 64)}, 1)])
    assert report.accepted == [] and "not sent anything" in report.rejected[0].reason


def test_deployment_has_no_side_effect_and_equals_the_generator():
    server = _server()
    server.payloads([0, 1])
    dep = server.deployment(range(C))
    with torch.no_grad():
        for c in range(C):
            assert torch.allclose(dep[c]["prompts"], server.generator(torch.tensor([c]))[0], atol=1e-6)
    trained = _trained(server, [0, 1])
    assert server.update([(c, {"prompts": trained[c]}, 1) for c in (0, 1)]).accepted == [0, 1]  # still pending


def test_bad_server_options():
    with pytest.raises(ValueError, match="server_optimizer"):
        protocols.get("pFedPG", server_optimizer="RMSprop")
    with pytest.raises(ValueError, match="num_clients"):
        protocols.get("pFedPG").make_server(model_for("pFedPG"))
    custom = protocols.get("pFedPG", server_optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    assert custom.make_server(model_for("pFedPG"), num_clients=2).optimizer.defaults["momentum"] == 0.9


def _play(server, rounds, seed0):
    """Rounds of a federation with random participants and replies; the per-round diagnostics."""
    out = []
    for r in range(rounds):
        g = torch.Generator().manual_seed(seed0 + r)
        ids = sorted(torch.randperm(C, generator=g)[:3].tolist())
        server.payloads(ids)
        trained = _trained(server, ids, scale=0.3, seed=seed0 + r)
        out.append(server.update([(c, {"prompts": trained[c]}, 1) for c in ids]).diagnostics)
    return out


def test_resume_from_state_dict_is_bit_identical():
    """The default server (Adam, S steps, moments and step counts) checkpointed after round 2 and loaded into a server
    built from another seed continues exactly as the uninterrupted one: same generator bits, same diagnostics."""
    make = protocols.get("pFedPG")
    a = make.make_server(model_for("pFedPG"), num_clients=C, seed=0)
    _play(a, 2, seed0=10)
    tensors, meta = a.state_dict()
    assert meta["steps_taken"] == 2 * a.server_steps and any(k.startswith("initial.") for k in tensors)
    b = make.make_server(model_for("pFedPG"), num_clients=C, seed=99)
    b.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert b.steps_taken == a.steps_taken and b.round == 2
    da, db = _play(a, 2, seed0=12), _play(b, 2, seed0=12)
    assert da == db
    for (name, p), q in zip(a.generator.state_dict().items(), b.generator.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.optimizer.state_dict()["state"][0]["step"] == b.optimizer.state_dict()["state"][0]["step"] == 4 * a.server_steps


def test_checkpoint_without_initial_generator_takes_the_loaded_one_as_gen0():
    """A fedpeft 0.2 checkpoint (no ``initial.*`` tensors): drift counts from the loaded generator."""
    a = _server(steps=2)
    _play(a, 1, seed0=0)
    tensors, meta = a.state_dict()
    old = {k: v for k, v in tensors.items() if not k.startswith("initial.")}
    b = _server(seed=5, steps=2)
    b.load_state_dict(old, meta)
    for p, q in zip(b.initial.parameters(), a.generator.parameters()):
        assert torch.equal(p, q)


def test_round_log_and_tensorboard_carry_retention(tmp_path, monkeypatch):
    from fedpeft.protocols import RoundLog, RoundRecord
    from fedpeft.protocols import roundlog as roundlog_module

    got = {}

    class Writer:
        def __init__(self, logdir):
            pass

        def add_scalar(self, tag, value, step):
            got[tag] = value

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(roundlog_module, "_summary_writer", lambda logdir: Writer(logdir))
    server = _server(lr=0.1, steps=3)
    server.payloads([0, 2])
    trained = _trained(server, [0, 2], scale=0.3)
    report = server.update([(c, {"prompts": trained[c]}, 1) for c in (0, 2)])
    d = report.diagnostics
    kept = [1 - a / b for a, b in zip(d["dist_after"], d["dist_before"])]
    assert d["retention"] == pytest.approx(sum(kept) / 2) and 0 < d["retention"] < 1
    log = RoundLog(tmp_path / "r.jsonl")
    line = log.append(RoundRecord(round=0, participants=[0, 2], server=report))
    log.close()
    assert RoundLog.read(tmp_path / "r.jsonl") == [json.loads(json.dumps(line))]
    assert line["diagnostics"]["retention"] == d["retention"] and line["diagnostics"]["steps"] == 3
    for name in ("retention", "residual", "drift", "steps", "spread"):
        assert got[f"server/{name}"] == pytest.approx(d[name])
    assert not any(k.startswith("server/dist") for k in got)  # per-client lists stay in the JSON lines
