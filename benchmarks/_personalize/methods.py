"""The benchmark's methods: the library's registry entries, two of its own, and the tags that select them.

Every method is a :class:`fedpeft.protocols.Method` (client model + protocol: what a client loads, trains, uploads
and keeps; what the server does). :data:`METHODS` is ``fedpeft.protocols.REGISTRY`` plus two entries built here from
the library's ``Method`` and ``SharedPersonal``: **Local-FT** (the whole ViT trained alone, everything personal) and
**Clustered-FedVPT** (FedVPT whose server averages the prompts within each shift family, :class:`FamilyServer`).
Each entry carries **tags**, the only place method selections are written:

=================  ===============================================  ================  ===================  ==============
method             client model                                     personal (kept)   upload (per round)   tags
=================  ===============================================  ================  ===================  ==============
Local              ``VPT(vit, num_prompts=0)`` (linear probe)       head              nothing              d q p
Local-FT           the timm ViT, all trainable (the papers' Local)  everything        nothing              d b p
SingleSet-VPT      ``VPT(vit, num_prompts=K)``                      prompts, head     nothing              d q p
FedAvg             the timm ViT, all trainable                      nothing           everything           d b
FedVPT             ``VPT(vit, num_prompts=K)``                      head              prompts              d q p P
Clustered-FedVPT   ``VPT(vit, num_prompts=K)``                      head              prompts (family)     d q p P f
pFedPG             ``VPT(vit, num_prompts=K)`` + server generator   head              trained prompts P̃_n  d q
FedPerfix          ``ParallelPrefix(vit, train_backbone=True)``     adapters, head    backbone             d b P
VanillaAttention   the timm ViT, all trainable                      attention, head   the rest             d b P
FedVPT-deep        ``VPT(vit, num_prompts=K, deep=True)``           head              prompts (per layer)  P
FedPGP             ``VPT(vit, prompts=LowRankPrompt(...))``         U, V, head        σ                    P
FedRep             the timm ViT; head epochs, then body epochs      head              the body             b P
FedAvg-FT          FedAvg; deployed = global fine-tuned locally     nothing           everything           b P
=================  ===============================================  ================  ===================  ==============

Tags: ``d`` the default set (the primary claims' methods and the oracle), ``q`` ``--quick``, ``b`` trains the
whole backbone (several times a prompt method's work: queued first), ``p`` the regime pilot's, ``P`` personalized (each
compared with FedAvg), ``f`` needs shift families. :func:`build_model` seeds torch with the run's seed first, so a
model built in another process (a Flower node) holds the same initial values; pFedPG's generator is drawn next from
the same stream by ``protocol.make_server``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fedpeft import VPT, protocols
from fedpeft.protocols import Method, ServerReport
from fedpeft.protocols.shared_personal import AveragingServer, SharedPersonal

from .backbone import Backbone
from .config import Budget

__all__ = ["METHODS", "TAGS", "ClusteredFedVPT", "Context", "FamilyServer", "build_model", "make_protocol", "select"]


@dataclass
class Context:
    """What every method receives: the backbone factory, the clients, the shared budget, the seed."""

    backbone: Backbone
    clients: List[Any]  # data.ClientData
    budget: Budget
    seed: int


class FamilyServer(AveragingServer):
    """One ``AveragingServer`` per shift family; client ``n`` is served by ``families[n]``'s, which averages, weighted
    by example counts, only over its family's accepted replies (a family without one keeps its prompts)::

        P_{f, t+1} = Σ_{n ∈ accepted, fam(n) = f} w_n · P_n / Σ_{n ∈ accepted, fam(n) = f} w_n

    It is an ``AveragingServer`` (``shared`` is the first family's state, the common start), so the Flower strategy
    of the averaging methods runs it unchanged. pFedPG's generator has to *learn* such a grouping from client ids;
    this server is given it: the bound on what a generator can get from the families.
    """

    def __init__(self, initial: Mapping[str, Tensor], families: Sequence[str]) -> None:
        families = list(families)
        if not families or not all(isinstance(f, str) and f for f in families):
            raise ValueError(f"families must be a non-empty list of non-empty labels, one per client, got {families}")
        super().__init__(initial, num_clients=len(families))
        self.families = families
        self.servers: Dict[str, AveragingServer] = {
            f: AveragingServer(initial, num_clients=len(families)) for f in dict.fromkeys(families)
        }

    @property
    def shared(self) -> Dict[str, Tensor]:
        return self.servers[self.families[0]].shared

    def payloads(self, client_ids: Iterable[int]) -> Dict[int, Dict[str, Tensor]]:
        ids = list(super().payloads(client_ids))  # checks the ids
        return {cid: self.servers[self.families[cid]].shared for cid in ids}

    def deployment(self, client_ids: Iterable[int]) -> Dict[int, Dict[str, Tensor]]:
        return self.payloads(client_ids)

    def update(self, replies: Iterable[Any]) -> ServerReport:
        """Each family's server averages the replies of its clients (ids outside the range are rejected first)."""
        groups: Dict[str, List[Any]] = {f: [] for f in self.servers}
        report = ServerReport()
        for reply in replies:
            cid = reply[0] if isinstance(reply, tuple) and reply else None
            if isinstance(cid, int) and not isinstance(cid, bool) and 0 <= cid < len(self.families):
                groups[self.families[cid]].append(reply)
            else:  # let the screening of any family server word the reason
                groups[self.families[0]].append(reply)
        weight = 0.0
        self.round += 1
        for f, server in self.servers.items():
            r = server.update(groups[f])
            report.accepted += r.accepted
            report.rejected += r.rejected
            report.updated = report.updated or r.updated
            weight += r.diagnostics.get("total_weight", 0.0)
        report.accepted.sort()
        report.diagnostics["total_weight"] = weight
        return report

    def state_dict(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """``({"family.<i>.shared.<key>": tensor}, {"kind": "family-averaging", "round": r, "families": [...]})``."""
        tensors: Dict[str, Tensor] = {}
        for i, server in enumerate(self.servers.values()):
            t, _ = server.state_dict()
            tensors.update({f"family.{i}.{k}": v for k, v in t.items()})
        return tensors, {"kind": "family-averaging", "round": self.round, "families": list(self.servers)}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ``ValueError`` (server untouched) on another kind or families."""
        if not isinstance(meta, Mapping) or meta.get("kind") != "family-averaging":
            raise ValueError("meta: expected a family-averaging server's checkpoint")
        if list(meta.get("families", [])) != list(self.servers):
            raise ValueError(f"meta['families']: expected {list(self.servers)}, got {meta.get('families')}")
        staged = {}
        for i, (f, server) in enumerate(self.servers.items()):
            prefix = f"family.{i}."
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            copy = AveragingServer(server.shared, num_clients=len(self.families))
            copy.load_state_dict(part, {"kind": "averaging", "round": meta["round"]})  # checks before any change
            staged[f] = copy
        self.servers.update(staged)
        self.round = int(meta["round"])


class ClusteredFedVPT(SharedPersonal):
    """FedVPT's key split (prompts shared, head personal) with a :class:`FamilyServer`."""

    def __init__(self, families: Sequence[str], *, name: str = "Clustered-FedVPT") -> None:
        super().__init__(["fedvpt"], name=name)
        self.families = list(families)

    def make_server(self, model: nn.Module, *, num_clients: Optional[int] = None,
                    seed: Optional[int] = None) -> FamilyServer:
        """A :class:`FamilyServer` from ``model``'s current prompts (``seed``: the common signature; unused)."""
        if num_clients is not None and num_clients != len(self.families):
            raise ValueError(f"num_clients={num_clients} but {len(self.families)} clients have a family")
        return FamilyServer(self.initial_shared(model), self.families)


def _whole_vit(vit: nn.Module, **_: Any) -> nn.Module:
    return vit


def _vpt(vit: nn.Module, *, num_prompts: int, **_: Any) -> nn.Module:
    return VPT(vit, num_prompts=num_prompts)


_OWN = (
    Method("Local-FT", _whole_vit, ("*",)),
    Method("Clustered-FedVPT", _vpt, ("fedvpt",), make=lambda families=(), **o: ClusteredFedVPT(families, **o)),
)
#: every method the benchmark runs, in its table order, with its tags (the module docstring)
_TAGGED = (("Local", "dqp"), ("Local-FT", "dbp"), ("SingleSet-VPT", "dqp"), ("FedAvg", "db"), ("FedVPT", "dqpP"),
           ("Clustered-FedVPT", "dqpPf"), ("pFedPG", "dq"), ("FedPerfix", "dbP"), ("VanillaAttention", "dbP"),
           ("FedVPT-deep", "P"), ("FedPGP", "P"), ("FedRep", "bP"), ("FedAvg-FT", "bP"))
_ALL = {**protocols.REGISTRY, **{m.name: m for m in _OWN}}
#: the library's registry and the two entries above, in table order
METHODS: Mapping[str, Method] = {name: _ALL[name] for name, _ in _TAGGED}
TAGS: Mapping[str, FrozenSet[str]] = {name: frozenset(tags) for name, tags in _TAGGED}


def select(tag: str, among: Optional[Iterable[str]] = None) -> Tuple[str, ...]:
    """The methods tagged ``tag`` (``among`` those given, in their order; default every method, in table order)."""
    names = list(METHODS) if among is None else list(among)
    return tuple(m for m in names if tag in TAGS[m])


def build_model(name: str, ctx: Context) -> nn.Module:
    """Method ``name``'s client model, built under ``torch.manual_seed(ctx.seed)`` (identical in every process)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {list(METHODS)}")
    torch.manual_seed(ctx.seed)
    vit, b = ctx.backbone.make(), ctx.budget
    return METHODS[name].build(vit, num_prompts=b.num_prompts, bottleneck=b.bottleneck(vit.embed_dim),
                               prefix_scale=b.prefix_scale, rank=b.lowrank_rank)


def make_protocol(name: str, ctx: Context) -> protocols.Protocol:
    """The protocol of method ``name`` with the budget's method-specific options."""
    b = ctx.budget
    if name == "Clustered-FedVPT":
        families = [c.family for c in ctx.clients]
        if not all(families):
            raise ValueError("Clustered-FedVPT needs every client's shift family (--split domain)")
        return METHODS[name].protocol(families=families)
    if name == "pFedPG" and b.generator_optimizer in ("default", "paper"):  # the library's recipes
        recipe = "fedpeft" if b.generator_optimizer == "default" else "paper"
        return protocols.get(name, recipe=recipe, descriptor_tokens=b.generator_descriptor_tokens)
    if name == "pFedPG":
        return protocols.get(name, server_optimizer=b.generator_optimizer, server_lr=b.generator_lr,
                             descriptor_tokens=b.generator_descriptor_tokens)
    if name == "FedPGP":
        return protocols.get(name, mu=b.fedpgp_mu, temperature=b.fedpgp_temperature)
    return METHODS[name].protocol()
