"""User-level DP, the maths: settings, joint clipping, the seeded noise's law, per-client generator gradients, and ε.

Oracles: explicit norms and scalings; dp-accounting's own accountant driven by hand with the events the engines'
sampling implies; the closed-form RDP of the Gaussian mechanism; a separate forward and backward per client.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft import PromptGenerator
from fedpeft.protocols import Privacy, PrivacyLedger
from fedpeft.protocols.privacy import (
    clip_update,
    clip_upload,
    gaussian_noise,
    private_generator_grads,
    upload_norm_bound,
)

dpa = pytest.importorskip("dp_accounting")


# ---- settings -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm"),
    ({"clip_norm": -1.0, "noise_multiplier": 1.0}, "clip_norm"),
    ({"clip_norm": math.inf, "noise_multiplier": 1.0}, "clip_norm"),
    ({"clip_norm": math.nan, "noise_multiplier": 1.0}, "clip_norm"),
    ({"clip_norm": True, "noise_multiplier": 1.0}, "clip_norm"),
    ({"clip_norm": "1", "noise_multiplier": 1.0}, "clip_norm"),
    ({"clip_norm": 1.0, "noise_multiplier": -0.5}, "noise_multiplier"),
    ({"clip_norm": 1.0, "noise_multiplier": math.nan}, "noise_multiplier"),
    ({"clip_norm": 1.0, "noise_multiplier": math.inf}, "noise_multiplier"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, "delta"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": -1e-5}, "delta"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": math.nan}, "delta"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "accountant": "pld"}, "accountant"),
])
def test_bad_settings_raise_one_line_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError) as err:
        Privacy(**kwargs)
    msg = str(err.value)
    assert msg.startswith(name) and "\n" not in msg


def test_settings_round_trip_through_json_and_ints_become_floats():
    p = Privacy(1, 0, delta=1e-6)
    assert p.clip_norm == 1.0 and isinstance(p.clip_norm, float) and p.noise_multiplier == 0.0
    assert Privacy.from_dict(p.as_dict()) == p
    with pytest.raises(ValueError, match="privacy"):
        Privacy.from_dict({"clip_norm": 1.0, "noise_multiplier": 1.0, "seed": 3})


# ---- clipping -------------------------------------------------------------------------------------------------------

def test_clip_scales_every_tensor_by_one_factor_to_the_joint_norm():
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # joint norm 5
    clipped, norm = clip_update(update, 1.0)
    assert norm == 5.0
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.0, 0.8]]))
    same, norm = clip_update(update, 10.0)  # below the bound: untouched
    assert norm == 5.0 and all(torch.equal(same[k], update[k]) for k in update)
    assert torch.equal(update["a"], torch.tensor([3.0, 0.0]))  # the input is not modified


def test_clip_upload_bounds_the_update_against_the_download_not_the_values():
    download = {"w": torch.full((1000,), 7.0)}
    upload = {"w": download["w"] + 1e6 * torch.linspace(-1, 1, 1000)}
    out = clip_upload(upload, download, 0.5)
    d = (out["w"].double() - download["w"].double())
    assert d.norm().item() <= upload_norm_bound(0.5, download)
    assert abs(d.norm().item() - 0.5) < 1e-3
    cos = torch.nn.functional.cosine_similarity(d, (upload["w"] - download["w"]).double(), dim=0)
    assert cos > 1 - 1e-6  # the direction is kept
    with pytest.raises(ValueError, match="clip_norm"):
        clip_upload(upload, download, 0.0)


# ---- noise ----------------------------------------------------------------------------------------------------------

def test_noise_is_reproducible_per_seed_round_and_release_and_has_the_stated_std():
    shapes = {"a": torch.Size([200, 100]), "b": torch.Size([50])}
    one = gaussian_noise(shapes, 0.3, seed=5, round=2, release=1)
    assert all(torch.equal(one[k], gaussian_noise(shapes, 0.3, seed=5, round=2, release=1)[k]) for k in shapes)
    for other in (dict(seed=6, round=2, release=1), dict(seed=5, round=3, release=1), dict(seed=5, round=2, release=0)):
        assert not torch.equal(one["a"], gaussian_noise(shapes, 0.3, **other)["a"])
    z = one["a"].flatten()  # 20,000 draws: the std's relative standard error is 1/sqrt(2n) = 0.5 %; tolerance 3 %
    assert abs(z.std().item() / 0.3 - 1) < 0.03 and abs(z.mean().item()) < 4 * 0.3 / math.sqrt(z.numel())


# ---- pFedPG's per-client generator gradient -------------------------------------------------------------------------

def _generator(seed=0, clients=5):
    torch.manual_seed(seed)
    return PromptGenerator(num_clients=clients, num_prompts=3, embed_dim=8, depth=2)


@pytest.mark.parametrize("separable", [False, True], ids=["one backward per client", "descriptor rows at once"])
def test_generator_grads_equal_the_clipped_sum_of_separate_per_client_backwards_over_m(separable):
    gen = _generator()
    ids, m, clip = [0, 2, 3], 4, 0.05  # one sampled client did not reply: the denominator stays m = 4
    torch.manual_seed(1)
    trained = gen(torch.tensor(ids)).detach() + torch.randn(3, 2, 3, 8)
    params = list(gen.named_parameters())
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    norms = []
    for i, n in enumerate(ids):  # oracle: a separate forward and backward of ½‖gen(n) − P̃_n‖² per client
        gen.zero_grad(set_to_none=True)
        (0.5 * (gen(torch.tensor([n]))[0] - trained[i]).pow(2).sum()).backward()
        g = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).double() for name, p in params}
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in g.values()))
        norms.append(norm)
        for name in g:
            expected[name] += g[name] * min(1.0, clip / norm)
    gen.zero_grad(set_to_none=True)
    got = private_generator_grads(gen(torch.tensor(ids)), trained, params, Privacy(clip, 0.0), num_sampled=m,
                                  seed=0, round=0, rows={"descriptors": ids} if separable else None)
    assert got == pytest.approx(norms, rel=1e-5) and min(norms) > clip  # every contribution was clipped
    for name, p in params:
        torch.testing.assert_close(p.grad.double(), expected[name] / m, rtol=1e-5, atol=1e-9)


def test_generator_grads_noise_has_std_sigma_c_over_m_on_every_parameter():
    gen = _generator(clients=400)  # 400 × 3 × 8 descriptor entries + the rest
    ids = [1, 2]
    generated = gen(torch.tensor(ids))
    sigma, clip, m = 2.0, 0.25, 5
    params = list(gen.named_parameters())
    private_generator_grads(generated, generated.detach(), params, Privacy(clip, sigma), num_sampled=m, seed=3,
                            round=0, rows={"descriptors": ids})  # trained == generated: zero contributions, the gradient is the noise alone
    z = torch.cat([p.grad.flatten() for _, p in params])
    assert z.numel() > 10_000  # relative standard error of the std < 0.71 %; tolerance 3 %
    assert abs(z.std().item() / (sigma * clip / m) - 1) < 0.03
    assert bool((gen.descriptors.grad[10:] != 0).all())  # rows of clients not in the round are noised too


# ---- the ledger against dp-accounting -------------------------------------------------------------------------------

def _library_epsilon(events, delta):
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    for event, count in events:
        acc.compose(event, count)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("C, m, sigma, T, delta", [(100, 10, 1.3, 25, 1e-5), (20, 5, 0.7, 8, 1e-4)])
def test_epsilon_equals_dp_accountings_for_sampling_without_replacement(C, m, sigma, T, delta):
    ledger = PrivacyLedger(Privacy(1.0, sigma, delta=delta), C)
    for _ in range(T):
        ledger.record(m)
    # replace-one neighbours: one client's clipped contribution (norm <= C) swapped for another moves the sum by <= 2C
    event = dpa.dp_event.SampledWithoutReplacementDpEvent(C, m, dpa.dp_event.GaussianDpEvent(sigma / 2))
    assert ledger.epsilon == pytest.approx(_library_epsilon([(event, T)], delta), rel=1e-12)
    assert ledger.rounds == T and ledger.releases == T


def test_several_steps_per_round_compose_inside_one_sampled_event():
    sigma, k, T = 1.5, 3, 6
    ledger = PrivacyLedger(Privacy(1.0, sigma), 50)
    for _ in range(T):
        ledger.record(10, releases=k)
    # k Gaussians with multiplier s compose to one Gaussian with multiplier s / sqrt(k) (RDP adds α/(2s²) k times)
    event = dpa.dp_event.SampledWithoutReplacementDpEvent(50, 10, dpa.dp_event.GaussianDpEvent(sigma / 2 / math.sqrt(k)))
    assert ledger.epsilon == pytest.approx(_library_epsilon([(event, T)], 1e-5), rel=1e-9)
    assert ledger.releases == k * T
    single = PrivacyLedger(Privacy(1.0, sigma), 50)
    for _ in range(T):
        single.record(10)
    assert ledger.epsilon > single.epsilon  # each step costs privacy


def test_full_participation_matches_the_closed_form_gaussian_rdp():
    sigma, T, delta = 3.0, 10, 1e-5
    ledger = PrivacyLedger(Privacy(1.0, sigma, delta=delta), 7)
    for _ in range(T):
        ledger.record(7)  # q = 1: the plain Gaussian mechanism, sensitivity 2C, RDP(α) = α (2C)² / (2 σ² C²) per round
    orders = dpa.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    best = min(T * 2 * a / sigma ** 2 + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in orders if a > 1.01)
    assert ledger.epsilon == pytest.approx(best, rel=1e-9)


def test_zero_noise_is_infinite_epsilon_and_no_round_is_zero():
    ledger = PrivacyLedger(Privacy(1.0, 0.0), 10)
    assert ledger.epsilon == 0.0
    ledger.record(3)
    assert ledger.epsilon == math.inf


def test_a_restored_ledger_continues_epsilon_exactly_and_refuses_other_settings():
    p = Privacy(0.5, 1.1)
    whole, first = PrivacyLedger(p, 40), PrivacyLedger(p, 40)
    for r in range(12):
        whole.record(4 if r < 7 else 8)
        if r < 5:
            first.record(4)
    resumed = PrivacyLedger(p, 40)
    resumed.load_state_dict(first.state_dict())
    for r in range(5, 12):
        resumed.record(4 if r < 7 else 8)
    assert resumed.epsilon == whole.epsilon and resumed.runs == whole.runs == [[4, 1, 7], [8, 1, 5]]
    for bad in (PrivacyLedger(Privacy(0.5, 1.2), 40), PrivacyLedger(Privacy(0.5, 1.1, delta=1e-6), 40),
                PrivacyLedger(p, 41)):
        with pytest.raises(ValueError, match="privacy"):
            bad.load_state_dict(first.state_dict())
        assert bad.runs == []
    with pytest.raises(ValueError, match="runs"):
        PrivacyLedger(p, 40).load_state_dict({**first.state_dict(), "runs": [[0, 1, 1]]})


def test_ledger_refuses_a_sample_larger_than_the_population():
    ledger = PrivacyLedger(Privacy(1.0, 1.0), 10)
    with pytest.raises(ValueError, match="sample_size"):
        ledger.record(11)
    with pytest.raises(ValueError, match="releases"):
        ledger.record(2, releases=0)
    assert ledger.runs == []
