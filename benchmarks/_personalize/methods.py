"""The methods of the benchmark: a client model built from fedpeft's public API, and its library protocol.

Every protocol (what a client loads, trains, uploads and keeps; what the server does) is
``fedpeft.protocols.get(name)``, except two built here from the library's ``SharedPersonal``: Local-FT (everything
personal) and the clustered oracle (:mod:`.oracle`, one averaging server per shift family). This module builds each
method's model from the budget, the same way for every engine (the in-process loop here, Flower's ClientApp), and
picks the budget's options:

=================  ===============================================  =========================  ====================
method             client model                                     personal (kept)            upload (per round)
=================  ===============================================  =========================  ====================
Local              ``VPT(vit, num_prompts=0)`` (linear probe)       head                       nothing
Local-FT           the timm ViT, all trainable (the papers' Local)  everything                 nothing
SingleSet-VPT      ``VPT(vit, num_prompts=K)``                      prompts, head              nothing
FedAvg             the timm ViT, all trainable                      nothing                    everything
FedAvg-FT          the same; deployed = global fine-tuned locally   nothing                    everything
FedRep             the same; head epochs, then body epochs          head                       the body
FedVPT             ``VPT(vit, num_prompts=K)``                      head                       prompts
FedVPT-deep        ``VPT(vit, num_prompts=K, deep=True)``           head                       prompts (every layer)
Clustered-FedVPT   ``VPT(vit, num_prompts=K)``                      head                       prompts (family avg.)
pFedPG             ``VPT(vit, num_prompts=K)``                      head                       trained prompts P̃_n
FedPerfix          ``ParallelPrefix(vit, train_backbone=True)``     adapters, head             backbone
FedPGP             ``VPT(vit, prompts=LowRankPrompt(...))``         U, V, head                 σ
VanillaAttention   the timm ViT, all trainable                      attention, head            the rest
=================  ===============================================  =========================  ====================

:func:`build_model` seeds torch with the run's seed first, so a model built in another process (a Flower node) holds
the same initial values (heads, prompts, U and V); pFedPG's generator is then drawn from the same RNG stream by
``protocol.make_server(model, num_clients=C)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from torch import nn

from fedpeft import VPT, protocols
from fedpeft.protocols.shared_personal import SharedPersonal

from .backbone import Backbone
from .config import Budget
from .data import ClientData
from .oracle import ClusteredFedVPT

__all__ = ["Context", "build_model", "make_protocol", "method_costs"]


@dataclass
class Context:
    """What every method receives: the backbone factory, the clients, the shared budget, the seed."""

    backbone: Backbone
    clients: List[ClientData]
    budget: Budget
    seed: int


#: the benchmark's own methods (everything else is an entry of ``fedpeft.protocols.REGISTRY``)
_OWN: Dict[str, Callable[[Context], nn.Module]] = {
    "Local-FT": lambda ctx: ctx.backbone.make(),
    "Clustered-FedVPT": lambda ctx: VPT(ctx.backbone.make(), num_prompts=ctx.budget.num_prompts),
}


def _registry_model(name: str, ctx: Context) -> nn.Module:
    vit, b = ctx.backbone.make(), ctx.budget
    return protocols.method(name).build(vit, num_prompts=b.num_prompts, bottleneck=b.bottleneck(vit.embed_dim),
                                        prefix_scale=b.prefix_scale, rank=b.lowrank_rank)


def build_model(name: str, ctx: Context) -> nn.Module:
    """Method ``name``'s client model, built under ``torch.manual_seed(ctx.seed)`` (identical in every process)."""
    known = [*protocols.METHODS, *_OWN]
    if name not in known:
        raise ValueError(f"unknown method {name!r}; known: {known}")
    torch.manual_seed(ctx.seed)
    return _OWN[name](ctx) if name in _OWN else _registry_model(name, ctx)


def make_protocol(name: str, ctx: Context) -> protocols.Protocol:
    """The protocol of method ``name`` with the budget's method-specific options (the library's, except Local-FT
    and the clustered oracle, which are built here from the library's ``SharedPersonal``)."""
    budget = ctx.budget
    if name == "Local-FT":
        return SharedPersonal(["*"], name="Local-FT")  # the whole model, personal: nothing is sent
    if name == "Clustered-FedVPT":
        families = [c.family for c in ctx.clients]
        if not all(families):
            raise ValueError("Clustered-FedVPT needs every client's shift family (--split domain)")
        return ClusteredFedVPT(families)
    if name == "pFedPG" and budget.generator_optimizer in ("default", "paper"):  # the library's recipes
        recipe = "fedpeft" if budget.generator_optimizer == "default" else "paper"
        return protocols.get(name, recipe=recipe, descriptor_tokens=budget.generator_descriptor_tokens)
    if name == "pFedPG":
        return protocols.get(name, server_optimizer=budget.generator_optimizer, server_lr=budget.generator_lr,
                             descriptor_tokens=budget.generator_descriptor_tokens)
    if name == "FedPGP":
        return protocols.get(name, mu=budget.fedpgp_mu, temperature=budget.fedpgp_temperature)
    return protocols.get(name)


def method_costs(protocol: protocols.Protocol, model: nn.Module, server: object) -> Dict[str, object]:
    """Parameter counts per client: trainable, communicated (uploaded per round), server-only; and the personal keys
    (``fedpeft.protocols.method_costs``)."""
    return protocols.method_costs(protocol, model, server)
