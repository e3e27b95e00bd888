"""fedpeft.flower.node_store and fedpeft.protocols.node_cache (the state folder; a node's data and frozen hash reused
from <state-dir>/cache) and
fedpeft.flower.server's FastGrid (reply poll), the report's path and the failure report."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedpeft.flower.node_store import cache_for, state_dir
from fedpeft.flower.server import FastGrid, failure_report, report_path
from fedpeft.protocols.node_cache import fingerprint


def _ctx(state_dir=None, pid=0, run_config=None):
    cfg = {"partition-id": pid, "num-partitions": 2}
    if state_dir is not None:
        cfg["state-dir"] = str(state_dir)
    return types.SimpleNamespace(node_config=cfg, run_config=dict(run_config or {"seed": 0}))


class CountingLoader:
    def __init__(self):
        self.calls = 0

    def __call__(self, context):
        self.calls += 1
        g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        x, y = torch.rand(10, 3, 4, 4, generator=g), torch.randint(0, 5, (10,), generator=g)
        return TensorDataset(x[:7], y[:7]), TensorDataset(x[7:], y[7:])


def other_loader(context):
    return CountingLoader()(context)


def test_fingerprint_sees_config_and_code_but_not_the_state_dir(tmp_path):
    load = CountingLoader()
    base = fingerprint(load, _ctx(tmp_path).node_config, {"seed": 0})
    assert base == fingerprint(load, _ctx(tmp_path / "elsewhere").node_config, {"seed": 0})  # state-dir ignored
    assert base != fingerprint(load, _ctx(tmp_path, pid=1).node_config, {"seed": 0})
    assert base != fingerprint(load, _ctx(tmp_path).node_config, {"seed": 1})
    assert base != fingerprint(other_loader, _ctx(tmp_path).node_config, {"seed": 0})


def test_data_is_loaded_once_and_returned_bit_for_bit(tmp_path):
    load, ctx = CountingLoader(), _ctx(tmp_path)
    cache = cache_for(ctx)
    assert cache.folder == tmp_path / "cache"
    first = cache.data(ctx, load)
    second = cache_for(ctx).data(ctx, load)  # a fresh process would build a new NodeCache
    assert load.calls == 1
    oracle = CountingLoader()(ctx)
    for got, want in zip(second, oracle):
        assert type(got) is TensorDataset
        for a, b in zip(got.tensors, want.tensors):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert len(first[0]) == 7 and len(second[1]) == 3
    # another partition sharing the state folder: a miss, and both entries stay (neither deletes the other's)
    cache.data(_ctx(tmp_path, pid=1), load)
    cache_for(ctx).data(ctx, load)
    assert load.calls == 2 and len(list((tmp_path / "cache").glob("data-*.pt"))) == 2


def test_torn_cache_file_is_reloaded(tmp_path):
    load, ctx = CountingLoader(), _ctx(tmp_path)
    cache_for(ctx).data(ctx, load)
    (f,) = (tmp_path / "cache").glob("data-*.pt")
    f.write_bytes(f.read_bytes()[:20])
    train, _ = cache_for(ctx).data(ctx, load)
    assert load.calls == 2 and torch.equal(train.tensors[0], CountingLoader()(ctx)[0].tensors[0])


def test_other_data_types_are_not_cached(tmp_path):
    calls = []

    def load(context):
        calls.append(1)
        return [(torch.zeros(3), 1)], None

    ctx = _ctx(tmp_path)
    cache_for(ctx).data(ctx, load)
    cache_for(ctx).data(ctx, load)
    assert len(calls) == 2 and not list((tmp_path / "cache").glob("data-*.pt"))


def test_frozen_hash_is_computed_once(tmp_path):
    ctx, calls = _ctx(tmp_path), []

    def build(context):
        torch.manual_seed(0)  # the same weights every call, as build_model must
        return torch.nn.Linear(2, 2)

    def compute(model):
        calls.append(1)
        return "abc123"

    assert cache_for(ctx).frozen_hash(ctx, build, build(ctx), compute) == "abc123"
    assert cache_for(ctx).frozen_hash(ctx, build, build(ctx), compute) == "abc123"
    assert len(calls) == 1


def test_no_state_dir_means_no_cache_and_a_bad_one_is_refused():
    assert str(state_dir(_ctx("/x"))) == "/x" and state_dir(_ctx()) is None and str(state_dir(_ctx(), "/d")) == "/d"
    assert cache_for(_ctx()) is None
    ctx = _ctx()
    ctx.node_config["state-dir"] = 3
    with pytest.raises(TypeError, match="state-dir"):
        cache_for(ctx)


class FakeGrid:
    """Replies become available ``delay`` pulls after the push; counts pulls."""

    def __init__(self, delay: int, answer: set):
        self.delay, self.answer, self.pulls, self.ids = delay, answer, 0, []

    def push_messages(self, messages):
        self.ids = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.ids)

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < self.delay:
            return []
        meta = [types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if i in self.answer]
        return meta

    def get_node_ids(self):
        return [1, 2]


def test_fast_grid_pulls_until_every_reply_is_in():
    inner = FakeGrid(delay=3, answer={"m0", "m1"})
    grid = FastGrid(inner, poll=0.01)
    replies = list(grid.send_and_receive(["a", "b"], timeout=5))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert inner.pulls == 3
    assert grid.get_node_ids() == [1, 2]  # everything else is the wrapped grid's


def test_fast_grid_stops_at_the_timeout():
    inner = FakeGrid(delay=1, answer={"m0"})  # m1 never answers
    replies = list(FastGrid(inner, poll=0.01).send_and_receive(["a", "b"], timeout=0.2))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and inner.pulls >= 2


@pytest.mark.parametrize("poll", [0, -1, True, "1", 11])
def test_fast_grid_refuses_a_bad_poll(poll):
    with pytest.raises(ValueError, match="poll"):
        FastGrid(FakeGrid(1, set()), poll=poll)


def test_report_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report_path("out/r.json", 7) == tmp_path / "out" / "r.json"
    assert report_path(None, 7) == tmp_path / "fedpeft-reports" / "7.json"
    assert report_path(str(tmp_path / "x.json"), 7) == tmp_path / "x.json"
    assert Path(report_path("", 9)).is_absolute()


def test_failure_report_keeps_the_finished_rounds():
    try:
        raise RuntimeError("no node could be registered")
    except RuntimeError as e:
        out = failure_report("pFedPG", e, {"name": "pFedPG", "rounds": [{"round": 1}]})
    assert out["status"] == "failed" and out["error"] == "RuntimeError: no node could be registered"
    assert out["rounds"] == [{"round": 1}] and "Traceback" in out["traceback"]
