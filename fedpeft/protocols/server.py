"""The ``Server`` interface every protocol's server implements, and its checkpoint format.

A server is what ``protocol.make_server(model, num_clients=C, seed=s)`` returns: :class:`AveragingServer` (FedAvg over
the shared keys) or :class:`PFedPGServer` (pFedPG's generator). Every engine talks to it through these members only::

    server.payloads(ids)      -> {id: state}   what each sampled client receives this round (may keep a graph)
    server.update(replies)    -> ServerReport  screen the replies, then one server step on the accepted ones
    server.deployment(ids)    -> {id: state}   what each client deploys with (no side effect)
    server.expected_upload                     keys, shapes and dtypes every upload must have (values unused)
    server.round                               how many rounds ``update`` closed (with or without accepted replies)
    server.max_weight                          the largest weight a reply may claim (``None``: no cap); settable
    server.own_params                          parameters only the server trains (pFedPG's generator; 0 for FedAvg)
    server.state_dict()       -> (tensors, meta)
    server.load_state_dict(tensors, meta)

``state_dict`` returns the whole server state between rounds as ``(tensors, meta)``: ``tensors`` a flat
``Dict[str, Tensor]`` of contiguous CPU tensors that share no memory (``safetensors.torch.save_file`` takes it as
is) and ``meta`` a JSON-able dict (``json.dumps`` takes it as is): the round counter, the kind of server, and for
pFedPG the generator, its optimizer's state and hyper-parameters. ``load_state_dict`` checks everything (kind, keys,
shapes, dtypes) before changing anything: a bad checkpoint raises ``ValueError`` and leaves the server as it was.
The batch of a round in flight (between ``payloads`` and ``update``) is not part of it: checkpoint between rounds.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor

from .records import ServerReport

__all__ = ["Server", "flatten_optimizer", "unflatten_optimizer"]

State = Dict[str, Tensor]


@runtime_checkable
class Server(Protocol):
    """What every protocol's server offers (see the module docstring); ``isinstance(x, Server)`` checks the members."""

    round: int
    max_weight: Optional[float]

    @property
    def own_params(self) -> int: ...

    @property
    def expected_upload(self) -> Mapping[str, Tensor]: ...

    def payloads(self, client_ids: Iterable[int]) -> Dict[int, State]: ...

    def deployment(self, client_ids: Iterable[int]) -> Dict[int, State]: ...

    def update(self, replies: Iterable[Any]) -> ServerReport: ...

    def state_dict(self) -> Tuple[State, Dict[str, Any]]: ...

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None: ...


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (JSON has no tuples); refuses what JSON cannot hold."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"optimizer hyper-parameter of type {type(value).__name__} cannot be checkpointed as JSON")


def flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str = "optimizer.") -> Tuple[State, Dict[str, Any]]:
    """An optimizer's ``state_dict()`` as ``(tensors, meta)``: per-parameter tensors under
    ``"<prefix><param index>.<name>"``; its non-tensor state entries and ``param_groups`` in ``meta``."""
    sd = optimizer.state_dict()
    tensors: State = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        for name, v in entries.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}{idx}.{name}"] = v.detach().to("cpu").clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = _plain(v)
    groups = [{k: _plain(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
                        prefix: str = "optimizer.") -> Dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`: an optimizer ``state_dict()`` for ``load_state_dict``."""
    state: Dict[int, Dict[str, Any]] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, _, name = key[len(prefix):].partition(".")
        state.setdefault(int(idx), {})[name] = t.clone()
    for idx, entries in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}
