"""The floating-point work a method's run needs, to compare its wall time with the machine's matmul rate.

Counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records the FLOPs of every matmul / attention
op (2 per multiply-add) of one training step (forward + loss + backward) and of one evaluation forward, on a batch of
the first client's images; per-image figures are scaled by the images a run processes::

    train = rounds · local_epochs · Σ_c |train_c| · step_flops / B
    eval  = rounds · evaluations · Σ_c |test_c|   · forward_flops / B

Element-wise work (norms, softmax, optimizer updates) is not counted: at these sizes the matmuls dominate the
count but not necessarily the time, which is what the "share of the matmul rate" in the report shows.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
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


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def _model_and_loss(method: Any) -> Tuple[nn.Module, Callable]:
    return method.model, getattr(method, "loss_fn", _ce)


def training_flops(name: str, ctx: Any, evaluations: int = 1) -> Dict[str, float]:
    """FLOPs of a whole run of method ``name`` in ``ctx`` (see the module docstring); a fresh, unused instance."""
    from .methods import registry

    torch.manual_seed(ctx.seed)
    model, loss_fn = _model_and_loss(registry()[name](ctx))
    first = ctx.clients[0].train
    batch = min(ctx.budget.batch_size, len(first))
    xs, ys = zip(*(first[i] for i in range(batch)))
    x, y = ctx.backbone.preprocess(torch.stack(xs)), torch.stack([torch.as_tensor(v) for v in ys])
    train, forward = step_flops(model, loss_fn, x, y)
    b = ctx.budget
    n_train = sum(len(c.train) for c in ctx.clients)
    n_test = sum(len(c.test) for c in ctx.clients)
    total_train = b.rounds * b.local_epochs * n_train * train / batch
    total_eval = b.rounds * evaluations * n_test * forward / batch
    return {"train": total_train, "eval": total_eval, "total": total_train + total_eval,
            "step_per_image": train / batch, "forward_per_image": forward / batch}


def matmul_rate(size: int = 512, seconds: float = 0.5) -> float:
    """FLOP/s of a square float32 ``torch.matmul`` on this process's threads (best of repeated calls)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
