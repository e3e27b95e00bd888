"""Every method in one place: the registry. One :class:`Method` entry per method holds everything that differs.

==================  =====================================================  ====================  =====================
method              client model (``Method.build(vit, ...)``)              personal (kept)       upload (per round)
==================  =====================================================  ====================  =====================
Local               ``VPT(vit, num_prompts=0)`` (a linear probe)           everything trainable  nothing
SingleSet-VPT       ``VPT(vit, num_prompts=K)``                            everything trainable  nothing
FedAvg              the timm ViT, all trainable                            nothing               everything
FedAvg-FT           the timm ViT; deployed = global fine-tuned locally     nothing               everything
FedRep              the timm ViT; head epochs, then body epochs            head                  the body
FedVPT(-deep)       ``VPT(vit, num_prompts=K[, deep=True])``               head                  prompts
pFedPG              ``VPT(vit, num_prompts=K)``                            head                  trained prompts P̃_n
FedPerfix           ``ParallelPrefix(vit, train_backbone=True)``           adapters, head        the backbone
FedPGP              ``VPT(vit, num_prompts=K, prompts=LowRankPrompt(…))``  U, V, head            σ (global prompt)
VanillaAttention    the timm ViT, all trainable                            attention, head       the rest
==================  =====================================================  ====================  =====================

An entry (:data:`REGISTRY`, :func:`method`) holds the method's

- ``name``;
- ``build(vit, *, num_prompts, bottleneck, prefix_scale, rank)``: its client model around a timm ViT (the benchmark,
  the Flower example and the tests all build through it);
- ``key_split``: the ``fed.personal_keys`` patterns of its personal part (``fed.PRESETS`` names), resolved on the
  trainable parameters (pFedPG: ``"pfedpg"``, the head; its prompts go up every round as P̃ and are not averaged);
- ``server``: ``"averaging"`` (:class:`AveragingServer`) or ``"generator"`` (:class:`PFedPGServer`);
- ``protocol(**options)``: its :class:`Protocol`, whose ``phases(model)`` and ``deploy_phases(model)`` are the local
  training and deployment work (FedAvg-FT: a ``"finetune"`` phase before every evaluation);
- ``costs(model, server)``: parameters trained, communicated per round, trained on the server, and the personal keys.

Adding a method is one entry here (plus its protocol class if none of the existing ones fits).
``upload_keys(model, "pFedPG")`` is ``["prompts"]``: pFedPG *does* send its prompts every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .. import fed
from ..fedpgp import fedpgp_forward
from ..losses import knowledge_guided_loss
from ..lowrank import LowRankPrompt
from ..parallel_prefix import ParallelPrefix
from ..vpt import VPT
from .pfedpg import PFedPG
from .protocol import Protocol, _subset
from .server import Server
from .shared_personal import FedAvgFT, SharedPersonal
from .training import LossFn

__all__ = ["METHODS", "REGISTRY", "Method", "fedpgp_loss", "get", "method", "method_costs", "upload_keys",
           "upload_state"]


def fedpgp_loss(mu: float = 1.0, temperature: float = 0.5) -> LossFn:
    """FedPGP's client objective (Cui et al., ICML 2024): ``CE(logits, y) + μ · knowledge_guided_loss(τ)``.

    ``logits`` and the three feature sets come from :func:`fedpeft.fedpgp_forward` (three backbone passes).
    """

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        out = fedpgp_forward(model, x)
        kgl = knowledge_guided_loss(out.f_anchor, out.f_global, out.f_personal, temperature=temperature)
        return F.cross_entropy(out.logits, y) + mu * kgl

    return loss


def method_costs(protocol: Protocol, model: nn.Module, server: Server) -> Dict[str, Any]:
    """Per client: ``trainable`` parameters, ``communicated`` (uploaded per round), ``server`` (parameters only the
    server trains: pFedPG's generator), and the sorted ``personal_keys``."""
    return {
        "trainable": fed.num_params(fed.trainable_state(model)),
        "communicated": fed.num_params(upload_state(model, protocol)),
        "server": int(server.own_params),
        "personal_keys": protocol.personal_keys(model),
    }


# ---- client models ---------------------------------------------------------------------------------------------------

def _vit(vit: nn.Module, **_: Any) -> nn.Module:
    return vit


def _vpt(k: Optional[int] = None, deep: bool = False) -> Callable[..., nn.Module]:
    def build(vit: nn.Module, *, num_prompts: int, **_: Any) -> nn.Module:
        return VPT(vit, num_prompts=num_prompts if k is None else k, deep=deep)
    return build


def _fedperfix(vit: nn.Module, *, bottleneck: int, prefix_scale: float, **_: Any) -> nn.Module:
    return ParallelPrefix(vit, bottleneck=bottleneck, scale=prefix_scale, train_backbone=True)


def _fedpgp_model(vit: nn.Module, *, num_prompts: int, rank: int, **_: Any) -> nn.Module:
    from .. import _timm

    prompts = LowRankPrompt(num_prompts=num_prompts, embed_dim=_timm.embed_dim(vit), rank=rank)
    return VPT(vit, num_prompts=num_prompts, prompts=prompts)


@dataclass(frozen=True)
class Method:
    """One method's registry entry (see the module docstring)."""

    name: str
    model: Callable[..., nn.Module] = field(repr=False)
    key_split: Tuple[str, ...]
    server: str = "averaging"
    make: Optional[Callable[..., Protocol]] = field(default=None, repr=False)  # default: SharedPersonal(key_split)

    def build(self, vit: nn.Module, *, num_prompts: int = 10, bottleneck: int = 256, prefix_scale: float = 1.5,
              rank: int = 8) -> nn.Module:
        """The client model around ``vit`` (taken as is: build it under a fixed seed for identical clients).

        ``num_prompts`` K (VPT methods), ``bottleneck`` and ``prefix_scale`` (FedPerfix), ``rank`` (FedPGP's U V);
        the options a method does not use are ignored."""
        return self.model(vit, num_prompts=num_prompts, bottleneck=bottleneck, prefix_scale=prefix_scale, rank=rank)

    def protocol(self, **options: Any) -> Protocol:
        """The method's :class:`Protocol` (``options``: its constructor's, e.g. ``server_lr=`` for pFedPG)."""
        if self.make is not None:
            return self.make(**options)
        return SharedPersonal(list(self.key_split), name=self.name, **options)

    def costs(self, model: nn.Module, server: Server, protocol: Optional[Protocol] = None) -> Dict[str, Any]:
        """:func:`method_costs` of this method (``protocol``: one built with options, default ``protocol()``)."""
        return method_costs(protocol or self.protocol(), model, server)


def _fedpgp(**options: Any) -> Protocol:
    mu, temperature = options.pop("mu", 1.0), options.pop("temperature", 0.5)
    return SharedPersonal(["fedpgp"], name="FedPGP", loss_fn=fedpgp_loss(mu, temperature), **options)


_ENTRIES = (
    Method("Local", _vpt(k=0), ("*",)),
    Method("SingleSet-VPT", _vpt(), ("*",)),
    Method("FedAvg", _vit, ("fedavg",)),
    Method("FedAvg-FT", _vit, ("fedavg",), make=lambda **o: FedAvgFT(**o)),
    Method("FedRep", _vit, ("fedrep",), make=lambda **o: SharedPersonal(["fedrep"], name="FedRep",
                                                                         personal_first=True, **o)),
    Method("FedVPT", _vpt(), ("fedvpt",)),
    Method("FedVPT-deep", _vpt(deep=True), ("fedvpt",)),
    Method("pFedPG", _vpt(), ("pfedpg",), server="generator", make=lambda **o: PFedPG(**o)),
    Method("FedPerfix", _fedperfix, ("fedperfix",)),
    Method("FedPGP", _fedpgp_model, ("fedpgp",), make=_fedpgp),
    Method("VanillaAttention", _vit, ("vanilla_attention",)),
)

#: every method's entry by name, in the benchmark's order
REGISTRY: Mapping[str, Method] = MappingProxyType({m.name: m for m in _ENTRIES})

#: every method name :func:`get` knows (case-insensitive)
METHODS = tuple(REGISTRY)


def method(name: str) -> Method:
    """The registry entry of ``name`` (case-insensitive). Raises ``ValueError`` naming the known methods."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), got {type(name).__name__}")
    lower = {m.lower(): m for m in REGISTRY}
    if name.lower() not in lower:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return REGISTRY[lower[name.lower()]]


def get(method_: Union[str, Protocol], **options: Any) -> Protocol:
    """The protocol of ``method_`` (a name in :data:`METHODS`, case-insensitive; a ``Protocol`` is returned as is).

    ``options`` go to the protocol's constructor, e.g. ``get("pFedPG", server_optimizer="Adam", server_lr=1e-2)``,
    ``get("FedPGP", mu=1.0, temperature=0.5)``, ``get("FedRep", personal_epochs=10, shared_epochs=1)``,
    ``get("FedAvg-FT", finetune_epochs=1)``.

    Raises:
        ValueError: an unknown name. TypeError: options the protocol does not take, or options with a ``Protocol``.
    """
    if isinstance(method_, Protocol):
        if options:
            raise TypeError("options are for a method name; this is already a Protocol")
        return method_
    if not isinstance(method_, str):
        raise TypeError(f"method must be a name or a Protocol, got {type(method_).__name__}")
    return method(method_).protocol(**options)


def upload_keys(model: nn.Module, method_: Union[str, Protocol]) -> List[str]:
    """The sorted state-dict keys a client of ``method_`` sends every round (see the module table).

    Example: ``upload_keys(VPT(vit, num_prompts=10), "pFedPG") == ["prompts"]``.
    """
    return get(method_).upload_keys(model)


def upload_state(model: nn.Module, method_: Union[str, Protocol]) -> Dict[str, Tensor]:
    """Detached copies of what a client of ``method_`` sends every round, from ``model``'s current values.

    ``fed.num_params(upload_state(model, m))`` / ``fed.num_bytes(...)`` is the per-round upload cost.
    """
    return _subset(fed.trainable_state(model), upload_keys(model, method_))
