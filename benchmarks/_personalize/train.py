"""The local trainer every method shares: ``fedpeft.protocols.LocalTrainer`` configured from the budget.

Optimizer (``Budget``): AdamW, re-created at every round on every client (no optimizer state crosses rounds or
clients), three parameter groups decided by what a parameter is, not by method:

- parameters of the pre-trained backbone (everything in the timm ViT except its classifier): ``lr_backbone``;
- prompt tokens (``VPT``'s ``prompts``, FedPGP's prompt factors: parameters under ``prompts``): ``lr_prompt``;
- everything else that trains from scratch (classifier head, FedPerfix's adapters): ``lr_new``.

Prompts get their own rate because the validation pilot showed the kinds need rates 10× apart (seed 100's
validation split, 12 rounds × 2 local epochs): prompt tokens at 5·10⁻³ barely move, while FedPerfix's adapters and
head at 5·10⁻² wreck the model (33.2 % against 76.1 % at 5·10⁻³; 20 % is guessing among a client's 5 classes), and
heads do as well or better at 5·10⁻³ (Local 63.9 vs 63.0 %, VanillaAttention 76.4 vs 70.6 % over rounds 8–10).

A client's batches are drawn from a generator seeded by (seed, round, client, phase)
(``fedpeft.protocols.batch_seed``), so every method and every engine sees the same batches in the same order.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from fedpeft.protocols import LocalTrainer

from .config import Budget

__all__ = ["PromptRateTrainer", "make_trainer"]


def _is_prompt(name: str) -> bool:
    return name.split(".")[0] == "prompts"


class PromptRateTrainer(LocalTrainer):
    """``LocalTrainer`` whose new-parameter group is split: prompt tokens at ``lr_prompt``, the rest at ``lr``."""

    def __init__(self, *, lr_prompt: float, **options) -> None:
        super().__init__(**options)
        if isinstance(lr_prompt, bool) or not isinstance(lr_prompt, (int, float)) or not lr_prompt > 0:
            raise ValueError(f"lr_prompt must be a number > 0, got {lr_prompt!r}")
        self.lr_prompt = float(lr_prompt)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """``[backbone group (lr_backbone), new group (lr), prompt group (lr_prompt)]``, empty groups dropped."""
        base = super().make_optimizer(model)
        prompts = {id(p) for n, p in model.named_parameters() if p.requires_grad and _is_prompt(n)}
        groups: List[dict] = []
        for g in base.param_groups:
            rest = [p for p in g["params"] if id(p) not in prompts]
            mine = [p for p in g["params"] if id(p) in prompts]
            if rest:
                groups.append({"params": rest, "lr": g["lr"]})
            if mine:
                groups.append({"params": mine, "lr": self.lr_prompt})
        extra = {"momentum": self.momentum} if self._opt_cls is torch.optim.SGD else {}
        return self._opt_cls(groups, weight_decay=self.weight_decay, **extra)


def make_trainer(budget: Budget, preprocess: nn.Module) -> LocalTrainer:
    """The budget's trainer; ``preprocess`` (resize + normalize) runs on every batch, in training and evaluation."""
    if budget.optimizer != "AdamW":
        raise ValueError(f"optimizer {budget.optimizer!r} is not supported (AdamW)")
    return PromptRateTrainer(
        epochs=budget.local_epochs,
        batch_size=budget.batch_size,
        optimizer=budget.optimizer,
        lr=budget.lr_new,
        lr_prompt=budget.lr_prompt,
        lr_backbone=budget.lr_backbone,
        weight_decay=budget.weight_decay,
        preprocess=preprocess,
    )
