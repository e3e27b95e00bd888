"""Client step, deployment and the in-process engine: a reused model equals a model built fresh for every call."""

from __future__ import annotations

import pytest
import torch
from protocol_models import client_data, model_for

from fedpeft import fed, protocols
from fedpeft.protocols import Federation, LocalTask, LocalTrainer, batch_seed, sample_clients

TRAINER = LocalTrainer(batch_size=6, lr=1e-2, lr_backbone=1e-3)


def _accuracy(model, data):
    x, y = data.tensors
    with torch.no_grad():
        return (model.eval()(x).argmax(-1) == y).float().mean().item()


@pytest.mark.parametrize("method", ["FedPGP", "pFedPG", "FedRep", "FedAvg-FT", "SingleSet-VPT"])
def test_reused_model_equals_a_fresh_model_per_call(method):
    """What a Flower ClientApp does (a fresh model per message, personal state in a plain dict store) gives
    bit-identical results to the in-process engine, which reuses one model."""
    train, test = client_data(3, seed=1), client_data(3, seed=2)
    engine = Federation(method, model_for(method), train, test_data=test, trainer=TRAINER, seed=4, fraction=0.67)
    records = engine.run(3)

    protocol = protocols.get(method)
    server = protocol.make_server(model_for(method), num_clients=3)
    store = {}  # client id -> personal state, as plain dicts (Flower: context.state)
    for r in range(3):
        ids = sample_clients(3, 0.67, seed=4, round=r)
        assert ids == records[r].participants
        payloads, replies = server.payloads(ids), []
        for n in reversed(ids):  # another delivery order
            model = model_for(method)  # fresh, built the same seeded way
            res = protocol.client_update(model, shared=payloads[n], personal=store.get(n), data=train[n], round=r,
                                         client_id=n, seed=4, trainer=TRAINER)
            store[n] = {k: v.clone() for k, v in res.personal.items()}
            replies.append((n, res.upload, res.num_examples))
        server.update(replies)
        deployed = []
        for n, shared in server.deployment(range(3)).items():
            model = model_for(method)
            protocol.deploy(model, shared=shared, personal=store.get(n), data=train[n], round=r, client_id=n, seed=4,
                            trainer=TRAINER)
            deployed.append(TRAINER.evaluate(model, test[n]))
        assert deployed == records[r].deployed
    for n in range(3):
        fresh = store.get(n, protocol.initial_personal(model_for(method)))
        assert all(torch.equal(fresh[k], engine.personal[n][k]) for k in fresh)


def test_fraction_trains_only_the_sampled_clients():
    train = client_data(4)
    engine = Federation("FedVPT", model_for("FedVPT"), train, test_data=train, trainer=TRAINER, fraction=0.5)
    initial = protocols.get("FedVPT").initial_personal(model_for("FedVPT"))
    rec = engine.run_round(0)
    assert len(rec.participants) == 2 and sorted(rec.after_local) == rec.participants == sorted(rec.train_loss)
    for n in range(4):
        same = all(torch.equal(engine.personal[n][k], initial[k]) for k in initial)
        assert same == (n not in rec.participants)
    assert len(rec.deployed) == 4 and rec.server.accepted == rec.participants


def test_after_local_accuracy_is_the_model_right_after_training():
    train, test = client_data(1, seed=3), client_data(1, seed=5)
    model = model_for("FedVPT")
    p = protocols.get("FedVPT")
    res = p.client_update(model, shared=p.initial_shared(model), personal=None, data=train[0], round=0, client_id=0,
                          trainer=TRAINER, eval_data=test[0])
    assert res.metrics["accuracy"] == pytest.approx(_accuracy(model, test[0]))
    assert res.metrics["accuracy"] == pytest.approx(TRAINER.evaluate(model, test[0]))


