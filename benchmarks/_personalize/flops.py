"""The floating-point work a method's run needs, to compare its wall time with the machine's matmul rate.

Counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records the FLOPs of every matmul / attention
op (2 per multiply-add) of one training step (forward + loss + backward) and of one evaluation forward, on a batch of
the first client's images; per-image figures are scaled by the images a run processes::

    train = rounds · fraction · Σ_c |train_c| · Σ_phases epochs · step_flops(phase) / B
    eval  = rounds · (1 + fraction) · Σ_c |test_c| · forward_flops / B       (deployed + after local training)

Element-wise work (norms, softmax, optimizer updates) is not counted: at these sizes the matmuls dominate the
count but not necessarily the time, which is what the "share of the matmul rate" in the report shows.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

__all__ = ["matmul_rate", "step_flops", "training_flops"]


class _Counter(FlopCounterMode):
    """``FlopCounterMode`` without its per-module breakdown: its module tracker registers backward hooks on module
    inputs and fails on some of them (prompt tensors made under ``no_grad``); only the total is needed here."""

    def __enter__(self) -> _Counter:
        self.flop_counts.clear()
        self.mode = _FlopCounterMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args: Any) -> Any:
        b = self.mode.__exit__(*args)
        self.mode = None
        return b


def step_flops(model: nn.Module, loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Tuple[int, int]:
    """(forward + backward FLOPs of one training step, FLOPs of one evaluation forward) on the batch ``x``."""
    was = model.training
    model.train()
    with _Counter(display=False) as counter:
        loss_fn(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    train = counter.get_total_flops()
    model.eval()
    with torch.no_grad(), _Counter(display=False) as counter:
        model(x)
    model.train(was)
    return int(train), int(counter.get_total_flops())


@contextmanager
def _only(model: nn.Module, keys: Sequence[str]) -> Iterator[None]:
    """Within the block only ``keys`` of the trainable parameters require gradients (one local-training phase)."""
    off = [p for n, p in model.named_parameters() if p.requires_grad and n not in set(keys)]
    for p in off:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in off:
            p.requires_grad_(True)


def training_flops(name: str, ctx: Any) -> Dict[str, float]:
    """FLOPs of a whole run of method ``name`` in ``ctx`` (see the module docstring), counted on a fresh model.

    Each local-training phase of the protocol (one for most methods; FedRep's head phase, then its body phase) and
    each deployment phase (``protocol.deploy_phases``: FedAvg-FT's fine-tuning before every evaluation) is counted
    with only its keys trainable. Two
    evaluations per round: the deployed model and the model after local training.
    """
    from .methods import build_model, make_protocol

    model, protocol = build_model(name, ctx), make_protocol(name, ctx)
    first = ctx.clients[0].train
    batch = min(ctx.budget.batch_size, len(first))
    xs, ys = zip(*(first[i] for i in range(batch)))
    x, y = ctx.backbone.preprocess(torch.stack(xs)), torch.stack([torch.as_tensor(v) for v in ys])
    b = ctx.budget
    epochs_flops, forward = 0.0, 0
    phases = list(protocol.phases(model)) + list(protocol.deploy_phases(model))  # FedAvg-FT: + its fine-tuning
    for _, keys, epochs in phases:
        if not keys:
            continue
        with _only(model, keys):
            step, forward = step_flops(model, protocol.loss_fn, x, y)
        epochs_flops += (epochs or b.local_epochs) * step
    if not forward:
        _, forward = step_flops(model, protocol.loss_fn, x, y)
    n_train = sum(len(c.train) for c in ctx.clients) * b.fraction
    n_test = sum(len(c.test) for c in ctx.clients)
    total_train = b.rounds * n_train * epochs_flops / batch
    total_eval = b.rounds * (n_test + n_test * b.fraction) * forward / batch
    return {"train": total_train, "eval": total_eval, "total": total_train + total_eval,
            "step_per_image": epochs_flops / batch, "forward_per_image": forward / batch}


def matmul_rate(size: int = 512, seconds: float = 0.5) -> float:
    """FLOP/s of a square float32 ``torch.matmul`` on this process's threads (best of repeated calls)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
