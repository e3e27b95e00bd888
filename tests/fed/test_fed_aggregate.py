"""fed.average / fed.Averager against explicit weighted sums, refusals, dtypes and streaming memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fedpeft import fed


def _state(seed: int, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g).to(dtype),
        "b": torch.randn(4, generator=g).to(dtype),
        "steps": torch.tensor(7),  # an integer buffer: must be equal everywhere
    }


def test_average_is_the_explicit_weighted_sum():
    s0, s1, s2 = _state(0), _state(1), _state(2)
    out = fed.average([s0, s1, s2], weights=[1, 2, 5])
    for k in ("w", "b"):
        oracle = (1 * s0[k].double() + 2 * s1[k].double() + 5 * s2[k].double()) / 8
        torch.testing.assert_close(out[k].double(), oracle, rtol=1e-6, atol=1e-6)
        assert out[k].dtype == torch.float32
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 7
    assert list(out) == ["w", "b", "steps"]  # the first state's key order


def test_average_without_weights_is_the_plain_mean():
    s0, s1, s2 = _state(0), _state(1), _state(2)
    out = fed.average([s0, s1, s2])
    torch.testing.assert_close(out["w"].double(), (s0["w"].double() + s1["w"].double() + s2["w"].double()) / 3)


def test_averager_streams_the_same_average():
    states, weights = [_state(i) for i in range(4)], [3.0, 1.0, 10.0, 2.5]
    acc = fed.Averager()
    assert len(acc) == 0 and acc.total_weight == 0.0
    for s, w in zip(states, weights):
        acc.add(s, weight=w)
    assert len(acc) == 4 and acc.total_weight == 16.5
    assert repr(acc) == "Averager(states=4, total_weight=16.5, keys=3)"
    streamed, batch = acc.result(), fed.average(states, weights)
    assert all(torch.equal(streamed[k], batch[k]) for k in batch)
    # add() may go on after result(), and result() does not consume the accumulator
    acc.add(_state(9), weight=4)
    oracle = sum(w * s["b"].double() for s, w in zip([*states, _state(9)], [*weights, 4])) / 20.5
    torch.testing.assert_close(acc.result()["b"].double(), oracle)


def test_keys_may_come_in_any_order():
    s0, s1 = _state(0), _state(1)
    out = fed.average([s0, dict(reversed(list(s1.items())))])
    torch.testing.assert_close(out["w"], (s0["w"] + s1["w"]) / 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_is_preserved(dtype):
    s0, s1 = _state(0, dtype), _state(1, dtype)
    out = fed.average([s0, s1], weights=[1, 3])
    assert out["w"].dtype == dtype and out["steps"].dtype == torch.int64
    oracle = (s0["w"].double() + 3 * s1["w"].double()) / 4
    torch.testing.assert_close(out["w"], oracle.to(dtype))  # within the dtype's own tolerance
    if dtype == torch.float64:  # float64 accumulates in float64
        torch.testing.assert_close(out["w"], oracle, rtol=1e-15, atol=1e-15)


def test_fp16_accumulates_in_float32():
    n, g = 256, torch.Generator().manual_seed(0)
    states = [{"x": (0.5 + 0.5 * torch.rand(1000, generator=g)).half()} for _ in range(n)]
    oracle = sum(s["x"].double() for s in states) / n  # float64 reference
    out = fed.average(states)["x"]
    assert out.dtype == torch.float16
    bound = torch.finfo(torch.float16).eps * oracle.abs()  # relative 2^-10: the rounding of the fp16 result itself
    assert bool(((out.double() - oracle).abs() <= bound).all())
    naive = torch.zeros(1000, dtype=torch.float16)  # the same sum carried in fp16 misses that bound
    for s in states:
        naive += s["x"]
    assert not bool((((naive / n).double() - oracle).abs() <= bound).all())


def _bad_states():
    good = _state(5)
    nan, inf, ninf = dict(good), dict(good), dict(good)
    nan["w"] = good["w"].clone().index_fill_(1, torch.tensor([2]), float("nan"))
    inf["b"] = good["b"].clone().index_fill_(0, torch.tensor([0]), float("inf"))
    ninf["b"] = good["b"].clone().index_fill_(0, torch.tensor([3]), float("-inf"))
    return {
        "missing key": ({"w": good["w"], "b": good["b"]}, ValueError, "steps"),
        "extra key": ({**good, "extra": torch.zeros(1)}, ValueError, "extra"),
        "shape": ({**good, "w": torch.zeros(4, 3)}, ValueError, r"'w'.*expected shape \(3, 4\), got \(4, 3\)"),
        "nan": (nan, ValueError, "'w'.*non-finite"),
        "inf": (inf, ValueError, "'b'.*non-finite"),
        "-inf": (ninf, ValueError, "'b'.*non-finite"),
        "int for float": ({**good, "b": torch.zeros(4, dtype=torch.int64)}, ValueError, "'b'.*float32"),
        "int differs": ({**good, "steps": torch.tensor(8)}, ValueError, "'steps'.*must equal"),
        "int dtype differs": ({**good, "steps": torch.tensor(7, dtype=torch.int32)}, ValueError, "'steps'"),
        "not a tensor": ({**good, "b": [0.0] * 4}, TypeError, "'b'.*torch.Tensor"),
        "not a mapping": ([good["w"]], TypeError, "Mapping"),
    }


@pytest.mark.parametrize("case", sorted(_bad_states()))
def test_refused_add_leaves_the_averager_untouched(case):
    bad, error, match = _bad_states()[case]
    acc, clean = fed.Averager(), fed.Averager()
    for a in (acc, clean):
        a.add(_state(0), weight=2)
        a.add(_state(1), weight=3)
    with pytest.raises(error, match=match):
        acc.add(bad, weight=1)
    assert len(acc) == len(clean) == 2 and acc.total_weight == clean.total_weight == 5
    after, expected = acc.result(), clean.result()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    acc.add(_state(2))  # and it goes on working
    clean.add(_state(2))
    assert all(torch.equal(acc.result()[k], clean.result()[k]) for k in expected)


def test_refused_first_add_leaves_it_empty():
    acc = fed.Averager()
    bad = {**_state(0), "w": torch.full((3, 4), float("nan"))}
    with pytest.raises(ValueError, match=r"state #0\['w'\]"):
        acc.add(bad)
    assert len(acc) == 0
    with pytest.raises(ValueError, match="no state"):
        acc.result()
    acc.add(_state(1))
    assert torch.equal(acc.result()["w"], _state(1)["w"])


def test_mixed_dtypes_and_empty_tensors():
    state = {"a": torch.ones(3), "h": torch.full((2,), 2.0, dtype=torch.float16), "e": torch.zeros(0, 4),
             "d": torch.ones(1, dtype=torch.float64)}
    out = fed.average([state, {**state, "a": torch.full((3,), 3.0)}])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in state.items()}
    assert torch.equal(out["a"], torch.full((3,), 2.0)) and out["e"].shape == (0, 4)
    bad = {**state, "h": torch.tensor([1.0, float("inf")], dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"state #1\['h'\].*non-finite"):
        fed.average([state, bad])


@pytest.mark.parametrize(
    "weight, error",
    [(-1e-300, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     (True, TypeError), ("3", TypeError), (None, TypeError), (torch.tensor([1.0, 2.0]), TypeError)],
)
def test_bad_weights_are_refused_before_anything_is_added(weight, error):
    acc = fed.Averager()
    acc.add(_state(0))
    before = acc.result()
    with pytest.raises(error, match="weight"):
        acc.add(_state(1), weight=weight)
    assert len(acc) == 1 and acc.total_weight == 1.0
    assert all(torch.equal(acc.result()[k], before[k]) for k in before)


def test_weight_may_be_a_0d_tensor_or_numpy_number():
    import numpy as np

    out = fed.average([_state(0), _state(1)], weights=[torch.tensor(1), np.int64(3)])
    torch.testing.assert_close(out["w"], (_state(0)["w"] + 3 * _state(1)["w"]) / 4)


def test_average_errors_name_the_state():
    with pytest.raises(ValueError, match="at least one"):
        fed.average([])
    with pytest.raises(ValueError, match="2 states but 3 weights"):
        fed.average([_state(0), _state(1)], weights=[1, 2, 3])
    with pytest.raises(ValueError, match=r"state #2\['w'\]"):
        fed.average([_state(0), _state(1), {**_state(2), "w": torch.zeros(2)}])


def test_inputs_are_not_modified_and_not_aliased():
    model = torch.nn.Linear(4, 3)
    states = [model.state_dict(keep_vars=True), _state_like_linear(1)]  # parameters with requires_grad
    before = [{k: v.detach().clone() for k, v in s.items()} for s in states]
    out = fed.average(states, weights=[2, 1])
    for s, b in zip(states, before):
        assert all(torch.equal(s[k], b[k]) for k in b)
    assert not out["weight"].requires_grad and out["weight"].grad_fn is None
    out["weight"].add_(1.0)  # the result is a new tensor
    assert torch.equal(model.weight.detach(), before[0]["weight"])


def _state_like_linear(seed):
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}


def _held_tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` through its attributes and containers."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif x is obj or isinstance(x, (dict, list, tuple, set, frozenset)):
            stack.extend(gc.get_referents(x))
    return total


def test_streaming_memory_is_one_model_whatever_the_number_of_clients():
    numel = 256 * 1024  # 1 MiB per float32 client state
    acc, held, refs = fed.Averager(), [], []
    for i in range(30):
        state = {"x": torch.full((numel,), float(i)), "n": torch.tensor(3)}
        acc.add(state, weight=i + 1)
        refs.append(weakref.ref(state["x"]))
        del state  # the caller drops each client right after add
        held.append(_held_tensor_bytes(acc))
    assert all(r() is None for r in refs)  # no reference to any client's tensor is kept
    assert held[0] == held[9] == held[29] == numel * 4 + 8  # one float32 accumulator + the int buffer
    torch.testing.assert_close(acc.result()["x"], torch.full((numel,), sum(i * (i + 1) for i in range(30)) / 465))
