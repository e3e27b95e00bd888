"""Local training: the default trainer every protocol uses, and the signature a user's own training loop must have.

A *trainer* is any callable ``trainer(model, data, task) -> float | Mapping[str, float]``:

- ``model``: the client's model, already loaded with this round's shared and personal state. Exactly the parameters
  named in ``task.keys`` have ``requires_grad=True`` for the call (the protocol sets this, e.g. FedRep's head phase,
  and restores it afterwards), so ``[p for p in model.parameters() if p.requires_grad]`` is what to optimize.
- ``data``: whatever the engine handed the client (the default trainer wants a map-style ``Dataset`` of ``(x, y)``).
- ``task``: a :class:`LocalTask`: client id, round, phase, a seed for the batch order, the protocol's loss
  ``task.loss_fn(model, x, y) -> scalar`` (FedPGP's objective for FedPGP, cross-entropy otherwise) and, for phased
  protocols, an epoch count that overrides the trainer's own.
- returns the mean training loss (a float), or a mapping of metrics with a ``"loss"`` entry.

The trainer trains ``model`` in place; the protocol reads the result from the model afterwards.

:class:`LocalTrainer` is the default: a fresh optimizer per call (no optimizer state crosses rounds or clients: the
clients are stateless, as a Flower ClientApp process is), ``epochs`` epochs over a ``DataLoader`` shuffled by a
``torch.Generator`` seeded with ``task.batch_seed`` = :func:`batch_seed` (seed, round, client, phase), so every
method, engine and machine sees the same batches in the same order. Two learning rates by parameter *kind*, never by
method: parameters of the pre-trained timm ViT under the wrappers (all but its classifier) get ``lr_backbone``,
everything else that trains (classifier, prompts, adapters, low-rank factors) ``lr``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import _freeze, _timm
from .._checks import check_positive_int
from .._wrapping import innermost

__all__ = [
    "LocalTask",
    "LocalTrainer",
    "LossFn",
    "Trainer",
    "batch_seed",
    "cross_entropy_loss",
    "evaluate",
    "kept",
]

#: ``(model, inputs, labels) -> scalar loss``
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]

#: the phases a protocol trains in; the index is mixed into the batch seed
PHASES: Tuple[str, ...] = ("local", "personal", "shared", "finetune")


def logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` as a tensor: a bare transformers model (FedAvg, FedRep, … train the backbone itself) returns a
    ``ModelOutput``, so it goes through the backbone interface; a timm model or a fedpeft wrapper is called as is."""
    from .. import _timm  # imported on first use: ``import fedpeft.protocols`` stays free of timm

    return _timm.forward(model, x)


def cross_entropy_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``F.cross_entropy(logits(model, x), y)``: the default objective."""
    return F.cross_entropy(logits(model, x), y)


def batch_seed(seed: int, round: int, client_id: int, phase: str = "local") -> int:
    """The seed of a client's batch order: ``((seed·1000 + round)·1000 + client_id) + index(phase)·2⁴⁰``.

    Identical for every method and engine, so equal parts see equal batches; the ``"local"`` phase (every one-phase
    protocol) gets ``(seed·1000 + round)·1000 + client_id`` exactly. Beyond ``torch.manual_seed``'s range (a round
    of 2⁶² on a long-lived node) the value is taken modulo 2⁶⁴.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    value = (int(seed) * 1_000 + int(round)) * 1_000 + int(client_id) + PHASES.index(phase) * (1 << 40)
    return value if -(1 << 63) <= value < (1 << 64) else value % (1 << 64)  # what torch.manual_seed takes


@dataclass(frozen=True)
class LocalTask:
    """What a trainer is told about the work to do (see the module docstring)."""

    client_id: int
    round: int
    seed: int  # the run's seed
    phase: str  # "local", or "personal" / "shared" (FedRep-style), or "finetune" (FedAvg-FT's deployment)
    batch_seed: int  # batch_seed(seed, round, client_id, phase)
    keys: Tuple[str, ...]  # the parameter names that train in this phase (requires_grad=True for the call)
    loss_fn: LossFn = cross_entropy_loss  # the protocol's objective
    epochs: Optional[int] = None  # overrides the trainer's epochs when set (e.g. FedRep's head epochs)


#: ``trainer(model, data, task) -> mean loss | {"loss": ..., ...}``
Trainer = Callable[[nn.Module, Any, LocalTask], Union[float, Mapping[str, float]]]


@contextlib.contextmanager
def kept(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block on ``model`` and put back what it may change: the trainable parameters, the buffers, the
    ``requires_grad`` flags and torch's RNG (frozen parameters are not copied: nothing trains them). One message per
    round evaluates the previous round's deployment this way before training (``fedpeft.flower``)."""
    keep = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    snapshot = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if k in keep}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    rng = torch.random.get_rng_state()
    try:
        yield model
    finally:
        model.load_state_dict(snapshot, strict=False)
        for k, p in model.named_parameters():
            p.requires_grad_(flags[k])
        torch.random.set_rng_state(rng)


