"""The local trainer every method shares: ``fedpeft.protocols.LocalTrainer`` configured from the budget.

Optimizer (``Budget``): AdamW, re-created at every round on every client (no optimizer state crosses rounds or
clients), three parameter groups decided by what a parameter is, not by method:

- parameters of the pre-trained backbone (everything in the timm ViT except its classifier): ``lr_backbone``;
- adapter weights that start from scratch beside the backbone's blocks (FedPerfix's parallel prefixes,
  ``ParallelPrefix``'s ``adapters.*``): ``lr_adapter``;
- everything else that starts from scratch (classifier heads, prompt tokens, FedPGP's prompt factors): ``lr_new``.

Adapters get their own rate because the validation pilot showed the kinds need rates 10× apart: prompt tokens at
5·10⁻³ barely move in 24 local epochs, while FedPerfix's adapters at 5·10⁻² wreck the model (33.2 % on seed 100's
validation split against 76.1 % at 5·10⁻³; 20 % is guessing among a client's 5 classes).

A client's batches are drawn from a generator seeded by (seed, round, client, phase)
(``fedpeft.protocols.batch_seed``), so every method and every engine sees the same batches in the same order.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from fedpeft.protocols import LocalTrainer

from .config import Budget

__all__ = ["AdapterRateTrainer", "make_trainer"]


def _is_adapter(name: str) -> bool:
    """FedPerfix's adapters: ``ParallelPrefix`` keeps them under ``adapters.<block>.(down|up)``."""
    return name.split(".")[0] == "adapters"


class AdapterRateTrainer(LocalTrainer):
    """``LocalTrainer`` whose new-parameter group is split: adapters at ``lr_adapter``, heads and prompts at ``lr``."""

    def __init__(self, *, lr_adapter: float, **options) -> None:
        super().__init__(**options)
        if isinstance(lr_adapter, bool) or not isinstance(lr_adapter, (int, float)) or not lr_adapter > 0:
            raise ValueError(f"lr_adapter must be a number > 0, got {lr_adapter!r}")
        self.lr_adapter = float(lr_adapter)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """``[backbone (lr_backbone), heads and prompts (lr), adapters (lr_adapter)]``, empty groups dropped."""
        base = super().make_optimizer(model)
        adapters = {id(p) for n, p in model.named_parameters() if p.requires_grad and _is_adapter(n)}
        groups: List[dict] = []
        for g in base.param_groups:
            rest = [p for p in g["params"] if id(p) not in adapters]
            if rest:
                groups.append({"params": rest, "lr": g["lr"]})
        mine = [p for g in base.param_groups for p in g["params"] if id(p) in adapters]
        if mine:
            groups.append({"params": mine, "lr": self.lr_adapter})
        extra = {"momentum": self.momentum} if self._opt_cls is torch.optim.SGD else {}
        return self._opt_cls(groups, weight_decay=self.weight_decay, **extra)


def make_trainer(budget: Budget, preprocess: nn.Module) -> LocalTrainer:
    """The budget's trainer; ``preprocess`` (resize + normalize) runs on every batch, in training and evaluation."""
    if budget.optimizer != "AdamW":
        raise ValueError(f"optimizer {budget.optimizer!r} is not supported (AdamW)")
    return AdapterRateTrainer(
        epochs=budget.local_epochs,
        batch_size=budget.batch_size,
        optimizer=budget.optimizer,
        lr=budget.lr_new,
        lr_adapter=budget.lr_adapter,
        lr_backbone=budget.lr_backbone,
        weight_decay=budget.weight_decay,
        preprocess=preprocess,
    )
