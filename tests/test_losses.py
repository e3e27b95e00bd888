"""knowledge_guided_loss (FedPGP) against hand-written formulas, and where its gradient goes.

Oracles: numpy cosines with explicit exp/log; FedPGP's own form (cross-entropy over the logits [pos, neg] / τ with
target 0); closed-form gradients of the cosine; autograd of hand-built pos/neg for the chain rule through σ, U, V.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpeft.losses import knowledge_guided_loss

TAUS = [0.05, 0.1, 0.5, 1.0, 2.0]


def _features(B=6, Fdim=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, Fdim, generator=g, dtype=dtype) for _ in range(3)]


def _np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.sqrt((a * a).sum(-1)) * np.sqrt((b * b).sum(-1)))


def _np_loss(f0, fg, fp, tau) -> float:
    pos, neg = _np_cos(f0, fg), _np_cos(fg, fp)
    return float(np.mean(-np.log(np.exp(pos / tau) / (np.exp(pos / tau) + np.exp(neg / tau)))))


# ---- value ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TAUS)
def test_value_matches_explicit_exp_log(tau):
    f0, fg, fp = _features()
    got = knowledge_guided_loss(f0, fg, fp, temperature=tau)
    assert got.dim() == 0 and got.dtype == torch.float64
    want = _np_loss(f0.numpy(), fg.numpy(), fp.numpy(), tau)
    assert math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("tau", TAUS)
def test_value_matches_fedpgp_cross_entropy_form(tau):
    f0, fg, fp = _features(B=5, Fdim=7, seed=3, dtype=torch.float32)
    pos = (f0 * fg).sum(-1) / (f0.norm(dim=-1) * fg.norm(dim=-1))
    neg = (fg * fp).sum(-1) / (fg.norm(dim=-1) * fp.norm(dim=-1))
    logits = torch.stack([pos, neg], dim=1) / tau  # FedPGP: cat((posi, nega)) / temp, target 0
    want = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(knowledge_guided_loss(f0, fg, fp, temperature=tau), want, atol=1e-6, rtol=1e-5)


def test_default_temperature_is_half():
    f0, fg, fp = _features(seed=4)
    assert float(knowledge_guided_loss(f0, fg, fp)) == float(
        knowledge_guided_loss(f0, fg, fp, temperature=0.5)
    )


def test_extremes_pos_one_neg_minus_one():
    # f_global = f_anchor (pos = 1), f_personal = −f_global (neg = −1): loss = log(1 + e^{−2/τ})
    a = torch.randn(4, 8, dtype=torch.float64)
    for tau in TAUS:
        got = float(knowledge_guided_loss(a, a.clone(), -a, temperature=tau))
        assert math.isclose(got, math.log1p(math.exp(-2 / tau)), rel_tol=1e-9, abs_tol=1e-15)
    # and the other way round: pos = −1, neg = 1 gives log(1 + e^{2/τ})
    got = float(knowledge_guided_loss(-a, a.clone(), a.clone(), temperature=0.5))
    assert math.isclose(got, math.log1p(math.exp(4.0)), rel_tol=1e-9)


def test_stable_at_tiny_temperature_in_float32():
    # naive exp(pos/τ) overflows float32 at τ = 1e-3 (e^{1000}); the result must stay finite and exact
    f0, fg, fp = _features(B=8, seed=5, dtype=torch.float32)
    tau = 1e-3
    got = knowledge_guided_loss(f0, fg, fp, temperature=tau)
    pos = _np_cos(f0.double().numpy(), fg.double().numpy())
    neg = _np_cos(fg.double().numpy(), fp.double().numpy())
    want = float(np.mean(np.logaddexp(0.0, (neg - pos) / tau)))  # log(1 + e^z) without overflow
    assert torch.isfinite(got)
    assert math.isclose(float(got), want, rel_tol=1e-3, abs_tol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    f0, fg, fp = _features(seed=6, dtype=torch.float32)
    got = knowledge_guided_loss(f0.to(dtype), fg.to(dtype), fp.to(dtype))
    assert got.dtype == torch.float32
    want = knowledge_guided_loss(f0.to(dtype).float(), fg.to(dtype).float(), fp.to(dtype).float())
    torch.testing.assert_close(got, want)


# ---- gradient ---------------------------------------------------------------------------------------------------


def _np_dcos_db(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """∂cos(a, b)/∂b = a / (|a||b|) − cos(a, b) · b / |b|², per row."""
    na, nb = np.linalg.norm(a, axis=-1, keepdims=True), np.linalg.norm(b, axis=-1, keepdims=True)
    return a / (na * nb) - _np_cos(a, b)[:, None] * b / nb**2


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_gradient_matches_closed_form_and_anchor_gets_none(tau):
    f0, fg, fp = (t.requires_grad_(True) for t in _features(seed=7))
    knowledge_guided_loss(f0, fg, fp, temperature=tau).backward()
    assert f0.grad is None  # the anchor is a constant
    a, g, p = (t.detach().numpy() for t in (f0, fg, fp))
    B = a.shape[0]
    s = 1.0 / (1.0 + np.exp(-(_np_cos(g, p) - _np_cos(a, g)) / tau))  # dL/dz, z = (neg − pos)/τ
    w = (s / (tau * B))[:, None]
    want_g = w * (_np_dcos_db(p, g) - _np_dcos_db(a, g))  # neg and pos both depend on f_global
    want_p = w * _np_dcos_db(g, p)  # f_personal only in neg
    np.testing.assert_allclose(fg.grad.numpy(), want_g, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fp.grad.numpy(), want_p, rtol=1e-9, atol=1e-12)


def test_gradcheck():
    f0, fg, fp = _features(B=3, Fdim=5, seed=8)
    fg.requires_grad_(True)
    fp.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda g, p: knowledge_guided_loss(f0, g, p, temperature=0.3), (fg, fp))


class _Toy:
    """σ, U, V as leaves and features that are smooth functions of the prompts (a fixed random read-out per sample)."""

    def __init__(self, seed=0, B=4, K=3, D=6, r=2, Fdim=5):
        g = torch.Generator().manual_seed(seed)
        leaf = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
        self.sigma, self.u, self.v = leaf(K, D), leaf(K, r), leaf(r, D)
        self.readout = torch.randn(B, K * D, Fdim, generator=g, dtype=torch.float64)  # per-sample "image"
        self.f_anchor = torch.randn(B, Fdim, generator=g, dtype=torch.float64)

    def features(self, prompt):  # (K, D) -> (B, F)
        return torch.tanh(torch.einsum("k,bkf->bf", prompt.reshape(-1), self.readout))

    def all(self):
        fg = self.features(self.sigma)
        return self.f_anchor, fg, self.features(self.sigma + self.u @ self.v)


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_sigma_through_pos_and_neg_u_v_only_through_neg():
    tau = 0.5
    toy = _Toy()
    f0, fg, fp = toy.all()
    leaves = (toy.sigma, toy.u, toy.v)
    got = torch.autograd.grad(knowledge_guided_loss(f0, fg, fp, temperature=tau), leaves, retain_graph=True)
    # hand-built terms: L = mean_b softplus(z_b), z = (neg − pos)/τ, dL/dz_b = sigmoid(z_b)/B
    pos, neg = _cos(f0, fg), _cos(fg, fp)
    w = (torch.sigmoid((neg - pos) / tau) / (tau * pos.numel())).detach()
    d_pos = torch.autograd.grad((w * pos).sum(), leaves, allow_unused=True, retain_graph=True)
    d_neg = torch.autograd.grad((w * neg).sum(), leaves, allow_unused=True)
    assert d_pos[1] is None and d_pos[2] is None  # pos does not depend on U, V at all
    assert all(float(d.abs().max()) > 0 for d in (d_pos[0], *d_neg))
    torch.testing.assert_close(got[0], d_neg[0] - d_pos[0])  # σ: through both terms
    torch.testing.assert_close(got[1], d_neg[1])  # U: only through neg
    torch.testing.assert_close(got[2], d_neg[2])  # V: only through neg


def test_isolating_the_terms():
    toy = _Toy(seed=1)
    f0, fg, fp = toy.all()
    # personal features constant: U, V receive nothing, σ still learns through pos (and neg's f_global)
    g = torch.autograd.grad(
        knowledge_guided_loss(f0, fg, fp.detach()),
        (toy.sigma, toy.u, toy.v),
        allow_unused=True,
        retain_graph=True,
    )
    assert g[1] is None and g[2] is None and float(g[0].abs().max()) > 0
    # anchor given with requires_grad (e.g. an unfrozen backbone): still no gradient into it
    anchor = f0.clone().requires_grad_(True)
    knowledge_guided_loss(anchor, fg, fp).backward()
    assert anchor.grad is None


def test_descent_on_u_v_leaves_pos_and_lowers_neg():
    toy = _Toy(seed=2)
    f0, fg, fp = toy.all()
    pos0, neg0 = _cos(f0, fg).detach(), _cos(fg, fp).detach()
    w = torch.sigmoid((neg0 - pos0) / 0.5)  # each sample's weight in dL/dneg
    gu, gv = torch.autograd.grad(knowledge_guided_loss(f0, fg, fp), (toy.u, toy.v))
    with torch.no_grad():
        toy.u -= 1e-2 * gu
        toy.v -= 1e-2 * gv
    f0, fg, fp = toy.all()
    torch.testing.assert_close(_cos(f0, fg).detach(), pos0, atol=0, rtol=0)  # σ's side untouched
    assert float((w * _cos(fg, fp).detach()).sum()) < float((w * neg0).sum())  # σ + U V pushed away from σ


def test_descent_on_sigma_raises_pos_minus_neg():
    toy = _Toy(seed=3)
    f0, fg, fp = toy.all()
    before = knowledge_guided_loss(f0, fg, fp)
    (gs,) = torch.autograd.grad(before, (toy.sigma,))
    with torch.no_grad():
        toy.sigma -= 1e-2 * gs
    assert float(knowledge_guided_loss(*toy.all()).detach()) < float(before.detach())


# ---- arguments --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0, 0.0, -0.5, float("inf"), float("nan"), True, "0.5", None])
def test_bad_temperature_raises(tau):
    f0, fg, fp = _features()
    with pytest.raises(ValueError):
        knowledge_guided_loss(f0, fg, fp, temperature=tau)


@pytest.mark.parametrize(
    "shapes",
    [
        ((4, 8), (4, 8), (4, 9)),  # feature dims differ
        ((4, 8), (3, 8), (4, 8)),  # batch differs
        ((8,), (8,), (8,)),  # not (B, F)
        ((2, 4, 8), (2, 4, 8), (2, 4, 8)),
        ((0, 8), (0, 8), (0, 8)),  # empty batch
    ],
)
def test_bad_shapes_raise(shapes):
    f0, fg, fp = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError):
        knowledge_guided_loss(f0, fg, fp)


def test_non_float_or_non_tensor_raise_type_error():
    f = torch.randn(2, 3)
    with pytest.raises(TypeError):
        knowledge_guided_loss(torch.ones(2, 3, dtype=torch.long), f, f)
    with pytest.raises(TypeError):
        knowledge_guided_loss(f.tolist(), f, f)


# ---- issue 19.6: the smallest temperature --------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1e-300, 5e-5, pytest.param(10**400, id="10**400")])
def test_temperature_outside_the_stated_bound_is_refused(tau):
    f0, fg, fp = _features()
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0.0001 \(MIN_TEMPERATURE\)"):
        knowledge_guided_loss(f0, fg, fp, temperature=tau)


def test_loss_and_gradient_finite_at_the_bound_in_float32():
    from fedpeft.losses import MIN_TEMPERATURE

    assert MIN_TEMPERATURE == 1e-4
    f0, fg, fp = _features(B=8, seed=7, dtype=torch.float32)
    fg, fp = fg.clone().requires_grad_(True), fp.clone().requires_grad_(True)
    got = knowledge_guided_loss(f0, fg, fp, temperature=MIN_TEMPERATURE)
    got.backward()
    pos = _np_cos(f0.double().numpy(), fg.detach().double().numpy())
    neg = _np_cos(fg.detach().double().numpy(), fp.detach().double().numpy())
    want = float(np.mean(np.logaddexp(0.0, (neg - pos) / MIN_TEMPERATURE)))
    assert math.isclose(float(got.detach()), want, rel_tol=1e-3, abs_tol=1e-2)
    assert want < 2 / MIN_TEMPERATURE + math.log(2)  # the documented bound
    assert torch.isfinite(fg.grad).all() and torch.isfinite(fp.grad).all()
