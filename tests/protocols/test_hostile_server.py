"""Issue 20 item 4, the server side: hostile replies the servers used to accept silently. Each is refused with a
reason and the server's state is untouched; the oracle is a hand-computed weighted mean, or an identical server that
never saw the hostile input."""

from __future__ import annotations

import pytest
import torch
from protocol_models import client_data, model_for

from fedpeft import protocols
from fedpeft.protocols import AveragingServer, Federation, LocalTrainer, Reply

INITIAL = {"w": torch.zeros(2, 2), "b": torch.zeros(3)}


def _up(v):
    return {"w": torch.full((2, 2), float(v)), "b": torch.full((3,), float(v))}


def _avg(pairs):  # the oracle: Σ w·x / Σ w, by hand
    tot = sum(w for _, w in pairs)
    return sum(w * v for v, w in pairs) / tot


def test_duplicates_given_as_lists_are_all_dropped():
    s = AveragingServer(INITIAL, num_clients=3)
    report = s.update([[0, _up(1), 1.0], [0, _up(1), 1.0], (1, _up(4), 1.0)])
    assert report.accepted == [1]
    assert [r.client_id for r in report.rejected] == [0, 0]
    assert all("replied 2 times" in r.reason for r in report.rejected)
    assert torch.equal(s.shared["w"], torch.full((2, 2), 4.0))  # only client 1; client 0 not counted twice


def test_duplicates_mixing_a_reply_a_tuple_and_a_list_are_all_dropped():
    s = AveragingServer(INITIAL, num_clients=3)
    report = s.update([Reply(2, _up(1), 1.0), (2, _up(1), 1.0), [2, _up(1), 1.0]])
    assert report.accepted == [] and len(report.rejected) == 3 and torch.equal(s.shared["w"], INITIAL["w"])


def test_a_reply_from_a_past_round_is_refused_by_the_server_itself():
    s = AveragingServer(INITIAL, num_clients=3)
    s.update([Reply(0, _up(1), 1.0, 0)])  # round 0 closed
    before = {k: v.clone() for k, v in s.shared.items()}
    report = s.update([Reply(1, _up(9), 1.0, 0), Reply(2, _up(3), 2.0, 1)])  # round 1 in flight
    assert report.accepted == [2]
    assert report.rejected[0].client_id == 1 and "answers round 0, the server is in round 1" in report.rejected[0].reason
    assert torch.equal(s.shared["w"], torch.full((2, 2), 3.0)) and not torch.equal(before["w"], s.shared["w"])
    report = s.update([Reply(0, _up(5), 1.0, 7)])  # a future round too
    assert report.accepted == [] and "answers round 7" in report.rejected[0].reason
    assert torch.equal(s.shared["w"], torch.full((2, 2), 3.0))


def test_max_weight_caps_a_self_reported_num_examples():
    s = AveragingServer(INITIAL, num_clients=3, max_weight=100)
    report = s.update([(0, _up(1), 1e300), (1, _up(2), 30), (2, _up(5), 10)])
    assert report.accepted == [1, 2]
    assert "weight 1e+300 is above max_weight 100" in report.rejected[0].reason
    want = _avg([(2.0, 30), (5.0, 10)])
    assert torch.allclose(s.shared["w"], torch.full((2, 2), want), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="max_weight must be None or a finite number > 0, got 0"):
        AveragingServer(INITIAL, max_weight=0)


def test_without_a_cap_1e300_is_the_whole_aggregate():  # the behaviour the cap exists for
    s = AveragingServer(INITIAL, num_clients=3)
    s.update([(0, _up(1), 1e300), (1, _up(2), 30)])
    assert torch.equal(s.shared["w"], torch.full((2, 2), 1.0))


def test_pfedpg_update_none_keeps_the_round_in_flight():
    model = model_for("pFedPG")
    proto = protocols.get("pFedPG")
    a, b = proto.make_server(model, num_clients=3, seed=1), proto.make_server(model, num_clients=3, seed=1)
    pa, pb = a.payloads([0, 2]), b.payloads([0, 2])
    replies = lambda p: [(n, {k: v + 0.5 for k, v in p[n].items()}, 4) for n in (0, 2)]  # noqa: E731
    with pytest.raises(TypeError, match="replies must be an iterable"):
        a.update(None)
    ra, rb = a.update(replies(pa)), b.update(replies(pb))  # b never saw the None
    assert ra.accepted == rb.accepted == [0, 2] and ra.updated
    assert a.round == b.round == 1
    sa, sb = a.generator.state_dict(), b.generator.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_a_rejected_clients_loss_is_not_in_the_rounds_train_loss():
    data = client_data(3, n=8)
    x, y = data[1].tensors
    data[1] = torch.utils.data.TensorDataset(torch.full_like(x, float("nan")), y)  # client 1 diverges
    fed = Federation("FedVPT", model_for("FedVPT"), data, test_data=client_data(3, n=8, seed=3),
                     trainer=LocalTrainer(batch_size=4), seed=0)
    before = {k: v.clone() for k, v in fed.personal[1].items()}
    rec = fed.run_round(0)
    assert rec.server.accepted == [0, 2] and sorted(rec.train_loss) == [0, 2]
    assert rec.diverged == [1] and any(r.client_id == 1 and "diverged" in r.reason for r in rec.server.rejected)
    assert all(torch.equal(fed.personal[1][k], before[k]) for k in before)  # kept its previous personal state
    assert all(a is not None and a == a for a in rec.deployed)  # no NaN accuracy in the mean
    assert rec.as_dict()["diverged"] == [1]


def test_an_update_with_no_round_in_flight_is_refused_and_changes_nothing():
    """Once a round closed, ``update`` without a new ``payloads`` refuses every reply (as ``PFedPGServer`` does): the
    oracle is the state after the round, by hand, and the round counter."""
    s = AveragingServer(INITIAL, num_clients=3)
    s.payloads([0, 1])
    assert s.update([(0, _up(2), 1.0), (1, _up(4), 3.0)]).accepted == [0, 1]
    after = {k: v.clone() for k, v in s.shared.items()}
    assert torch.allclose(after["w"], torch.full((2, 2), _avg([(2.0, 1.0), (4.0, 3.0)])))
    report = s.update([(0, _up(9), 1.0)])  # its round closed: nothing in flight
    assert report.accepted == [] and "was not sent anything this round" in report.rejected[0].reason
    assert s.round == 1 and all(torch.equal(s.shared[k], after[k]) for k in after)
    s.payloads([2])  # a new round: only the client it was sent to counts
    report = s.update([(2, _up(1), 1.0), (0, _up(5), 1.0)])
    assert report.accepted == [2] and [r.client_id for r in report.rejected] == [0]
    assert s.round == 2 and torch.equal(s.shared["w"], torch.full((2, 2), 1.0))
