"""The local trainer every method shares: ``fedpeft.protocols.LocalTrainer`` configured from the budget.

Optimizer (``Budget``): AdamW, re-created at every round on every client (no optimizer state crosses rounds or
clients), two parameter groups decided by where a parameter comes from, not by method:

- parameters of the pre-trained backbone (everything in the timm ViT except its classifier): ``lr_backbone``;
- everything else that trains (classifier head, prompts, adapters, low-rank factors): ``lr_new``.

A client's batches are drawn from a generator seeded by (seed, round, client, phase)
(``fedpeft.protocols.batch_seed``), so every method and every engine sees the same batches in the same order.
"""

from __future__ import annotations

from torch import nn

from fedpeft.protocols import LocalTrainer

from .config import Budget

__all__ = ["make_trainer"]


def make_trainer(budget: Budget, preprocess: nn.Module) -> LocalTrainer:
    """The budget's trainer; ``preprocess`` (resize + normalize) runs on every batch, in training and evaluation."""
    if budget.optimizer != "AdamW":
        raise ValueError(f"optimizer {budget.optimizer!r} is not supported (AdamW)")
    return LocalTrainer(
        epochs=budget.local_epochs,
        batch_size=budget.batch_size,
        optimizer=budget.optimizer,
        lr=budget.lr_new,
        lr_backbone=budget.lr_backbone,
        weight_decay=budget.weight_decay,
        preprocess=preprocess,
    )
