"""Run every method for the same number of rounds with the in-process engine, one progress bar over methods × rounds.

Each method is its library protocol (``fedpeft.protocols``) run by ``fedpeft.protocols.Federation``: per round the
sampled clients (``--fraction``, :func:`fedpeft.protocols.sample_clients`) train and reply, the server updates, then
every client's *deployed* model (latest shared state + own personal state; pFedPG: its generated prompts; FedAvg-FT:
the global model fine-tuned locally) is evaluated on its own test split. Each participant's model right after its
local training is evaluated too (the "after local training" protocol). Every method's model is built under the same
torch seed, so equal parts (heads, batch orders) start equal.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from fedpeft.protocols import Federation

from .methods import Context, build_model, make_protocol, method_costs
from .train import make_trainer

__all__ = ["MethodResult", "run_method"]


@dataclass
class MethodResult:
    """One row of the table, plus its curves and per-round logs."""

    name: str
    accuracy: List[float]  # per client, deployed model, after the last round
    curve: List[float]  # mean client accuracy (deployed) after each round
    curve_clients: List[List[float]]  # per round, per client (deployed)
    trainable: int  # parameters a client optimizes
    communicated: int  # parameters a client uploads per round
    server: int  # parameters only the server trains (pFedPG's generator)
    wall_s: float  # construction + rounds + evaluations
    personal_keys: List[str] = field(default_factory=list)
    # per round, per client: the accuracy right after that client's local training (None: not sampled that round)
    curve_after_local: List[List[Optional[float]]] = field(default_factory=list)
    # per client: the after-local-training accuracy of the last round it trained in (None: never sampled)
    accuracy_after_local: List[Optional[float]] = field(default_factory=list)
    participants: List[List[int]] = field(default_factory=list)  # per round, the sampled clients
    train_loss: List[List[Optional[float]]] = field(default_factory=list)  # per round, per client
    server_log: List[Dict[str, Any]] = field(default_factory=list)  # per round: accepted, rejected, diagnostics

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracy)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracy) if len(self.accuracy) > 1 else 0.0

    def as_dict(self) -> Dict:
        return {**asdict(self), "mean": self.mean, "std": self.std}


def run_method(name: str, ctx: Context, rounds: int, on_round: Callable[[float], None] = lambda acc: None
               ) -> MethodResult:
    """Build method ``name`` and run it for ``rounds`` rounds; ``on_round(mean deployed accuracy)`` after each."""
    t0 = time.perf_counter()
    model = build_model(name, ctx)
    protocol = make_protocol(name, ctx)
    engine = Federation(
        protocol, model, [c.train for c in ctx.clients], test_data=[c.test for c in ctx.clients],
        trainer=make_trainer(ctx.budget, ctx.backbone.preprocess), seed=ctx.seed, fraction=ctx.budget.fraction,
    )
    costs = method_costs(protocol, model, engine.server)
    n = len(ctx.clients)
    result = MethodResult(name=name, accuracy=[], curve=[], curve_clients=[], wall_s=0.0, **costs)
    last_after: List[Optional[float]] = [None] * n
    for r in range(rounds):
        rec = engine.run_round(r)
        result.curve_clients.append(rec.deployed)
        result.curve.append(statistics.fmean(rec.deployed))
        result.curve_after_local.append([rec.after_local.get(c) for c in range(n)])
        result.train_loss.append([rec.train_loss.get(c) for c in range(n)])
        result.participants.append(rec.participants)
        result.server_log.append(rec.server.as_dict())
        for c, acc in rec.after_local.items():
            last_after[c] = acc
        on_round(result.curve[-1])
    result.accuracy = result.curve_clients[-1]
    result.accuracy_after_local = last_after
    result.wall_s = time.perf_counter() - t0
    return result

