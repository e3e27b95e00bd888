"""The clustered-FedVPT oracle: FedVPT whose server averages the prompts within each shift family, family known.

Clients of one family (:mod:`.data`, ``--split domain``) share a kind of shift; a server told each client's family
keeps one prompt set per family and averages, weighted by example counts, only over that family's accepted replies::

    P_{f, t+1} = Σ_{n ∈ accepted, fam(n) = f} w_n · P_n / Σ_{n ∈ accepted, fam(n) = f} w_n

(a family without an accepted reply keeps its prompts). Heads stay personal, as in FedVPT. pFedPG's generator has to
*learn* such a grouping from client ids alone; this server is given it, so its accuracy is the bound on what a
generator can get from the family structure, and its margin over FedVPT says how much structure there is to get.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from fedpeft.protocols import ServerReport
from fedpeft.protocols.shared_personal import AveragingServer, SharedPersonal

__all__ = ["ClusteredFedVPT", "FamilyServer"]


class FamilyServer(AveragingServer):
    """One :class:`~fedpeft.protocols.shared_personal.AveragingServer` per family; client ``n`` is served by
    ``families[n]``'s. It is an ``AveragingServer`` (``shared`` is the first family's state, the common start), so
    the Flower strategy of the averaging methods runs it unchanged.

    Args:
        initial: the starting shared state, the same for every family.
        families: the family label of each client id (``len(families)`` clients).
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
    """FedVPT's key split (prompts shared, head personal) with a :class:`FamilyServer` (see the module docstring)."""

    def __init__(self, families: Sequence[str], *, name: str = "Clustered-FedVPT") -> None:
        super().__init__(["fedvpt"], name=name)
        self.families = list(families)

    def make_server(self, model: nn.Module, *, num_clients: Optional[int] = None,
                    seed: Optional[int] = None) -> FamilyServer:
        """A :class:`FamilyServer` from ``model``'s current prompts (``seed``: the common signature; unused)."""
        if num_clients is not None and num_clients != len(self.families):
            raise ValueError(f"num_clients={num_clients} but {len(self.families)} clients have a family")
        return FamilyServer(self.initial_shared(model), self.families)
