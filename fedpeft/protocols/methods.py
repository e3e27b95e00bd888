"""Every method by name, and the one call that answers "what does a client send per round for method X".

==================  =====================================================  ====================  =====================
method              client model (built by the user / the benchmark)       personal (kept)       upload (per round)
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

``upload_keys(model, "pFedPG")`` is ``["prompts"]``: pFedPG *does* send its prompts every round. (``fed.personal_keys(m,
"pfedpg")`` lists prompts as "not averaged", which is true but is not the upload; use this module's call.)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .. import fed
from ..fedpgp import fedpgp_forward
from ..losses import knowledge_guided_loss
from .pfedpg import PFedPG
from .protocol import Protocol, _subset
from .shared_personal import FedAvgFT, SharedPersonal
from .training import LossFn

__all__ = ["METHODS", "fedpgp_loss", "get", "upload_keys", "upload_state"]


def fedpgp_loss(mu: float = 1.0, temperature: float = 0.5) -> LossFn:
    """FedPGP's client objective (Cui et al., ICML 2024): ``CE(logits, y) + μ · knowledge_guided_loss(τ)``.

    ``logits`` and the three feature sets come from :func:`fedpeft.fedpgp_forward` (three backbone passes).
    """

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        out = fedpgp_forward(model, x)
        kgl = knowledge_guided_loss(out.f_anchor, out.f_global, out.f_personal, temperature=temperature)
        return F.cross_entropy(out.logits, y) + mu * kgl

    return loss


def _fedpgp(**options: Any) -> Protocol:
    mu, temperature = options.pop("mu", 1.0), options.pop("temperature", 0.5)
    return SharedPersonal(["fedpgp"], name="FedPGP", loss_fn=fedpgp_loss(mu, temperature), **options)


_TABLE: Dict[str, Callable[..., Protocol]] = {
    "Local": lambda **o: SharedPersonal(["*"], name="Local", **o),
    "SingleSet-VPT": lambda **o: SharedPersonal(["*"], name="SingleSet-VPT", **o),
    "FedAvg": lambda **o: SharedPersonal(["fedavg"], name="FedAvg", **o),
    "FedAvg-FT": lambda **o: FedAvgFT(**o),
    "FedRep": lambda **o: SharedPersonal(["fedrep"], name="FedRep", personal_first=True, **o),
    "FedVPT": lambda **o: SharedPersonal(["fedvpt"], name="FedVPT", **o),
    "FedVPT-deep": lambda **o: SharedPersonal(["fedvpt"], name="FedVPT-deep", **o),
    "pFedPG": lambda **o: PFedPG(**o),
    "FedPerfix": lambda **o: SharedPersonal(["fedperfix"], name="FedPerfix", **o),
    "FedPGP": _fedpgp,
    "VanillaAttention": lambda **o: SharedPersonal(["vanilla_attention"], name="VanillaAttention", **o),
}

#: every method name :func:`get` knows (case-insensitive)
METHODS = tuple(_TABLE)


def get(method: Union[str, Protocol], **options: Any) -> Protocol:
    """The protocol of ``method`` (a name in :data:`METHODS`, case-insensitive; a ``Protocol`` is returned as is).

    ``options`` go to the protocol's constructor, e.g. ``get("pFedPG", server_optimizer="Adam", server_lr=1e-2)``,
    ``get("FedPGP", mu=1.0, temperature=0.5)``, ``get("FedRep", personal_epochs=10, shared_epochs=1)``,
    ``get("FedAvg-FT", finetune_epochs=1)``.

    Raises:
        ValueError: an unknown name. TypeError: options the protocol does not take, or options with a ``Protocol``.
    """
    if isinstance(method, Protocol):
        if options:
            raise TypeError("options are for a method name; this is already a Protocol")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a Protocol, got {type(method).__name__}")
    lower = {m.lower(): m for m in _TABLE}
    if method.lower() not in lower:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return _TABLE[lower[method.lower()]](**options)


def upload_keys(model: nn.Module, method: Union[str, Protocol]) -> List[str]:
    """The sorted state-dict keys a client of ``method`` sends every round (see the module table).

    Example: ``upload_keys(VPT(vit, num_prompts=10), "pFedPG") == ["prompts"]``.
    """
    return get(method).upload_keys(model)


def upload_state(model: nn.Module, method: Union[str, Protocol]) -> Dict[str, Tensor]:
    """Detached copies of what a client of ``method`` sends every round, from ``model``'s current values.

    ``fed.num_params(upload_state(model, m))`` / ``fed.num_bytes(...)`` is the per-round upload cost.
    """
    return _subset(fed.trainable_state(model), upload_keys(model, method))
