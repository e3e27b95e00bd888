"""PromptGenerator (pFedPG Eq. 3) against an explicit per-client, per-head reference; shapes, init, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedpeft import PromptGenerator
from fedpeft.init import vpt_uniform_bound

C, K, D = 6, 3, 16


def make_gen(depth=1, heads=1, descriptor_tokens=None, seed=0, scale=1.0, **kw):
    """A float64 generator with every parameter re-drawn N(0, scale²): non-uniform softmax, sharp comparisons."""
    torch.manual_seed(seed)
    gen = PromptGenerator(
        num_clients=C, num_prompts=K, embed_dim=D, depth=depth, heads=heads,
        descriptor_tokens=descriptor_tokens, dtype=torch.float64, **kw,
    )
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0.0, scale)
    return gen


def reference(gen: PromptGenerator, n: int) -> torch.Tensor:
    """Eq. 3 for client n, written out: explicit softmax, one loop iteration per head → (L, K, D)."""
    Pb = gen.prompt_base  # (M, D)
    d = gen.descriptors[n]  # (T, D)
    Wq, Wk, Wv, Wo = (m.weight.T for m in (gen.q_proj, gen.k_proj, gen.v_proj, gen.out_proj))  # x @ W
    H = gen.heads
    dh = D // H
    heads = []
    for h in range(H):
        cols = slice(h * dh, (h + 1) * dh)
        Q = d @ Wq[:, cols]  # (T, dh)
        Kb = Pb @ Wk[:, cols]  # (M, dh)
        V = Pb @ Wv[:, cols]  # (M, dh)
        s = Q @ Kb.T / math.sqrt(dh)  # (T, M)
        a = torch.exp(s - s.max(dim=1, keepdim=True).values)
        a = a / a.sum(dim=1, keepdim=True)
        heads.append(a @ V)  # (T, dh)
    offset = torch.cat(heads, dim=1) @ Wo  # (T, D)
    P = Pb + offset  # T = M: per token; T = 1: broadcast on every token
    return P.reshape(gen.depth, gen.num_prompts, D)


CASES = [
    pytest.param(depth, heads, t, id=f"L{depth}-H{heads}-T{'1' if t == 1 else 'LK'}")
    for depth in (1, 3) for heads in (1, 4) for t in (None, 1)
]


@pytest.mark.parametrize("depth,heads,descriptor_tokens", CASES)
def test_matches_explicit_reference(depth, heads, descriptor_tokens):
    gen = make_gen(depth, heads, descriptor_tokens)
    ids = torch.tensor([4, 0, 2, 4, 5])  # unordered, with a duplicate
    out = gen(ids)
    assert out.shape == (5, depth, K, D)
    expected = torch.stack([reference(gen, int(i)) for i in ids])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # the offset itself is non-trivial (otherwise P_base alone would pass) and differs between clients
    offsets = out - gen.prompt_base.view(depth, K, D)
    assert offsets.abs().max() > 0.1
    assert not torch.allclose(offsets[0], offsets[1])
    if descriptor_tokens == 1:  # one vector per client: the same offset on every token and layer
        torch.testing.assert_close(offsets, offsets[:, :1, :1].expand_as(offsets))


IDS = {
    "subset": [1, 3, 3],
    "all-in-order": list(range(C)),  # the whole bank: no gather (a separate code path)
    "all-permuted": [5, 4, 3, 2, 1, 0],
}


@pytest.mark.parametrize("depth,heads,descriptor_tokens", CASES)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "as-written"])
@pytest.mark.parametrize("which", sorted(IDS))
def test_both_evaluation_orders_match_reference_values_and_gradients(depth, heads, descriptor_tokens, fold, which):
    """The generator evaluates Eq. 3 in one of two orders (see its docstring); both must be Eq. 3, incl. backward."""
    gen = make_gen(depth, heads, descriptor_tokens, seed=1)
    ids = torch.tensor(IDS[which])
    g_out = torch.randn(len(ids), depth, K, D, dtype=torch.float64)
    out = gen._generate(gen._check_ids(ids), fold=fold)
    grads = torch.autograd.grad((out * g_out).sum(), list(gen.parameters()))
    ref = torch.stack([reference(gen, int(i)) for i in ids])
    ref_grads = torch.autograd.grad((ref * g_out).sum(), list(gen.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for (name, _), g, r in zip(gen.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_evaluation_order_choice_follows_cost():
    assert make_gen(depth=1, heads=1)._fold  # one head: always folded
    assert make_gen(depth=3, heads=4)._fold is False  # (H − 1)·M = 27 ≥ D = 16: as written
    big = PromptGenerator(num_clients=2, num_prompts=10, embed_dim=768, depth=12, heads=12)
    assert big._fold is False


def test_batched_equals_per_client_calls():
    gen = make_gen(depth=2, heads=2)
    for ids in (torch.tensor([5, 1, 2]), torch.arange(C)):
        batched = gen(ids)
        single = torch.stack([gen(torch.tensor([i])).squeeze(0) for i in ids.tolist()])
        torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gen.prompts_for(int(ids[1])), batched[1])


def test_one_sdpa_call_and_one_key_value_projection(monkeypatch):
    gen = make_gen(depth=2, heads=2)
    T = gen.descriptor_tokens
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, k.stride()))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    kv_calls = []
    for proj in (gen.k_proj, gen.v_proj, gen.q_proj):
        proj.register_forward_hook(lambda m, i, o: kv_calls.append(i[0].shape))
    for fold in (True, False):
        calls.clear()
        kv_calls.clear()
        gen._generate(gen._check_ids(torch.arange(C)), fold=fold)
        assert len(calls) == 1  # all clients in one call ...
        (qb, qh, qn, _), (kb, kh, km, _), kstride = calls[0]
        assert qb * qn == C * T and (qh, kb, kh, km) == (2, qb, 2, 2 * K)  # ... every client's queries in it
        assert kstride[0] == 0  # the shared K is an expanded view, not a copy per group
        assert kv_calls[:2] == [(2 * K, D), (2 * K, D)]  # K and V from the basis once, not per client
        assert kv_calls[2:] == ([] if fold else [(C, T, D)])  # W_Q applied to descriptors only when not folded


def test_float32_default_and_dtype_device():
    gen = PromptGenerator(num_clients=3, num_prompts=2, embed_dim=8)
    assert all(p.dtype == torch.float32 for p in gen.parameters())
    out = gen(torch.tensor([0, 2], dtype=torch.int32))  # any integer dtype is accepted
    assert out.dtype == torch.float32 and out.shape == (2, 1, 2, 8)
    gen64 = PromptGenerator(num_clients=3, num_prompts=2, embed_dim=8, dtype=torch.float64, device="cpu")
    assert gen64(torch.tensor([1])).dtype == torch.float64
    with torch.device("meta"):
        meta = PromptGenerator(num_clients=1000, num_prompts=10, embed_dim=768)
    assert meta.descriptors.is_meta


def test_parameter_names_and_shapes():
    gen = PromptGenerator(num_clients=7, num_prompts=3, embed_dim=8, depth=2)
    shapes = {k: tuple(v.shape) for k, v in gen.state_dict().items()}
    assert shapes == {
        "prompt_base": (6, 8),
        "descriptors": (7, 6, 8),
        "q_proj.weight": (8, 8),
        "k_proj.weight": (8, 8),
        "v_proj.weight": (8, 8),
        "out_proj.weight": (8, 8),
    }
    one = PromptGenerator(num_clients=7, num_prompts=3, embed_dim=8, depth=2, descriptor_tokens=1)
    assert one.descriptors.shape == (7, 1, 8)
    explicit = PromptGenerator(num_clients=7, num_prompts=3, embed_dim=8, depth=2, descriptor_tokens=6)
    assert explicit.descriptors.shape == (7, 6, 8)
    assert "heads=1" in repr(gen) and "descriptor_tokens=6" in repr(gen)


def test_init_vpt_uniform_and_linear_default():
    torch.manual_seed(0)
    D_ = 96
    gen = PromptGenerator(num_clients=200, num_prompts=10, embed_dim=D_, patch_size=(8, 8), init="vpt")
    v = vpt_uniform_bound(64, D_)
    assert v == pytest.approx(math.sqrt(6 / (3 * 64 + D_)))
    for t in (gen.prompt_base.detach(), gen.descriptors.detach()):
        assert float(t.abs().max()) <= v
        assert float(t.std()) == pytest.approx(v / math.sqrt(3), rel=0.1)  # U(−v, v)
    for proj in (gen.q_proj, gen.k_proj, gen.v_proj, gen.out_proj):
        assert proj.bias is None  # Eq. 3 has no bias
        bound = 1 / math.sqrt(D_)  # nn.Linear default (kaiming_uniform a=√5) on (D, D)
        w = proj.weight.detach()
        assert float(w.abs().max()) <= bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # patch_size=16 (the default) gives VPT's bound for a p=16 ViT
    v16 = vpt_uniform_bound(256, D_)
    default = PromptGenerator(num_clients=50, num_prompts=10, embed_dim=D_, init="vpt")
    assert 0.95 * v16 < float(default.descriptors.detach().abs().max()) <= v16
    before = {k: t.clone() for k, t in gen.state_dict().items()}
    gen.reset_parameters()
    assert all(not torch.equal(before[k], t) for k, t in gen.state_dict().items())


@pytest.mark.parametrize("heads", [1, 3])
def test_default_init_gives_unit_variance_attention_logits(heads):
    """init="unit_logits": descriptors ~ N(0, 1); q = d W_Q and k = P_base W_K have unit-variance entries, so every
    head's logits q_h·k_h/sqrt(l_k) have unit variance (the "vpt" init: ≈ 1e-3)."""
    torch.manual_seed(0)
    D_, hd = 96, 96 // heads
    gen = PromptGenerator(num_clients=50, num_prompts=10, embed_dim=D_, patch_size=8, heads=heads)
    assert gen.init == "unit_logits" and "init='unit_logits'" in repr(gen)
    v = vpt_uniform_bound(64, D_)
    base = gen.prompt_base.detach()
    assert float(base.abs().max()) <= v  # the basis still starts as VPT prompts
    assert float(gen.descriptors.detach().std()) == pytest.approx(1.0, rel=0.05)
    s2 = float(base.pow(2).mean())
    assert float(gen.q_proj.weight.detach().std()) == pytest.approx(1 / math.sqrt(D_), rel=0.05)
    assert float(gen.k_proj.weight.detach().std()) == pytest.approx(1 / math.sqrt(D_ * s2), rel=0.05)
    for proj in (gen.v_proj, gen.out_proj):  # nn.Linear's default: a small offset next to the basis
        assert float(proj.weight.detach().abs().max()) <= 1 / math.sqrt(D_)
    W_Q, W_K = gen.q_proj.weight.detach().T, gen.k_proj.weight.detach().T  # x W = x @ weight.T
    q = (gen.descriptors.detach() @ W_Q).view(50, 10, heads, hd)
    k = (base @ W_K).view(10, heads, hd)
    logits = torch.einsum("cthd,mhd->chtm", q, k) / math.sqrt(hd)
    assert float(logits.std()) == pytest.approx(1.0, rel=0.15)
    torch.manual_seed(0)
    old = PromptGenerator(num_clients=50, num_prompts=10, embed_dim=D_, patch_size=8, heads=heads, init="vpt")
    q = (old.descriptors.detach() @ old.q_proj.weight.detach().T).view(50, 10, heads, hd)
    k = (old.prompt_base.detach() @ old.k_proj.weight.detach().T).view(10, heads, hd)
    assert float((torch.einsum("cthd,mhd->chtm", q, k) / math.sqrt(hd)).std()) < 0.02
    # the init changes values only: with equal parameters both generators compute the same Eq. 3
    old.load_state_dict(gen.state_dict())
    assert torch.equal(old(torch.arange(50)), gen(torch.arange(50)))


