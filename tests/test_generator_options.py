"""PromptGenerator's reproducer options ``bias`` and ``kdim`` against Eq. 3 written per client by hand; the default
shapes and state-dict keys are today's."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft import PromptGenerator, fed


def _eq3_by_hand(gen: PromptGenerator, client: int) -> torch.Tensor:
    """P_n = P_base + concat_h softmax(q_h k_hᵀ / sqrt(l_k)) v_h, then W_O (+ b_O); one client, explicit softmax."""
    def lin(m, x):
        return x @ m.weight.T + (m.bias if m.bias is not None else 0)

    base, d = gen.prompt_base, gen.descriptors[client]  # (M, D), (T, D)
    q, k, v = lin(gen.q_proj, d), lin(gen.k_proj, base), lin(gen.v_proj, base)
    H = gen.heads
    hk, hv = q.shape[1] // H, v.shape[1] // H
    heads = []
    for h in range(H):
        logits = q[:, h * hk:(h + 1) * hk] @ k[:, h * hk:(h + 1) * hk].T / math.sqrt(hk)  # (T, M)
        weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
        heads.append((weights / weights.sum(-1, keepdim=True)) @ v[:, h * hv:(h + 1) * hv])
    out = base + lin(gen.out_proj, torch.cat(heads, dim=-1))  # (M, D); T = 1 broadcasts
    return out.view(gen.depth, gen.num_prompts, gen.embed_dim)


@pytest.mark.parametrize("bias,kdim,heads,tokens", [
    (True, None, 1, None), (False, 8, 2, None), (True, 8, 2, 1), (True, 20, 4, None),
])
def test_bias_and_kdim_follow_eq3(bias, kdim, heads, tokens):
    torch.manual_seed(0)
    gen = PromptGenerator(num_clients=5, num_prompts=3, embed_dim=12, depth=2, heads=heads, descriptor_tokens=tokens,
                          bias=bias, kdim=kdim, dtype=torch.float64)
    with torch.no_grad():  # non-zero biases, so that each one matters
        for name, p in gen.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ids = torch.tensor([3, 0, 3, 4])
    out = gen(ids)
    want = torch.stack([_eq3_by_hand(gen, int(i)) for i in ids])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    assert gen.q_proj.weight.shape == gen.k_proj.weight.shape == (kdim or 12, 12)
    assert (gen.q_proj.bias is not None) == bias
    g1 = torch.autograd.grad(out.square().sum(), list(gen.parameters()))
    g2 = torch.autograd.grad(want.square().sum(), list(gen.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_defaults_keep_todays_shapes_and_keys():
    gen = PromptGenerator(num_clients=3, num_prompts=2, embed_dim=8)
    assert sorted(gen.state_dict()) == ["descriptors", "k_proj.weight", "out_proj.weight", "prompt_base",
                                        "q_proj.weight", "v_proj.weight"]
    assert all(m.weight.shape == (8, 8) for m in (gen.q_proj, gen.k_proj, gen.v_proj, gen.out_proj))
    assert fed.personal_keys(PromptGenerator(num_clients=3, num_prompts=2, embed_dim=8, bias=True).state_dict(),
                             "generator") == sorted(PromptGenerator(num_clients=3, num_prompts=2, embed_dim=8,
                                                                    bias=True).state_dict())


def test_a_reference_shaped_state_dict_loads():
    """A generator with biases and a key width other than D (one public one: 512 at D = 768), scaled down."""
    ref = {"prompt_base": torch.randn(4, 16), "descriptors": torch.randn(2, 4, 16),
           "q_proj.weight": torch.randn(8, 16), "q_proj.bias": torch.randn(8),
           "k_proj.weight": torch.randn(8, 16), "k_proj.bias": torch.randn(8),
           "v_proj.weight": torch.randn(16, 16), "v_proj.bias": torch.randn(16),
           "out_proj.weight": torch.randn(16, 16), "out_proj.bias": torch.randn(16)}
    gen = PromptGenerator(num_clients=2, num_prompts=4, embed_dim=16, bias=True, kdim=8)
    gen.load_state_dict(ref, strict=True)
    with pytest.raises(RuntimeError):
        PromptGenerator(num_clients=2, num_prompts=4, embed_dim=16).load_state_dict(ref, strict=True)


def test_bad_options_raise():
    with pytest.raises(TypeError, match="bias"):
        PromptGenerator(num_clients=2, num_prompts=2, embed_dim=8, bias=1)
    with pytest.raises(ValueError, match="kdim"):
        PromptGenerator(num_clients=2, num_prompts=2, embed_dim=8, heads=2, kdim=5)
    with pytest.raises(ValueError, match="kdim"):
        PromptGenerator(num_clients=2, num_prompts=2, embed_dim=8, kdim=0)