def test_fedavg_ft_deploys_the_global_model_fine_tuned_locally():
    train = client_data(2)
    p = protocols.get("FedAvg-FT", finetune_epochs=2)
    server = p.make_server(model_for("FedAvg-FT"), num_clients=2)
    deployed = model_for("FedAvg-FT")
    p.deploy(deployed, shared=server.deployment([1])[1], personal={}, data=train[1], round=5, client_id=1, seed=3,
             trainer=TRAINER)
    ref = model_for("FedAvg-FT")  # the global model (the initial one here), fine-tuned by hand
    keys = tuple(fed.trainable_keys(ref))
    TRAINER(ref, train[1], LocalTask(client_id=1, round=5, seed=3, phase="finetune",
                                     batch_seed=batch_seed(3, 5, 1, "finetune"), keys=keys, epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(deployed.parameters(), ref.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(deployed.parameters(), model_for("FedAvg-FT").parameters()))
    with pytest.raises(ValueError, match="data="):
        p.deploy(deployed, shared=server.deployment([1])[1], personal={})


def test_wrong_shared_or_personal_state_is_refused_before_loading():
    model = model_for("FedVPT")
    p = protocols.get("FedVPT")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shared = p.initial_shared(model)
    with pytest.raises(ValueError, match="shared"):
        p.load(model, {**shared, "model.head.weight": torch.zeros(3, 64)}, None)
    with pytest.raises(ValueError, match="expected shape"):
        p.load(model, {"prompts": torch.zeros(1, 5, 64)}, None)
    with pytest.raises(ValueError, match="personal"):
        p.load(model, {"prompts": torch.ones(1, 2, 64)}, {"model.head.weight": torch.zeros(3, 64)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sampling_is_seeded_sized_and_never_empty():
    for C in (1, 3, 10):
        for fraction in (1e-6, 0.1, 0.25, 0.5, 0.67, 1.0):
            ids = sample_clients(C, fraction, seed=0, round=2)
            assert ids == sorted(set(ids)) and all(0 <= i < C for i in ids)
            assert len(ids) == max(1, min(C, int(fraction * C + 0.5)))
            assert ids == sample_clients(C, fraction, seed=0, round=2)
    assert sample_clients(5, 1.0, seed=3, round=0) == [0, 1, 2, 3, 4]
    draws = {tuple(sample_clients(10, 0.3, seed=0, round=r)) for r in range(20)}
    assert len(draws) > 10  # rounds draw independently
    assert {tuple(sample_clients(10, 0.3, seed=s, round=0)) for s in range(20)} != {draws.pop()}
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="fraction"):
            sample_clients(4, bad, seed=0, round=0)


@pytest.mark.parametrize("method", ["FedAvg-FT", "pFedPG"])
def test_unmeasured_rounds_change_no_trained_number(method):
    """``run_round(r, evaluate=False)`` skips both measurements of round r and nothing else: against a run that
    measures every round, the same server state, personal states and losses, and the same accuracies in the rounds
    both measured (FedAvg-FT fine-tunes at deployment, pFedPG deploys generated prompts: the riskiest two)."""
    train, test = client_data(3, seed=1), client_data(3, seed=2)
    every = Federation(method, model_for(method), train, test_data=test, trainer=TRAINER, seed=4, fraction=0.67)
    some = Federation(method, model_for(method), train, test_data=test, trainer=TRAINER, seed=4, fraction=0.67)
    for r in range(4):
        a, b = every.run_round(r), some.run_round(r, evaluate=r in (1, 3))
        assert a.participants == b.participants and a.train_loss == b.train_loss
        if r in (1, 3):
            assert b.deployed == a.deployed and len(a.deployed) == 3 and b.after_local == a.after_local
        else:
            assert b.deployed is None and b.after_local == {} and b.mean is None
            assert sorted(a.after_local) == a.participants  # the run that measures does measure
    sa, sb = every.server.state_dict()[0], some.server.state_dict()[0]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for n in range(3):
        assert all(torch.equal(every.personal[n][k], some.personal[n][k]) for k in every.personal[n])
    with pytest.raises(TypeError, match="evaluate must be True or False"):
        some.run_round(4, evaluate="no")
    assert len(some.history) == 4  # the refused call left the run as it was
