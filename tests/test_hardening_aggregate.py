"""Issue 11: aggregation weights are relative; any finite, non-negative weight vector with a positive sum gives the
correct weighted mean, and finite inputs give a finite mean wherever it is representable.

Oracle: a float64 hand-written mean, ``Σ_i (w_i/w_max)·x_i / Σ_i (w_i/w_max)`` with ``math.fsum``, element by element.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft import fed

F32_MAX = float(torch.finfo(torch.float32).max)


def _oracle(values: list, weights: list) -> list:
    """Element-wise float64 weighted mean of lists of floats (one list per state), weights scaled by their max."""
    top = max(weights)
    p = [w / top for w in weights]
    total = math.fsum(p)
    return [math.fsum(pi * v[j] for pi, v in zip(p, values)) / total for j in range(len(values[0]))]


def _assert_mean(out: torch.Tensor, values: list, weights: list, dtype: torch.dtype) -> None:
    oracle = torch.tensor(_oracle(values, weights), dtype=torch.float64)
    top = max(weights)
    total = math.fsum(w / top for w in weights)
    scale = torch.tensor(  # Σ p_i |x_i| / Σ p_i: the size of the terms the mean is made of
        [math.fsum((w / top) * abs(v[j]) for w, v in zip(weights, values)) / total for j in range(len(values[0]))],
        dtype=torch.float64,
    )
    n = len(values)
    acc_eps = float(torch.finfo(torch.float32).eps)
    out_info = torch.finfo(dtype)
    bound = 4 * n * acc_eps * scale + out_info.eps * oracle.abs() + out_info.tiny
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all()), (out, oracle)
    err = (out.double() - oracle).abs()
    assert bool((err <= bound).all()), (out, oracle, err, bound)


weights_st = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=-60, max_value=60).map(lambda e: 10.0**e)), min_size=1, max_size=6
).filter(lambda ws: any(ws))
values_st = st.floats(allow_nan=False, allow_infinity=False, width=32)  # up to ±FLT_MAX


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), weights=weights_st)
def test_weighted_mean_matches_a_float64_oracle_for_weights_1e_minus60_to_1e60(data, weights):
    values = [data.draw(st.lists(values_st, min_size=3, max_size=3)) for _ in weights]
    states = [{"x": torch.tensor(v, dtype=torch.float32)} for v in values]
    out = fed.average(states, weights=weights)["x"]
    _assert_mean(out, values, weights, torch.float32)
    acc = fed.Averager()  # the streaming path gives the same numbers
    for s, w in zip(states, weights):
        acc.add(s, weight=w)
    assert torch.equal(acc.result()["x"], out)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), weights=weights_st, dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float64]))
def test_weighted_mean_in_other_dtypes(data, weights, dtype):
    big = float(torch.finfo(dtype).max) if dtype != torch.float64 else 1e300
    values = [
        data.draw(st.lists(st.floats(min_value=-big, max_value=big, allow_nan=False), min_size=2, max_size=2))
        for _ in weights
    ]
    states = [{"x": torch.tensor(v, dtype=torch.float64).to(dtype)} for v in values]
    values = [s["x"].double().tolist() for s in states]  # what the states really hold
    out = fed.average(states, weights=weights)["x"]
    oracle = torch.tensor(_oracle(values, weights), dtype=torch.float64)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    info = torch.finfo(dtype)
    top = max(weights)
    scale = max(abs(x) for v, w in zip(values, weights) if w for x in v)
    tol = 4 * len(values) * float(torch.finfo(torch.float32 if dtype != torch.float64 else dtype).eps) * scale
    assert bool(((out.double() - oracle).abs() <= tol + info.eps * oracle.abs() + info.tiny).all()), (out, oracle, top)


@pytest.mark.parametrize(
    "weights, values, expected",
    [
        ([1e-50], [[1.0, -2.0]], [1.0, -2.0]),  # was NaN: 1e-50 underflowed in float32
        ([1e200, 1.0], [[1.0, 1.0], [3.0, 5.0]], [1.0, 1.0]),  # was NaN: 1e200 overflowed
        ([1.0, 1e39], [[1.0, 2.0], [3.0, 4.0]], [3.0, 4.0]),  # was RuntimeError: alpha=1e39 beyond float32
        ([1.0, 1.0], [[3e38, -3e38], [3e38, -3e38]], [3e38, -3e38]),  # was Inf: the float32 sum overflowed
        ([1.0, 1.0], [[3e38, -3e38], [-3e38, 3e38]], [0.0, 0.0]),  # x − mean would overflow: slow path
        ([1.0, 1e-50], [[0.0, 0.0], [3e38, 1e30]], [3e-12, 1e-20]),  # the tiny share must not be lost
        ([0.0, 2.0, 0.0], [[9.0, 9.0], [1.0, 2.0], [7.0, 7.0]], [1.0, 2.0]),  # zero weights contribute nothing
        ([1e308, 1e308, 1e308], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [3.0, 4.0]),  # Σ w overflows float64
    ],
)
def test_extreme_weights_regressions(weights, values, expected):
    states = [{"x": torch.tensor(v, dtype=torch.float32)} for v in values]
    out = fed.average(states, weights=weights)["x"]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0.0)


def test_a_huge_sample_count_cannot_poison_the_mean():
    """A hostile client reporting 1e300 samples dominates the mean (as FedAvg says) but cannot make it NaN/Inf."""
    honest = [{"x": torch.randn(100)} for _ in range(5)]
    hostile = {"x": torch.randn(100)}
    out = fed.average([*honest, hostile], weights=[10, 20, 30, 40, 50, 1e300])["x"]
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, hostile["x"])


@pytest.mark.parametrize(
    "weights, error, match",
    [
        ([0.0, 0.0], ValueError, "all zero"),
        ([1.0, -1.0], ValueError, r"weight #1 .*>= 0"),
        ([1.0, float("nan")], ValueError, "weight #1"),
        ([float("inf"), 1.0], ValueError, "weight #0"),
        ([1.0, 10**400], ValueError, "beyond float64"),
        ([1.0, True], TypeError, "weight #1"),
        (3.0, TypeError, "sequence of numbers"),
        ("12", TypeError, "sequence of numbers"),
    ],
)
def test_bad_weight_vectors_are_refused_before_any_state_is_read(weights, error, match):
    read = []

    def states():
        for i in range(2):
            read.append(i)
            yield {"x": torch.ones(2)}

    with pytest.raises(error, match=match):
        fed.average(states(), weights=weights)
    assert read == []


def test_averager_zero_weights_and_all_zero_total():
    acc = fed.Averager()
    acc.add({"x": torch.full((2,), 5.0)}, weight=0)
    with pytest.raises(ValueError, match="all 1 weights are zero"):
        acc.result()
    acc.add({"x": torch.full((2,), 1.0)}, weight=np.float64(3.0))
    acc.add({"x": torch.full((2,), 9.0)}, weight=torch.tensor(0))
    assert torch.equal(acc.result()["x"], torch.ones(2)) and acc.total_weight == 3.0


def test_average_streams_a_generator():
    """fed.average does not materialise a generator: each state is dropped before the next one is made."""
    import weakref

    alive = []

    def states():
        for i in range(5):
            t = torch.full((4,), float(i))
            alive.append(weakref.ref(t))
            yield {"x": t}
            del t
            assert sum(r() is not None for r in alive) <= 1

    out = fed.average(states(), weights=[1, 1, 1, 1, 1])
    torch.testing.assert_close(out["x"], torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="more states than its 2 weights"):
        fed.average(states(), weights=[1, 1])
    with pytest.raises(ValueError, match="5 states but 6 weights"):
        fed.average(states(), weights=[1] * 6)


def test_int_dtype_and_complex_messages():
    a = {"n": torch.tensor(3, dtype=torch.int64)}
    with pytest.raises(ValueError, match=r"expected dtype torch.int64, got torch.int32"):
        fed.average([a, {"n": torch.tensor(3, dtype=torch.int32)}])
    with pytest.raises(TypeError, match="complex tensors are not supported"):
        fed.average([{"c": torch.ones(2, dtype=torch.complex64)}])


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_and_meta_tensors_are_refused_clearly(kind):
    t = torch.eye(2).to_sparse() if kind == "sparse" else torch.empty(2, 2, device="meta")
    with pytest.raises(TypeError, match=kind):
        fed.average([{"x": t}])
    acc = fed.Averager()
    acc.add({"x": torch.ones(2, 2)})
    with pytest.raises(TypeError, match=kind):
        acc.add({"x": t})
    assert len(acc) == 1 and torch.equal(acc.result()["x"], torch.ones(2, 2))
    with pytest.raises(TypeError, match=kind):
        fed.delta(torch.ones(2, 2), t)


# ---- ΔP: finiteness in the dtype the value is stored in -----------------------------------------------------------


def test_delta_refuses_an_overflowing_difference():
    before, after = torch.full((2,), -3e38), torch.full((2,), 3e38)
    with pytest.raises(ValueError, match=r"after − before overflows torch.float32"):
        fed.delta(before, after)
    with pytest.raises(ValueError, match=r"before .*overflows torch.float32"):
        fed.delta(torch.full((2,), 1e300, dtype=torch.float64), torch.zeros(2))
    torch.testing.assert_close(fed.delta(before, torch.zeros(2)), torch.full((2,), 3e38))  # representable: fine


def test_delta_backward_on_fp16_refuses_a_target_beyond_fp16():
    torch.manual_seed(0)
    gen = fed_generator(dtype=torch.float16)
    for p in gen.parameters():
        p.grad = torch.full_like(p, 0.25)
    grads = {n: p.grad.clone() for n, p in gen.named_parameters()}
    params = {n: p.detach().clone() for n, p in gen.named_parameters()}
    P = gen(torch.tensor([0, 1]))
    trained = torch.full(P.shape, 1e5)  # finite float32, inf in float16
    with pytest.raises(ValueError, match=r"trained .*overflows torch.float16"):
        fed.delta_backward(P, trained)
    for n, p in gen.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), params[n])
    ok = P.detach().float() - 1.0  # a representable target works
    fed.delta_backward(P, ok)
    assert all(bool(torch.isfinite(p.grad).all()) for p in gen.parameters())


def fed_generator(dtype):
    from fedpeft import PromptGenerator

    return PromptGenerator(num_clients=3, num_prompts=2, embed_dim=8, dtype=dtype)


# ---- from_ndarrays(like=...): per-key shapes and dtypes, what np.asarray accepts -------------------------------------


def _like():
    return {"a.w": torch.zeros(3), "b.w": torch.zeros(3, dtype=torch.int64), "c.bf": torch.ones(2, 2).bfloat16()}


def test_from_ndarrays_names_keys_that_look_swapped():
    like = _like()
    keys, arrays = fed.to_ndarrays(like)
    assert keys == ["a.w", "b.w", "c.bf"]
    with pytest.raises(ValueError, match=r"'a.w'.*float32.*got \(3,\) torch.int64.*'a.w' and 'b.w' look swapped"):
        fed.from_ndarrays(keys, [arrays[1], arrays[0], arrays[2]], like=like)  # same shapes: only dtypes tell
    with pytest.raises(ValueError, match=r"'a.w': expected shape \(3,\) torch.float32, got \(3,\) torch.float64"):
        fed.from_ndarrays(keys, [arrays[0].astype(np.float64), arrays[1], arrays[2]], like=like)


def test_from_ndarrays_accepts_big_endian_and_negative_strides():
    arrays = [np.arange(3, dtype=">f4"), np.arange(3, dtype=np.int64)[::-1], np.ones((2, 2), dtype=np.float32)[:, ::-1]]
    out = fed.from_ndarrays(["a.w", "b.w", "c.bf"], arrays, like=_like())
    assert torch.equal(out["a.w"], torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(out["b.w"], torch.tensor([2, 1, 0]))
    assert out["c.bf"].dtype == torch.bfloat16 and torch.equal(out["c.bf"].float(), torch.ones(2, 2))
    plain = fed.from_ndarrays(["x"], [np.arange(4.0, dtype=">f8")[::-2]])
    assert torch.equal(plain["x"], torch.tensor([3.0, 1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match=r"'x'.*must hold numbers"):
        fed.from_ndarrays(["x"], [np.array(["a", "b"])])


# ---- personal_keys / split: one-line errors, and the preset that silently matches half -------------------------------


@pytest.fixture(scope="module")
def test_vit():
    import timm

    return timm.create_model("test_vit", pretrained=False, num_classes=3)


@pytest.mark.parametrize(
    "patterns, match",
    [(b"head", r"str or an iterable of str.*got bytes"), (None, r"str or an iterable of str.*got NoneType"),
     (["head", 3], r"patterns must be str, got int 3")],
)
def test_personal_keys_bad_patterns(test_vit, patterns, match):
    with pytest.raises(TypeError, match=match):
        fed.personal_keys(test_vit, patterns)


def test_split_with_a_non_str_key_names_it(test_vit):
    state = test_vit.state_dict()
    with pytest.raises(TypeError, match=r"keys must be str, got int 1"):
        fed.split(state, ["nope", 1])
    with pytest.raises(TypeError, match=r"iterable of key names"):
        fed.split(state, None)


def test_fedpgp_preset_on_a_model_without_lowrank_prompts_warns(test_vit):
    with pytest.warns(UserWarning, match=r"preset 'fedpgp'.*\['lowrank'\] match no key"):
        assert fed.personal_keys(test_vit, "fedpgp") == ["head.bias", "head.weight"]
    import copy
    import warnings

    from fedpeft import VPT

    vpt = VPT(copy.deepcopy(test_vit), num_prompts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fed.personal_keys(vpt, "pfedpg") == ["model.head.bias", "model.head.weight"]


def test_to_ndarrays_refuses_sparse_and_meta():
    with pytest.raises(TypeError, match="sparse"):
        fed.to_ndarrays({"x": torch.eye(2).to_sparse()})
    with pytest.raises(TypeError, match="meta"):
        fed.to_ndarrays({"x": torch.empty(2, device="meta")})


# ---- issue 19.6: average(None), delta_backward twice, from_ndarrays by key and its dtypes= ---------------------------


@pytest.mark.parametrize("states", [None, 3, 1.5])
def test_average_of_something_not_iterable_names_states(states):
    with pytest.raises(TypeError, match=rf"states must be an iterable of state dicts \(e.g. a list\), got "
                                        rf"{type(states).__name__}"):
        fed.average(states)


def test_delta_backward_twice_on_one_output_is_refused_and_writes_nothing():
    from fedpeft import PromptGenerator

    torch.manual_seed(0)
    gen = PromptGenerator(num_clients=3, num_prompts=2, embed_dim=8)
    ids = torch.tensor([0, 2])
    P = gen(ids)
    target = torch.randn(P.shape)
    fed.delta_backward(P, target)
    first = {n: p.grad.clone() for n, p in gen.named_parameters()}
    with pytest.raises(ValueError, match=r"already passed to fed\.delta_backward.*generate the prompts again"):
        fed.delta_backward(P, target)
    assert all(torch.equal(p.grad, first[n]) for n, p in gen.named_parameters())
    fed.delta_backward(gen(ids), target)  # a fresh output: the same gradient once more (oracle: g + g = 2g exactly)
    assert all(torch.equal(p.grad, 2 * first[n]) for n, p in gen.named_parameters())


def test_delta_backward_on_a_leaf_may_accumulate_again():
    P = torch.zeros(2, 3, requires_grad=True)
    target = torch.ones(2, 3)
    fed.delta_backward(P, target)
    fed.delta_backward(P, target)
    assert torch.equal(P.grad, torch.full((2, 3), -2.0))  # 2 × (P − P̃)


@pytest.mark.parametrize("use_like", [True, False])
def test_from_ndarrays_maps_unsorted_keys_of_equal_shape_by_key(use_like):
    a, b = np.full((2, 3), 1.0, np.float32), np.full((2, 3), 2.0, np.float32)
    like = {"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}
    out = fed.from_ndarrays(["b", "a"], [b, a], like=like if use_like else None)
    assert torch.equal(out["a"], torch.ones(2, 3)) and torch.equal(out["b"], torch.full((2, 3), 2.0))
    assert list(out) == (["a", "b"] if use_like else ["b", "a"])  # like's key order, else the keys as given


@pytest.mark.parametrize(
    "dtypes, error, match",
    [
        ({"a": "float32"}, TypeError, r"dtypes\['a'\] must be a torch.dtype .*got str 'float32'"),
        ({"a": np.float32}, TypeError, r"dtypes\['a'\] must be a torch.dtype"),
        (torch.float32, TypeError, r"dtypes must be a mapping \{key: torch.dtype\}.*got dtype"),
        (["a"], TypeError, r"dtypes must be a mapping .*got list"),
        ({"a": torch.int64}, ValueError, r"dtypes\['a'\] = torch.int64 cannot hold the torch.float64 array"),
        ({"a": torch.bool}, ValueError, r"dtypes\['a'\] = torch.bool cannot hold"),
        ({"nope": torch.float32}, ValueError, r"dtypes names keys that are not in keys: \['nope'\]"),
    ],
)
def test_from_ndarrays_wrong_dtypes_are_named(dtypes, error, match):
    with pytest.raises(error, match=match):
        fed.from_ndarrays(["a"], [np.array([0.5, 1.5])], dtypes=dtypes)


def test_from_ndarrays_dtypes_casts_what_it_may():
    out = fed.from_ndarrays(["a", "n"], [np.array([0.5, 1.5]), np.array([3, 4])],
                            dtypes={"a": torch.bfloat16, "n": torch.float32})
    assert out["a"].dtype == torch.bfloat16 and out["a"].tolist() == [0.5, 1.5]  # exact in bfloat16
    assert out["n"].dtype == torch.float32 and out["n"].tolist() == [3.0, 4.0]
