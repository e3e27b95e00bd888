"""The FedAvg-like server: a hand-written weighted mean, order independence, and bad replies dropped."""

from __future__ import annotations

import logging

import pytest
import torch

from fedpeft import protocols


def _state(value: float, shape=(2, 3), dtype=torch.float32):
    g = torch.Generator().manual_seed(int(value * 1000) % 997)
    return {"a": torch.randn(shape, generator=g, dtype=dtype) + value, "b": torch.full((4,), value, dtype=dtype)}


def _server(num_clients=5):
    return protocols.AveragingServer(_state(0.0), num_clients=num_clients)


def _snapshot(server):
    return {k: v.clone() for k, v in server.shared.items()}


def test_update_is_the_hand_written_weighted_mean():
    server = _server()
    uploads = {0: _state(1.0), 3: _state(2.0), 4: _state(-1.5)}
    weights = {0: 10, 3: 30, 4: 5}
    report = server.update([(4, uploads[4], weights[4]), (0, uploads[0], weights[0]), (3, uploads[3], weights[3])])
    total = sum(weights.values())
    for k in ("a", "b"):
        expected = sum(weights[c] * uploads[c][k].double() for c in uploads) / total
        assert torch.allclose(server.shared[k].double(), expected, atol=1e-6)
    assert report.accepted == [0, 3, 4] and report.rejected == [] and report.updated
    assert report.diagnostics["total_weight"] == 45.0


def test_reply_order_does_not_change_a_bit():
    replies = [(c, _state(0.37 * c + 0.1), 7 + c) for c in range(5)]
    a, b = _server(), _server()
    a.update(replies)
    b.update(list(reversed(replies)))
    assert all(torch.equal(a.shared[k], b.shared[k]) for k in a.shared)


def test_payloads_are_the_shared_state_for_everyone():
    server = _server()
    payloads = server.payloads([1, 3])
    assert set(payloads) == {1, 3}
    assert all(torch.equal(payloads[c][k], _state(0.0)[k]) for c in payloads for k in ("a", "b"))
    with pytest.raises(ValueError, match="outside"):
        server.payloads([5])
    with pytest.raises(ValueError, match="distinct"):
        server.payloads([1, 1])


BAD = {
    "nan": lambda: (1, {**_state(1.0), "a": torch.full((2, 3), float("nan"))}, 3),
    "inf": lambda: (1, {**_state(1.0), "b": torch.tensor([1.0, float("inf"), 0.0, 0.0])}, 3),
    "missing key": lambda: (1, {"a": _state(1.0)["a"]}, 3),
    "leaked personal key": lambda: (1, {**_state(1.0), "head.weight": torch.zeros(3, 3)}, 3),
    "wrong shape": lambda: (1, {**_state(1.0), "a": torch.zeros(3, 2)}, 3),
    "wrong dtype": lambda: (1, _state(1.0, dtype=torch.float64), 3),
    "zero weight": lambda: (1, _state(1.0), 0),
    "nan weight": lambda: (1, _state(1.0), float("nan")),
    "bool weight": lambda: (1, _state(1.0), True),
    "id out of range": lambda: (9, _state(1.0), 3),
    "negative id": lambda: (-1, _state(1.0), 3),
    "id not an int": lambda: ("1", _state(1.0), 3),
    "upload not a mapping": lambda: (1, [torch.zeros(2)], 3),
    "not a triple": lambda: (1, _state(1.0)),
}


REASON = {
    "nan": "non-finite", "inf": "non-finite", "missing key": "missing ['b']",
    "leaked personal key": "unexpected ['head.weight']", "wrong shape": "expected shape (2, 3)",
    "wrong dtype": "expected dtype torch.float32", "zero weight": "finite and > 0", "nan weight": "finite and > 0",
    "bool weight": "real number", "id out of range": "outside [0, 5)", "negative id": "outside [0, 5)",
    "id not an int": "must be an int", "upload not a mapping": "Mapping[str, Tensor]",
    "not a triple": "(client_id, upload, weight)",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_reply_is_dropped_with_a_reason_and_state_untouched(case, caplog):
    server = _server()
    before = _snapshot(server)
    with caplog.at_level(logging.WARNING, logger="fedpeft.protocols"):
        report = server.update([BAD[case]()])
    assert report.accepted == [] and not report.updated
    assert len(report.rejected) == 1 and REASON[case] in report.rejected[0].reason
    assert "dropped the reply" in caplog.text
    assert all(torch.equal(server.shared[k], before[k]) for k in before)


def test_good_replies_survive_a_bad_one_and_equal_the_mean_of_the_good_ones():
    server = _server()
    good = [(0, _state(1.0), 2), (2, _state(3.0), 6)]
    report = server.update([good[1], BAD["nan"](), good[0]])
    assert report.accepted == [0, 2] and [r.client_id for r in report.rejected] == [1]
    ref = _server()
    ref.update(good)
    assert all(torch.equal(server.shared[k], ref.shared[k]) for k in ref.shared)


def test_duplicate_client_ids_are_all_dropped():
    server = _server()
    before = _snapshot(server)
    report = server.update([(2, _state(1.0), 1), (2, _state(5.0), 1)])
    assert report.accepted == [] and len(report.rejected) == 2
    assert all("2 times" in r.reason for r in report.rejected)
    assert all(torch.equal(server.shared[k], before[k]) for k in before)


def test_nothing_shared_accepts_only_empty_uploads():
    server = protocols.AveragingServer({}, num_clients=2)
    ok = server.update([(0, {}, 4), (1, {"leak": torch.zeros(1)}, 4)])
    assert ok.accepted == [0] and [r.client_id for r in ok.rejected] == [1] and not ok.updated
    assert server.shared == {}