@pytest.mark.parametrize(
    "ids,exc,match",
    [
        (3, TypeError, "1-D integer tensor"),
        ("01", TypeError, "1-D integer tensor"),
        (["a", "b"], TypeError, "sequence of ints"),
        ([0.0, 1.0], TypeError, "integer dtype"),
        ([[0, 1]], ValueError, "1-D"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer dtype"),
        (torch.tensor([True, False]), TypeError, "integer dtype"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        (torch.tensor(1), ValueError, "1-D"),
        (torch.tensor([], dtype=torch.long), ValueError, "empty"),
        (torch.tensor([0, C]), ValueError, rf"\[0, {C}\).*\[{C}\]"),
        (torch.tensor([-1, 2]), ValueError, r"\[-1\]"),
    ],
)
def test_bad_client_ids(ids, exc, match):
    gen = make_gen()
    with pytest.raises(exc, match=match):
        gen(ids)


def test_prompts_for_errors():
    gen = make_gen()
    with pytest.raises(TypeError, match="int"):
        gen.prompts_for(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"0-d integer tensor.*shape \(1,\)"):
        gen.prompts_for(torch.tensor([1]))
    with pytest.raises(TypeError, match="int"):
        gen.prompts_for(True)
    with pytest.raises(ValueError, match="num_clients"):
        gen.prompts_for(C)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_clients=0), "num_clients"),
        (dict(num_prompts=True), "num_prompts"),
        (dict(embed_dim=16.0), "embed_dim"),
        (dict(depth=0), "depth"),
        (dict(heads=3), "heads must divide"),
        (dict(descriptor_tokens=2), "descriptor_tokens"),
        (dict(descriptor_tokens=0), "descriptor_tokens"),
        (dict(patch_size=0), "patch_size"),
        (dict(patch_size=(16,)), "patch_size"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(num_clients=C, num_prompts=K, embed_dim=D)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PromptGenerator(**args)
