"""The Flower strategy's side of surviving crashes: its checkpoint, resuming from it, and the round record's flags.

:func:`strategy_checkpoint` is a :class:`~fedpeft.protocols.checkpoint.Checkpoint` of a ``ProtocolStrategy`` after a
round: the server's tensors (``server.<name>``: the shared state, or pFedPG's generator and optimizer state) and meta
(``meta["server"]``), the run id the nodes file their personal state under, the configuration a resumed run must
share (method, seed, fractions, partitions), the registry by partition (training examples, the last round each
partition's upload was accepted: node ids are not kept, a restarted SuperNode or SuperLink hands out new ones) and the
history of round records. :func:`restore_strategy` loads it into a freshly built strategy before Flower's loop starts;
``start`` then runs only the rounds that are left, numbering them on from the checkpoint's round.

Because client sampling is a pure function of (seed, round) and nodes keep their personal state on disk per run
(``state-dir``), a run killed after round 2 and resumed gives the same per-client accuracies and server state as a
run that was never interrupted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Union

from ..protocols import Rejection, Reply, sample_clients
from ..protocols.checkpoint import Checkpoint, CheckpointError, check_matches
from ..protocols.resume import checked_history
from .registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .strategy import ProtocolStrategy

__all__ = ["absent", "cap_registered", "restore_strategy", "resumed_flags", "strategy_checkpoint"]


def _config(s: ProtocolStrategy) -> Dict[str, object]:
    return {"method": s.method.name, "seed": s.seed, "fraction_train": s.fraction_train,
            "fraction_evaluate": s.fraction_evaluate, "num_partitions": s.num_partitions, "engine": "flower",
            "frozen-sha256": s.fingerprint}


def strategy_checkpoint(s: ProtocolStrategy) -> Checkpoint:
    """``s``'s state after its last round (see the module docstring)."""
    tensors, server_meta = s.server.state_dict()
    reg = s.registry
    partitions = {str(p): {"num-examples": reg.num_examples.get(p), "last-trained": reg.last_trained.get(p)}
                  for p in sorted(set(reg.num_examples) | set(reg.last_trained))}
    meta = {**_config(s), "server": server_meta, "registry": partitions,
            "history": [r.as_dict() for r in s.history]}
    return Checkpoint(round=len(s.history), run=s.run_id(), tensors={f"server.{k}": v for k, v in tensors.items()},
                      meta=meta)


def restore_strategy(s: ProtocolStrategy, ckpt: Checkpoint) -> None:
    """Load ``ckpt`` into ``s`` (fresh, not started); every check runs before anything changes.

    Raises:
        CheckpointError: another configuration, a history that does not match the round, or a server state the
            server refuses.
    """
    check_matches(ckpt, **_config(s))
    if s.run_name is not None and s.run_name != ckpt.run:
        raise CheckpointError(f"the checkpoint is of run {ckpt.run!r}, this strategy's run_name is {s.run_name!r}")
    records = checked_history(ckpt)
    last_trained = _registry(ckpt, s.num_partitions)
    server_tensors = {k[len("server."):]: v for k, v in ckpt.tensors.items() if k.startswith("server.")}
    try:
        s.server.load_state_dict(server_tensors, ckpt.meta.get("server", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint: the server refused its state ({e})") from None
    s.history, s._offset, s.run_name = records, ckpt.round, ckpt.run
    s.registry.last_trained.update(last_trained)


def _registry(ckpt: Checkpoint, num_partitions: int) -> Dict[int, Optional[int]]:
    """``{partition: last round its upload was accepted}`` from ``ckpt``'s registry, every entry checked."""
    partitions = ckpt.meta.get("registry", {})
    if not isinstance(partitions, dict):
        raise CheckpointError(f"checkpoint: 'registry' must be a JSON object, got {type(partitions).__name__}")
    out: Dict[int, Optional[int]] = {}
    for p, info in partitions.items():
        last = info.get("last-trained") if isinstance(info, dict) else info
        if not (p.isdigit() and int(p) < num_partitions) or not (last is None or (
                isinstance(last, int) and not isinstance(last, bool) and 0 <= last < ckpt.round)):
            raise CheckpointError(f"checkpoint: registry[{p!r}] = {info!r} is not a partition in "
                                  f"[0, {num_partitions}) with a 'last-trained' round in [0, {ckpt.round}) or null")
        out[int(p)] = last
    return out


def resumed_flags(reg: Registry) -> Dict[str, List[int]]:
    """After the first registration of a resumed run: partitions whose node has no personal state although the
    partition trained before the crash (``restarted_without_state``)."""
    lost = sorted(p for p in reg.node_of if reg.last_trained.get(p) is not None and reg.personal_round.get(p, -1) < 0)
    return {"restarted_without_state": lost} if lost else {}


def absent(reg: Registry, num_partitions: int, fraction: float, seed: int, round_: int) -> List[int]:
    """Partitions sampled in ``round_`` that have no live registered node (they left, or never came)."""
    return [p for p in sample_clients(num_partitions, fraction, seed=seed, round=round_) if p not in reg.node_of]


def cap_registered(reply: Union[Reply, Rejection], reg: Registry) -> Union[Reply, Rejection]:
    """Refuse a reply that claims more training examples than its node registered with."""
    if isinstance(reply, Rejection):
        return reply
    n = reg.num_examples.get(reply.client_id)
    w = reply.weight
    if n is None or n < 1:  # the registry refuses such nodes; a reply with no registered size is never trusted
        return Rejection(reply.client_id, f"the node registered no training examples ({n!r}); its weight cannot be "
                                          "capped")
    if isinstance(w, (int, float)) and not isinstance(w, bool) and w > n:
        return Rejection(reply.client_id, f"num-examples {w!r} is more than the {n} training examples the node "
                                          "registered with")
    return reply
