"""State dicts on Flower's wire and in ``context.state``: by key, float32, exact round trips, stale rounds refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_harness import flower_task, node_context  # noqa: F401  (flower_task: autouse fixture)
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpeft.flower import StaleMessage, from_record, partition, payload_bytes, to_record
from fedpeft.flower.node_store import MemoryStore


def test_bf16_and_fp16_travel_as_float32_and_come_back_bit_exact():
    g = torch.Generator().manual_seed(0)
    state = {"z.bf16": torch.randn(3, 5, generator=g).bfloat16(), "a.fp16": torch.randn(4, generator=g).half(),
             "m.int": torch.arange(6).view(2, 3)}
    record = to_record(state)
    assert list(record.keys()) == ["a.fp16", "m.int", "z.bf16"]  # sorted, by key
    assert {k: record[k].dtype for k in record} == {"a.fp16": "float32", "m.int": "int64", "z.bf16": "float32"}
    back = from_record(record, like=state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype
        assert torch.equal(back[k], t)
    # the values on the wire are the float32 values of the bf16 numbers (numpy reads them independently of fedpeft)
    np.testing.assert_array_equal(record["z.bf16"].numpy(), state["z.bf16"].float().numpy())


def test_a_server_checkpoint_keeps_its_zero_dim_tensors_on_the_wire():
    """Adam's ``step`` is a 0-d tensor; ``server_arrays()`` must not turn it into shape (1,) (numpy's
    ``ascontiguousarray`` does)."""
    state = {"optimizer.0.step": torch.tensor(3.0), "generator.w": torch.ones(2, 2)}
    record = to_record(state)
    assert record["optimizer.0.step"].shape == [] or tuple(record["optimizer.0.step"].shape) == ()
    back = from_record(record, like=state)
    assert back["optimizer.0.step"].shape == () and back["optimizer.0.step"].item() == 3.0


def test_conversion_is_by_key_not_by_position():
    state = {"b": torch.ones(2), "a": torch.zeros(3)}
    shuffled = ArrayRecord()
    shuffled["b"] = Array(np.full(2, 7.0, dtype=np.float32))
    shuffled["a"] = Array(np.full(3, 5.0, dtype=np.float32))
    back = from_record(shuffled, like=state)
    assert back["a"].tolist() == [5.0] * 3 and back["b"].tolist() == [7.0] * 2


def test_payload_bytes_counts_the_array_data_only():
    state = {"p": torch.zeros(2, 3, 4, dtype=torch.bfloat16), "q": torch.zeros(5, dtype=torch.float64)}
    record = to_record(state)
    assert payload_bytes(record) == 2 * 3 * 4 * 4 + 5 * 8  # bf16 sent as float32, float64 as is
    assert record.count_bytes() > payload_bytes(record)  # Flower adds .npy headers and key names


def test_from_record_refuses_other_objects():
    with pytest.raises(TypeError, match="ArrayRecord"):
        from_record({"a": np.zeros(1)})


def test_partition_id_is_read_and_checked():
    assert partition(node_context(77, 2, 3)) == (2, 3)
    ctx = node_context(77, 3, 3)
    with pytest.raises(ValueError, match="out of range"):
        partition(ctx)
    ctx.node_config = {"num-partitions": 3}
    with pytest.raises(ValueError, match="partition-id"):
        partition(ctx)
    ctx.node_config = {"partition-id": "0"}
    with pytest.raises(ValueError, match="integer"):
        partition(ctx)


def test_personal_state_is_round_stamped_and_never_rolled_back():
    ctx = node_context(5, 0, 2)
    like = {"head.weight": torch.zeros(2, 2, dtype=torch.bfloat16)}
    store = MemoryStore(ctx, "M")
    assert store.deployed_state(like) == (None, None)
    newer = {"head.weight": torch.full((2, 2), 3.0, dtype=torch.bfloat16)}
    store.save(4, newer, like)
    older = {"head.weight": torch.full((2, 2), -1.0, dtype=torch.bfloat16)}
    for late_round in (4, 2):  # a repeated and a late message
        with pytest.raises(StaleMessage, match=f"round {late_round} is stale"):
            store.save(late_round, older, like)
        with pytest.raises(StaleMessage, match=f"round {late_round} is stale"):
            store.start_state(late_round, like)
    state, written = store.deployed_state(like)
    assert written == 4 and store.stored_round() == 4
    assert state["head.weight"].dtype == torch.bfloat16 and torch.equal(state["head.weight"], newer["head.weight"])
    assert isinstance(ctx.state["fedpeft.M.meta"], ConfigRecord)
    assert MemoryStore(ctx, "other method").deployed_state(like) == (None, None)  # namespaced by method