def _loader(data: Any, batch_size: int, seed: Optional[int]) -> DataLoader:
    # an explicit generator also for the unshuffled loader: DataLoader would otherwise draw its base seed from the
    # global RNG, and evaluation must not move anything else's randomness
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    return DataLoader(data, batch_size=batch_size, shuffle=seed is not None, generator=g)


def _identity(x: Tensor) -> Tensor:
    return x


def _device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (batches are moved there; CPU for a parameter-less model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Any, *, preprocess: Optional[Callable[[Tensor], Tensor]] = None, batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (a map-style dataset of ``(x, y)``), in [0, 1]; leaves ``eval()`` on."""
    pre, dev = preprocess or _identity, _device(model)
    model.eval()
    correct = total = 0
    for x, y in _loader(data, batch_size, None):
        x, y = x.to(dev), y.to(dev)
        correct += int((logits(model, pre(x)).argmax(-1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


class LocalTrainer:
    """The default trainer: ``epochs`` epochs of ``task.loss_fn`` with a fresh optimizer, seeded batch order.

    Args:
        epochs: local epochs per call (``task.epochs`` overrides it).
        batch_size: training batch size.
        optimizer: ``"AdamW"``, ``"Adam"`` or ``"SGD"`` (case-insensitive).
        lr: learning rate of everything that trains and is not a pre-trained backbone parameter.
        lr_backbone: learning rate of the pre-trained timm ViT's parameters (all but its classifier) when they train
            (FedAvg, FedPerfix, FedRep's body, ...). ``None``: ``lr`` for everything (also for non-timm models).
        weight_decay: the optimizer's weight decay.
        momentum: SGD's momentum (ignored by Adam/AdamW).
        preprocess: applied to every input batch before the model, in training and in :meth:`evaluate` (e.g.
            resize + normalize), after the batch is moved to the model's device (a module: put it there too);
            ``None`` feeds the batches as they come.
        eval_batch_size: batch size of :meth:`evaluate`.
    """

    def __init__(
        self,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        optimizer: str = "AdamW",
        lr: float = 5e-3,
        lr_backbone: Optional[float] = None,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        preprocess: Optional[Callable[[Tensor], Tensor]] = None,
        eval_batch_size: int = 256,
    ) -> None:
        self.epochs = check_positive_int("epochs", epochs)
        self.batch_size = check_positive_int("batch_size", batch_size)
        kinds = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
        if not isinstance(optimizer, str) or optimizer.lower() not in kinds:
            raise ValueError(f"optimizer must be one of 'AdamW', 'Adam', 'SGD', got {optimizer!r}")
        self.optimizer = optimizer
        self._opt_cls = kinds[optimizer.lower()]
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if lr_backbone is not None and (isinstance(lr_backbone, bool) or not isinstance(lr_backbone, (int, float))
                                        or lr_backbone < 0):
            raise ValueError(f"lr_backbone must be None or a number >= 0, got {lr_backbone!r}")
        self.lr, self.lr_backbone = float(lr), None if lr_backbone is None else float(lr_backbone)
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)
        self.preprocess = preprocess
        self.eval_batch_size = check_positive_int("eval_batch_size", eval_batch_size)

    def __repr__(self) -> str:
        return (
            f"LocalTrainer(epochs={self.epochs}, batch_size={self.batch_size}, optimizer={self.optimizer!r}, "
            f"lr={self.lr:g}, lr_backbone={self.lr_backbone}, weight_decay={self.weight_decay:g})"
        )

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s parameters with ``requires_grad``: ``[backbone group, new group]``."""
        groups: List[dict] = [{"params": [], "lr": self.lr_backbone}, {"params": [], "lr": self.lr}]
        pretrained = set()
        if self.lr_backbone is not None:
            vit = _timm.as_vision_transformer(innermost(model))
            head = _freeze.classifier_param_ids(vit)
            pretrained = {id(p) for p in vit.parameters() if id(p) not in head}
        for p in model.parameters():
            if p.requires_grad:
                groups[0 if id(p) in pretrained else 1]["params"].append(p)
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
        extra = {"momentum": self.momentum} if self._opt_cls is torch.optim.SGD else {}
        return self._opt_cls(groups, weight_decay=self.weight_decay, **extra)

    def __call__(self, model: nn.Module, data: Any, task: LocalTask) -> float:
        """Train ``model`` in place on ``data``; returns the mean training loss over the steps."""
        opt = self.make_optimizer(model)
        loader = _loader(data, self.batch_size, task.batch_seed)
        pre, dev = self.preprocess or _identity, _device(model)
        model.train()
        total, n = 0.0, 0
        for _ in range(task.epochs or self.epochs):
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)  # no-op when the data already lives there
                loss = task.loss_fn(model, pre(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + float(loss.detach()), n + 1
        model.eval()
        return total / max(n, 1)

    def evaluate(self, model: nn.Module, data: Any) -> float:
        """Top-1 accuracy on ``data`` with this trainer's ``preprocess``."""
        return evaluate(model, data, preprocess=self.preprocess, batch_size=self.eval_batch_size)
