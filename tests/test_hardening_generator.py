"""Issues 11 and 14.5: PromptGenerator takes what torch.as_tensor makes of client ids, and refuses bad factory
arguments with one-line errors instead of failing deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft import LowRankPrompt, PromptGenerator


def _gen():
    torch.manual_seed(0)
    return PromptGenerator(num_clients=5, num_prompts=2, embed_dim=8, depth=2)


@pytest.mark.parametrize("ids", [[0, 3], (0, 3), np.array([0, 3]), np.array([0, 3], dtype=np.int32)])
def test_forward_accepts_int_sequences(ids):
    gen = _gen()
    oracle = gen(torch.tensor([0, 3]))  # the documented form
    out = gen(ids)
    assert out.shape == (2, 2, 2, 8) and torch.equal(out, oracle)


@pytest.mark.parametrize("cid", [torch.tensor(3), torch.tensor(3, dtype=torch.int32), np.int64(3), 3])
def test_prompts_for_accepts_a_0d_integer_tensor(cid):
    gen = _gen()
    assert torch.equal(gen.prompts_for(cid), gen(torch.tensor([3]))[0])


def test_prompts_for_of_ids_elements():
    gen, ids = _gen(), torch.tensor([4, 1])
    for i, cid in enumerate(ids):  # iterating a tensor yields 0-d tensors
        assert torch.equal(gen.prompts_for(cid), gen(ids)[i])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(descriptor_tokens=1.0), TypeError, r"descriptor_tokens must be None or an int.*got float 1.0"),
        (dict(descriptor_tokens=True), TypeError, r"descriptor_tokens must be None or an int.*got bool"),
        (dict(dtype=torch.int64), TypeError, r"dtype must be None or a floating-point torch.dtype.*torch.int64"),
        (dict(dtype="float32"), TypeError, r"dtype must be None or a floating-point torch.dtype.*'float32'"),
    ],
)
def test_generator_factory_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PromptGenerator(num_clients=3, num_prompts=2, embed_dim=8, **kwargs)


def test_lowrank_dtype():
    with pytest.raises(TypeError, match=r"dtype must be None or a floating-point torch.dtype.*torch.int32"):
        LowRankPrompt(num_prompts=2, embed_dim=8, rank=1, dtype=torch.int32)
    assert LowRankPrompt(num_prompts=2, embed_dim=8, rank=1, dtype=torch.float64)().dtype == torch.float64
