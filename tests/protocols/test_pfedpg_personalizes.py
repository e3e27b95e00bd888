"""pFedPG's default server keeps what its clients learn and personalizes (issues 17, 24), and its fit equals
hand-written optimizer steps on the generator's parameters.

The federation: 6 clients drawn from two distinct target prompt sets (clients 0-2 near A, 3-5 near B, each with its
own offset), 12 rounds (a benchmark run's length). A client answers like the paper's gradient-like SGD client:
P̃ₙ = Pₙ + ½(Tₙ − Pₙ). Under fedpeft ≤ 0.1's server (``recipe="paper"``: VPT-like init, one SGD step α = 1e-3) the
generated prompts stay client-agnostic (spread ~0.02 %), half the clients end nearer the other group's optimum, and
the server keeps < 1 % of each round: the first test fails with it; it must pass with the default server.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import timm
import torch

from fedpeft import VPT, PromptGenerator, protocols
from fedpeft.protocols.pfedpg import PARAM_GROUPS, PFedPG

C, K, ROUNDS = 6, 10, 12


def _model():
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32, patch_size=8)
    return VPT(vit, num_prompts=K)


def _targets(D, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = math.sqrt(6 / (3 * 64 + D))  # VPT's bound for patch 8: the prompts' scale

    def u(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1) * v

    sets = u(2, 1, K, D)
    return sets[torch.tensor([0, 0, 0, 1, 1, 1])] + 0.3 * u(C, 1, K, D)


def _federate(protocol, rounds=ROUNDS, seed=0):
    """Run the federation; per round the diagnostics, the targets and the last round's trained prompts."""
    model = _model()
    server = protocol.make_server(model, num_clients=C, seed=seed)
    key = server.key
    T = _targets(model.embed_dim, seed)
    diags, trained = [], None
    for _ in range(rounds):
        sent = server.payloads(range(C))
        trained = {n: sent[n][key] + 0.5 * (T[n] - sent[n][key]) for n in range(C)}
        diags.append(server.update([(n, {key: trained[n]}, 1) for n in range(C)]).diagnostics)
    return server, diags, T, trained


