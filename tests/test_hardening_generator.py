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


# ---- issue 19.6: ids beyond int64, meta ids --------------------------------------------------------------------------

BEYOND = 2**63  # the smallest id no int64 holds; it used to show up as the wrapped -9223372036854775808


@pytest.mark.parametrize(
    "ids, shown",
    [
        (np.array([1, BEYOND], dtype=np.uint64), "9223372036854775808"),
        (torch.tensor([1, BEYOND], dtype=torch.uint64), "9223372036854775808"),
        ([1, BEYOND], "9223372036854775808"),
        ([2**64 + 1], "18446744073709551617"),
    ],
)
def test_ids_beyond_int64_are_named_as_given(ids, shown):
    gen = _gen()
    with pytest.raises(ValueError, match=rf"client ids must lie in \[0, num_clients\) = \[0, 5\), got \[{shown}\]"):
        gen(ids)


@pytest.mark.parametrize("cid", [BEYOND, np.uint64(BEYOND), 2**70, -1])
def test_prompts_for_an_id_beyond_int64_is_a_range_error(cid):
    with pytest.raises(ValueError, match=rf"client_id must lie in \[0, num_clients\) = \[0, 5\), got {int(cid)}$"):
        _gen().prompts_for(cid)


def test_meta_ids_are_refused():
    gen = _gen()
    with pytest.raises(TypeError, match="client_ids is a meta tensor"):
        gen(torch.tensor([0, 1], device="meta"))
    with pytest.raises(TypeError, match="client_id is a meta tensor"):
        gen.prompts_for(torch.tensor(1, device="meta"))


def test_unsigned_ids_within_int64_still_work():
    gen = _gen()
    assert torch.equal(gen(np.array([4, 0], dtype=np.uint64)), gen(torch.tensor([4, 0])))
