"""The default trainer against a hand-written loop; a user trainer; FedRep's phases; the batch seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from protocol_models import client_data, model_for
from torch.utils.data import DataLoader

from fedpeft import fed, protocols
from fedpeft.protocols import LocalTask, LocalTrainer, batch_seed


def test_batch_seed_formula():
    assert batch_seed(2, 5, 7) == (2 * 1000 + 5) * 1000 + 7
    assert batch_seed(2, 5, 7, "personal") == (2 * 1000 + 5) * 1000 + 7 + (1 << 40)
    assert len({batch_seed(0, 0, 0, p) for p in ("local", "personal", "shared", "finetune")}) == 4
    with pytest.raises(ValueError, match="phase"):
        batch_seed(0, 0, 0, "warmup")


def test_local_trainer_equals_a_hand_written_loop():
    """AdamW with two groups (backbone lr, new lr), batches from a generator seeded with the task's batch seed."""
    data = client_data(1, n=20)[0]
    a, b = model_for("FedPerfix"), model_for("FedPerfix")  # backbone and adapters both train
    trainer = LocalTrainer(epochs=2, batch_size=8, lr=1e-2, lr_backbone=1e-3, weight_decay=1e-3)
    task = LocalTask(client_id=1, round=3, seed=0, phase="local", batch_seed=batch_seed(0, 3, 1), keys=())
    loss = trainer(a, data, task)

    vit = b.unwrap()
    head = {id(p) for p in vit.head.parameters()}
    backbone = [p for p in b.parameters() if p.requires_grad and id(p) in {id(q) for q in vit.parameters()}
                and id(p) not in head]
    new = [p for p in b.parameters() if p.requires_grad and id(p) not in {id(q) for q in backbone}]
    opt = torch.optim.AdamW([{"params": backbone, "lr": 1e-3}, {"params": new, "lr": 1e-2}], weight_decay=1e-3)
    # the documented batch order: a plain shuffled DataLoader whose generator is seeded with the task's batch seed
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(batch_seed(0, 3, 1)))
    losses = []
    b.train()
    for _ in range(2):
        for x, y in loader:
            step = F.cross_entropy(b(x), y)
            opt.zero_grad()
            step.backward()
            opt.step()
            losses.append(step.item())
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_a_user_trainer_is_called_and_its_work_uploaded():
    calls = []

    def my_trainer(model, data, task):
        calls.append(task)
        with torch.no_grad():
            model.prompts.fill_(0.25)  # a user's own "training"
        return {"loss": 1.5, "my_metric": 2.0}

    model = model_for("FedVPT")
    p = protocols.get("FedVPT")
    server = p.make_server(model, num_clients=3)
    data = client_data(3)
    result = p.client_update(model, shared=server.payloads([2])[2], personal=None, data=data[2], round=4,
                             client_id=2, seed=9, trainer=my_trainer)
    (task,) = calls
    assert (task.client_id, task.round, task.seed, task.phase) == (2, 4, 9, "local")
    assert task.batch_seed == batch_seed(9, 4, 2) and task.loss_fn is p.loss_fn
    assert set(task.keys) == {"prompts", "model.head.weight", "model.head.bias"}
    assert torch.equal(result.upload["prompts"], torch.full_like(model.prompts, 0.25))
    assert result.metrics["loss"] == 1.5 and result.metrics["my_metric"] == 2.0
    assert result.num_examples == len(data[2]) and result.metrics["num_examples"] == len(data[2])


def test_a_trainer_mapping_without_loss_is_refused():
    model = model_for("FedVPT")
    p = protocols.get("FedVPT")
    with pytest.raises(ValueError, match="'loss'"):
        p.client_update(model, shared=p.initial_shared(model), personal=None, data=client_data(1)[0], round=0,
                        client_id=0, trainer=lambda m, d, t: {"acc": 1.0})


def test_fedrep_trains_the_head_first_then_the_body():
    seen = []

    def spy(model, data, task):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        LocalTrainer(batch_size=6, lr=1e-2)(model, data, task)
        changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
        seen.append((task.phase, task.epochs, trainable, changed))
        return 0.0

    model = model_for("FedRep")
    p = protocols.get("FedRep", personal_epochs=2, shared_epochs=1)
    p.client_update(model, shared=p.initial_shared(model), personal=None, data=client_data(1)[0], round=0,
                    client_id=0, trainer=spy)
    head = ["head.bias", "head.weight"]
    body = sorted(n for n, _ in model.named_parameters() if n not in head)
    assert [(phase, epochs) for phase, epochs, _, _ in seen] == [("personal", 2), ("shared", 1)]
    assert seen[0][2] == head and seen[0][3] == head
    assert seen[1][2] == body and set(seen[1][3]) <= set(body) and seen[1][3]
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_fedpgp_loss_is_ce_plus_mu_times_the_knowledge_guided_term():
    from fedpeft import fedpgp_forward, knowledge_guided_loss

    model = model_for("FedPGP")
    x, y = client_data(1, n=4)[0].tensors
    out = fedpgp_forward(model, x)
    ref = F.cross_entropy(out.logits, y) + 0.7 * knowledge_guided_loss(*out[1:], temperature=0.3)
    assert protocols.fedpgp_loss(0.7, 0.3)(model, x, y).item() == pytest.approx(ref.item(), rel=1e-6)
    assert protocols.get("FedPGP", mu=0.7, temperature=0.3).loss_fn(model, x, y).item() == pytest.approx(ref.item())


def test_trainer_arguments_are_checked():
    with pytest.raises(ValueError, match="optimizer"):
        LocalTrainer(optimizer="lbfgs")
    with pytest.raises(ValueError, match="epochs"):
        LocalTrainer(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        LocalTrainer(lr=-1.0)
    frozen = model_for("FedVPT")
    for q in frozen.parameters():
        q.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        LocalTrainer().make_optimizer(frozen)
    assert fed.trainable_keys(frozen) == []