def _nearer_own_group(server, T):
    """Clients whose gen(n) is nearer its own group's optimum (the mean of the group's Tₙ) than the other group's."""
    with torch.no_grad():
        gen = server.generator(torch.arange(C)).flatten(1)
    optimum = torch.stack([T[:3].mean(0), T[3:].mean(0)]).flatten(1)
    dist = torch.cdist(gen, optimum)  # (C, 2)
    return [n for n in range(C) if dist[n, n // 3] < dist[n, 1 - n // 3]]


def _retention_by_hand(d):
    return sum(1 - a / b for a, b in zip(d["dist_after"], d["dist_before"])) / len(d["dist_before"])


@pytest.mark.parametrize("seed", [0, 1])
def test_default_server_keeps_what_clients_learn_and_personalizes(seed):
    server, diags, T, trained = _federate(protocols.get("pFedPG"), seed=seed)
    assert _nearer_own_group(server, T) == list(range(C))  # 6/6
    retention = [_retention_by_hand(d) for d in diags]
    assert sum(retention) / ROUNDS >= 0.3
    descending = sum(a < b for d in diags for a, b in zip(d["dist_after"], d["dist_before"]))
    assert descending >= 0.9 * C * ROUNDS
    spread = [d["spread"] for d in diags]
    assert spread[-1] > 0.01 and spread[-1] > spread[5] > spread[0]  # > 1 % and growing (rounds 1, 6, 12)
    norm1, norm_end = (sum(diags[r]["trained_norm"]) / C for r in (0, -1))
    assert 0.5 * norm1 < norm_end < 2 * norm1
    with torch.no_grad():
        gen = server.generator(torch.arange(C)).flatten(1)
    P = torch.stack([trained[n] for n in range(C)]).flatten(1)
    for n in range(C):  # gen(n) nearer its own P̃ₙ than any other client's
        dist = (gen[n] - P).norm(dim=1)
        assert dist[n] < min(dist[m] for m in range(C) if m != n)


@pytest.mark.filterwarnings("ignore:pFedPG server. retention under")
def test_paper_recipe_keeps_nothing_and_stays_client_agnostic():
    """The control: Eq. 5 literally (one SGD step α = 1e-3) on the VPT-like init fails every criterion above but
    descent."""
    server, diags, T, _ = _federate(protocols.get("pFedPG", recipe="paper"))
    assert all(d["spread"] < 1e-3 for d in diags)
    assert sum(_retention_by_hand(d) for d in diags) / ROUNDS < 0.01
    assert len(_nearer_own_group(server, T)) < C


def test_retention_residual_and_drift_by_hand():
    protocol = protocols.get("pFedPG", server_steps=3)
    model = _model()
    server = protocol.make_server(model, num_clients=C, seed=2)
    gen0 = copy.deepcopy(server.generator)  # gen_0: the generator as built
    T = _targets(model.embed_dim, 2)
    for _ in range(2):
        ids = [0, 2, 3]
        sent = server.payloads(ids)
        trained = {n: sent[n][server.key] + 0.5 * (T[n] - sent[n][server.key]) for n in ids}
        d = server.update([(n, {server.key: trained[n]}, 1) for n in ids]).diagnostics
        with torch.no_grad():
            after = {n: server.generator(torch.tensor([n]))[0] for n in ids}
            first = {n: gen0(torch.tensor([n]))[0] for n in ids}
        kept = [1 - float((after[n] - trained[n]).norm() / (sent[n][server.key] - trained[n]).norm()) for n in ids]
        assert d["retention"] == pytest.approx(sum(kept) / 3, rel=1e-5)
        res = [float((after[n] - trained[n]).norm() / trained[n].norm()) for n in ids]
        assert d["residual"] == pytest.approx(sum(res) / 3, rel=1e-5)
        drift = [float((after[n] - first[n]).norm()) for n in ids]
        assert d["drift"] == pytest.approx(sum(drift) / 3, rel=1e-5)
        assert d["steps"] == 3


# ---- the step against hand-written optimizers ----------------------------------------------------------------------

def _grads(gen: PromptGenerator, ids, trained):
    """∇ ½ Σ_n ‖gen(n) − P̃_n‖², one client at a time (independent of the batched call and of fed.delta_backward)."""
    loss = 0.5 * sum((gen(torch.tensor([c]))[0] - trained[i]).pow(2).sum() for i, c in enumerate(ids))
    return dict(zip([n for n, _ in gen.named_parameters()], torch.autograd.grad(loss, list(gen.parameters()))))


def _group_of(name):
    return {"prompt_base": "prompt_base", "descriptors": "descriptors"}.get(name, "projections")


def _round(server, ids, seed):
    server.payloads(ids)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        P = server.generator(torch.tensor(ids))
    trained = P + 0.05 * torch.randn(P.shape, generator=g)
    return trained


def _by_hand(server, rounds, step):
    """Replay ``rounds`` ([ids, ...]) on ``server`` and on a copy of its generator fitted by ``step(ref, ids,
    trained, t)`` (t: the round, 1-based); the parameters must agree after every round."""
    ref = copy.deepcopy(server.generator)
    for t, ids in enumerate(rounds, start=1):
        trained = _round(server, ids, seed=t)
        step(ref, ids, trained, t)
        server.update([(c, {server.key: trained[i]}, 1) for i, c in enumerate(ids)])
        for (name, p), q in zip(server.generator.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-5), (t, name)


def test_default_fit_is_adam_steps_with_group_rates_by_hand():
    """The default: S Adam steps per round on ½ Σₙ ‖gen(n) − P̃ₙ‖², every step on a fresh gen(n), the moments and
    the step count carried from round to round."""
    from fedpeft.protocols.pfedpg import DEFAULT_SERVER_STEPS as S
    server = protocols.get("pFedPG").make_server(_model(), num_clients=C, seed=3)
    assert server.generator.heads == math.gcd(_model().embed_dim, 16) and server.server_steps == S > 1
    state = {"m": {}, "v": {}, "t": 0}
    lr = {"prompt_base": 1e-3, "descriptors": 1e-2, "projections": 1e-3}
    b1, b2, eps = 0.9, 0.999, 1e-8

    def adam(ref, ids, trained, _):
        for _ in range(S):
            grads = _grads(ref, ids, trained)
            state["t"] += 1
            t = state["t"]
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    m = state["m"][name] = b1 * state["m"].get(name, 0) + (1 - b1) * grads[name]
                    v = state["v"][name] = b2 * state["v"].get(name, 0) + (1 - b2) * grads[name] ** 2
                    p -= lr[_group_of(name)] * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)

    _by_hand(server, [[0, 2, 5], [1, 2, 3, 4]], adam)
    assert server.steps_taken == 2 * S


def test_per_group_sgd_rates_and_steps_by_hand():
    rates = {"prompt_base": 0.3, "descriptors": 2.0, "projections": 0.05}
    server = protocols.get("pFedPG", server_optimizer="SGD", server_lr=rates, server_steps=4).make_server(
        _model(), num_clients=C, seed=4)

    def sgd(ref, ids, trained, _):
        for _ in range(4):
            grads = _grads(ref, ids, trained)
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    p -= rates[_group_of(name)] * grads[name]

    _by_hand(server, [[0, 1, 4], [5, 1]], sgd)


def test_one_step_is_eq5():
    """server_steps=1: one plain gradient step on the round's replies (the paper's Eq. 5 with the descent sign)."""
    server = protocols.get("pFedPG", server_optimizer="SGD", server_lr=0.5, server_steps=1).make_server(
        _model(), num_clients=C, seed=6)

    def eq5(ref, ids, trained, _):
        grads = _grads(ref, ids, trained)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p -= 0.5 * grads[name]

    _by_hand(server, [[3], [0, 1, 2, 3, 4, 5]], eq5)


def test_tolerance_stops_the_fit():
    """server_tol: the fit stops before the first step at which ‖gen − P̃‖_F ≤ tol·‖P̃‖_F (found by a hand loop)."""
    lr, ids = 0.1, [1, 3, 4]
    server = protocols.get("pFedPG", server_optimizer="SGD", server_lr=lr, server_steps=200,
                           server_tol=1.0).make_server(_model(), num_clients=C, seed=7)
    ref = copy.deepcopy(server.generator)
    trained = _round(server, ids, seed=7)
    states, residuals = [], []
    for _ in range(8):  # the hand fit: the generator and its relative residual before each step
        with torch.no_grad():
            residuals.append(float((ref(torch.tensor(ids)) - trained).norm() / trained.norm()))
        states.append(copy.deepcopy(ref.state_dict()))
        grads = _grads(ref, ids, trained)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p -= lr * grads[name]
    assert all(a > b for a, b in zip(residuals, residuals[1:]))
    server.server_tol = (residuals[4] + residuals[5]) / 2  # reached before step 6: 5 steps
    d = server.update([(c, {server.key: trained[i]}, 1) for i, c in enumerate(ids)]).diagnostics
    assert d["steps"] == 5
    for name, p in server.generator.state_dict().items():
        assert torch.allclose(p, states[5][name], atol=1e-5), name
    # already within the tolerance: no step, nothing moves, the round counts as not updated
    server.payloads(ids)
    with torch.no_grad():
        now = server.generator(torch.tensor(ids))
    before = [p.detach().clone() for p in server.generator.parameters()]
    report = server.update([(c, {server.key: now[i]}, 1) for i, c in enumerate(ids)])
    assert report.diagnostics["steps"] == 0 and not report.updated
    assert all(torch.equal(p, q) for p, q in zip(server.generator.parameters(), before))


def test_normalize_delta_by_hand():
    """normalize_delta: the fit's target is Pₙ − (Pₙ − P̃ₙ)·mean/‖Pₙ − P̃ₙ‖, fixed through the round's steps."""
    server = protocols.get("pFedPG", server_optimizer="SGD", server_lr=0.1, normalize_delta=True,
                           server_steps=3).make_server(_model(), num_clients=C, seed=5)
    ref = copy.deepcopy(server.generator)
    ids = [2, 3]
    server.payloads(ids)
    with torch.no_grad():
        P = ref(torch.tensor(ids))
    trained = P.clone()
    trained[0] += 0.01  # two very different update sizes
    trained[1] -= 0.5
    norms = [float((P[i] - trained[i]).norm()) for i in range(2)]
    mean = sum(norms) / 2
    target = torch.stack([P[i] - (P[i] - trained[i]) * mean / norms[i] for i in range(2)])
    for _ in range(3):
        grads = _grads(ref, ids, target)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p -= 0.1 * grads[name]
    server.update([(c, {server.key: trained[i]}, 1) for i, c in enumerate(ids)])
    for p, q in zip(server.generator.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


# ---- bad settings and the ascent warning ---------------------------------------------------------------------------

@pytest.mark.parametrize("lr,match", [
    (0.0, "server_lr"), (-1e-3, "server_lr"), (float("nan"), "server_lr"), (float("inf"), "server_lr"),
    ({"prompt_base": 1e-3, "descriptors": 1e-3, "projections": 0.0}, "server_lr\\['projections'\\]"),
    ({"prompt_base": 1e-3, "descriptors": 1e-3, "projections": 1e-3, "heads": 1e-3}, "unknown parameter group"),
    ({"prompt_base": 1e-3}, "missing"),
])
def test_bad_rates_are_refused(lr, match):
    with pytest.raises(ValueError, match=match):
        PFedPG(server_lr=lr)


@pytest.mark.parametrize("kw,match", [
    ({"server_steps": 0}, "server_steps"), ({"server_steps": 2.0}, "server_steps"), ({"server_steps": True},
                                                                                       "server_steps"),
    ({"server_tol": 0.0}, "server_tol"), ({"server_tol": float("nan")}, "server_tol"), ({"heads": 0}, "heads"),
])
def test_bad_fit_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        PFedPG(**kw)


def test_bad_recipe_and_init_are_refused():
    with pytest.raises(ValueError, match="recipe"):
        PFedPG(recipe="pfedhn")
    with pytest.raises(ValueError, match="generator_init"):
        PFedPG(generator_init="xavier")
    with pytest.raises(ValueError, match="init"):
        PromptGenerator(num_clients=2, num_prompts=2, embed_dim=8, init="zeros")
    assert PARAM_GROUPS == ("prompt_base", "descriptors", "projections")


def test_paper_recipe_is_one_sgd_rate_on_the_vpt_init():
    server = protocols.get("pFedPG", recipe="paper").make_server(_model(), num_clients=C, seed=0)
    opt = server.optimizer
    assert isinstance(opt, torch.optim.SGD) and {g["lr"] for g in opt.param_groups} == {1e-3}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(server.generator.parameters()))
    assert server.generator.init == "vpt" and server.generator.heads == 1 and server.server_steps == 1
    assert server.server_tol is None


def test_warns_when_most_steps_ascend():
    ascend = protocols.get("pFedPG", server_steps=1,
                           server_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5, maximize=True))
    with pytest.warns(RuntimeWarning, match="dist_after > dist_before"):
        _federate(ascend, rounds=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _federate(protocols.get("pFedPG"), rounds=4)


def test_warns_when_retention_stays_low():
    """Eq. 5's one small step keeps < 5 % of every round: the warning comes after the third such round, once."""
    with pytest.warns(RuntimeWarning, match="retention under 5% for 3 rounds.*raise server_steps") as got:
        server, diags, _, _ = _federate(protocols.get("pFedPG", recipe="paper"), rounds=5)
    assert all(d["retention"] < 0.05 for d in diags)
    assert len([w for w in got if "retention" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        server, *_ = _federate(protocols.get("pFedPG", recipe="paper"), rounds=2)  # 2 rounds: too early
    assert server.low_retention_rounds == 2
