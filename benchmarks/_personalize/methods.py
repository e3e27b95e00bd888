"""The methods of the benchmark: a client model built from fedpeft's public API, and its library protocol.

Every protocol (what a client loads, trains, uploads and keeps; what the server does) is
``fedpeft.protocols.get(name)``; this module only builds each method's model from the budget, the same way for every
engine (the in-process loop here, Flower's ClientApp), and picks the budget's options:

=================  ===============================================  =========================  ====================
method             client model                                     personal (kept)            upload (per round)
=================  ===============================================  =========================  ====================
Local              ``VPT(vit, num_prompts=0)`` (linear probe)       head                       nothing
SingleSet-VPT      ``VPT(vit, num_prompts=K)``                      prompts, head              nothing
FedAvg             the timm ViT, all trainable                      nothing                    everything
FedAvg-FT          the same; deployed = global fine-tuned locally   nothing                    everything
FedRep             the same; head epochs, then body epochs          head                       the body
FedVPT             ``VPT(vit, num_prompts=K)``                      head                       prompts
FedVPT-deep        ``VPT(vit, num_prompts=K, deep=True)``           head                       prompts (every layer)
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

from fedpeft import VPT, LowRankPrompt, ParallelPrefix, fed, protocols

from .backbone import Backbone
from .config import Budget
from .data import ClientData

__all__ = ["Context", "build_model", "make_protocol", "method_costs"]


@dataclass
class Context:
    """What every method receives: the backbone factory, the clients, the shared budget, the seed."""

    backbone: Backbone
    clients: List[ClientData]
    budget: Budget
    seed: int


def _vpt(ctx: Context, num_prompts: int, deep: bool = False) -> nn.Module:
    return VPT(ctx.backbone.make(), num_prompts=num_prompts, deep=deep)


def _fedperfix(ctx: Context) -> nn.Module:
    vit, b = ctx.backbone.make(), ctx.budget
    return ParallelPrefix(vit, bottleneck=b.bottleneck(vit.embed_dim), scale=b.prefix_scale, train_backbone=True)


def _fedpgp(ctx: Context) -> nn.Module:
    vit, b = ctx.backbone.make(), ctx.budget
    prompts = LowRankPrompt(num_prompts=b.num_prompts, embed_dim=vit.embed_dim, rank=b.lowrank_rank)
    return VPT(vit, num_prompts=b.num_prompts, prompts=prompts)


_MODELS: Dict[str, Callable[[Context], nn.Module]] = {
    "Local": lambda ctx: _vpt(ctx, 0),
    "SingleSet-VPT": lambda ctx: _vpt(ctx, ctx.budget.num_prompts),
    "FedAvg": lambda ctx: ctx.backbone.make(),
    "FedAvg-FT": lambda ctx: ctx.backbone.make(),
    "FedRep": lambda ctx: ctx.backbone.make(),
    "FedVPT": lambda ctx: _vpt(ctx, ctx.budget.num_prompts),
    "FedVPT-deep": lambda ctx: _vpt(ctx, ctx.budget.num_prompts, deep=True),
    "pFedPG": lambda ctx: _vpt(ctx, ctx.budget.num_prompts),
    "FedPerfix": _fedperfix,
    "FedPGP": _fedpgp,
    "VanillaAttention": lambda ctx: ctx.backbone.make(),
}


def build_model(name: str, ctx: Context) -> nn.Module:
    """Method ``name``'s client model, built under ``torch.manual_seed(ctx.seed)`` (identical in every process)."""
    if name not in _MODELS:
        raise ValueError(f"unknown method {name!r}; known: {list(_MODELS)}")
    torch.manual_seed(ctx.seed)
    return _MODELS[name](ctx)


def make_protocol(name: str, budget: Budget) -> protocols.Protocol:
    """The library protocol of method ``name`` with the budget's method-specific options."""
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
    """Parameter counts per client: trainable, communicated (uploaded per round), server-only; and the personal keys."""
    generator = getattr(server, "generator", None)
    return {
        "trainable": fed.num_params(fed.trainable_state(model)),
        "communicated": fed.num_params(protocols.upload_state(model, protocol)),
        "server": sum(p.numel() for p in generator.parameters()) if generator is not None else 0,
        "personal_keys": protocol.personal_keys(model),
    }
