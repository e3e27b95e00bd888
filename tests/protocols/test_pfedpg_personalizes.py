"""pFedPG's default server personalizes while every step descends (issue 17), and its step equals a hand-written
optimizer on the generator's parameters.

The federation: 6 clients drawn from two distinct target prompt sets (clients 0-2 near A, 3-5 near B, each with its
own offset). A client answers like the paper's gradient-like SGD client: P̃ₙ = Pₙ + ½(Tₙ − Pₙ). Under fedpeft ≤ 0.1's
server (``recipe="paper"``: VPT-like init, one SGD α = 1e-3) the spread of gen(ids) stays at ~0.02 % and the first
test fails; it must pass with the default server.
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

C, K, ROUNDS = 6, 10, 30


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
    """Run the federation; per round the diagnostics, and the last round's trained prompts."""
    model = _model()
    server = protocol.make_server(model, num_clients=C, seed=seed)
    key = server.key
    T = _targets(model.embed_dim, seed)
    diags, trained = [], None
    for _ in range(rounds):
        sent = server.payloads(range(C))
        trained = {n: sent[n][key] + 0.5 * (T[n] - sent[n][key]) for n in range(C)}
        diags.append(server.update([(n, {key: trained[n]}, 1) for n in range(C)]).diagnostics)
    return server, diags, trained


@pytest.mark.parametrize("seed", [0, 1])
def test_default_server_personalizes_and_descends(seed):
    server, diags, trained = _federate(protocols.get("pFedPG"), seed=seed)
    descending = sum(a < b for d in diags for a, b in zip(d["dist_after"], d["dist_before"]))
    assert descending >= 0.9 * C * ROUNDS
    spread = [d["spread"] for d in diags]
    # growing: at round 12 (a benchmark run's length) above round 1 and 6, and still growing after it
    assert spread[11] > 0.01 and spread[11] > spread[5] > spread[0] and spread[-1] > spread[11]
    norm1, norm_end = (sum(diags[r]["trained_norm"]) / C for r in (0, -1))
    assert 0.5 * norm1 < norm_end < 2 * norm1
    with torch.no_grad():
        gen = server.generator(torch.arange(C)).flatten(1)
    P = torch.stack([trained[n] for n in range(C)]).flatten(1)
    for n in range(C):  # gen(n) nearer its own P̃ₙ than any other client's
        dist = (gen[n] - P).norm(dim=1)
        assert dist[n] < min(dist[m] for m in range(C) if m != n)


def test_paper_recipe_stays_client_agnostic():
    """The control: Eq. 5 literally (one SGD α = 1e-3) on the VPT-like init does not personalize here."""
    _, diags, _ = _federate(protocols.get("pFedPG", recipe="paper"))
    assert all(d["spread"] < 1e-3 for d in diags)


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


def test_default_step_is_adam_with_group_rates_by_hand():
    server = protocols.get("pFedPG").make_server(_model(), num_clients=C, seed=3)
    ref = copy.deepcopy(server.generator)
    m = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    lr = {"prompt_base": 1e-3, "descriptors": 1e-2, "projections": 1e-3}
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, ids in enumerate([[0, 2, 5], [1, 2, 3, 4]], start=1):
        trained = _round(server, ids, seed=t)
        grads = _grads(ref, ids, trained)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                m[name] = b1 * m[name] + (1 - b1) * grads[name]
                v[name] = b2 * v[name] + (1 - b2) * grads[name] ** 2
                p -= lr[_group_of(name)] * (m[name] / (1 - b1 ** t)) / ((v[name] / (1 - b2 ** t)).sqrt() + eps)
        server.update([(c, {server.key: trained[i]}, 1) for i, c in enumerate(ids)])
        for (name, p), q in zip(server.generator.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-6), name


def test_per_group_sgd_rates_by_hand():
    rates = {"prompt_base": 0.3, "descriptors": 2.0, "projections": 0.05}
    server = protocols.get("pFedPG", server_optimizer="SGD", server_lr=rates).make_server(
        _model(), num_clients=C, seed=4)
    ref = copy.deepcopy(server.generator)
    ids = [0, 1, 4]
    trained = _round(server, ids, seed=9)
    grads = _grads(ref, ids, trained)
    server.update([(c, {server.key: trained[i]}, 1) for i, c in enumerate(ids)])
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p -= rates[_group_of(name)] * grads[name]
    for (name, p), q in zip(server.generator.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_normalize_delta_by_hand():
    server = protocols.get("pFedPG", server_optimizer="SGD", server_lr=0.1, normalize_delta=True).make_server(
        _model(), num_clients=C, seed=5)
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
    loss = sum(mean / norms[i] * ((ref(torch.tensor([c]))[0] - trained[i]).detach() * ref(torch.tensor([c]))[0]).sum()
               for i, c in enumerate(ids))  # gradient (mean/‖ΔPₙ‖)·(Pₙ − P̃ₙ) through gen(n)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p -= 0.1 * g
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
    assert server.generator.init == "vpt"


def test_warns_when_most_steps_ascend():
    ascend = protocols.get("pFedPG", server_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5, maximize=True))
    with pytest.warns(RuntimeWarning, match="dist_after > dist_before"):
        _federate(ascend, rounds=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _federate(protocols.get("pFedPG"), rounds=4)
