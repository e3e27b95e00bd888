"""What both engines need to survive crashes: diverged clients, and the in-process engine's checkpoint.

- :func:`diverged`: the reason a client's own round must not count (non-finite values in its upload or new personal
  state), or ``None``. Both engines then refuse its upload, keep its *previous* personal state and list it in the
  round record's ``diverged``: a NaN head is never stored, and its accuracy comes from its last finite model.
- :func:`federation_checkpoint` / :func:`restore_federation`: a :class:`~fedpeft.protocols.Federation`'s whole state
  after a round as a :class:`~fedpeft.protocols.checkpoint.Checkpoint`: the server (``server.<name>`` tensors and
  ``meta["server"]``), every client's personal state (``personal.<client>.<key>``), the history of round records,
  and the configuration a resumed run must share (method, seed, fraction, number of clients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .checkpoint import Checkpoint, CheckpointError, check_matches
from .records import ClientResult, RoundRecord

if TYPE_CHECKING:  # pragma: no cover
    from .inprocess import Federation

__all__ = ["checked_history", "diverged", "federation_checkpoint", "restore_federation"]


def _nonfinite(state: Mapping[str, Tensor]) -> Optional[str]:
    for k, v in state.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            return k
    return None


def diverged(result: ClientResult) -> Optional[str]:
    """Why ``result`` must not count (a key of its upload or personal state holds NaN/Inf), or ``None``."""
    for name, state in (("upload", result.upload), ("personal state", result.personal)):
        key = _nonfinite(state)
        if key is not None:
            return (f"local training diverged: its {name}[{key!r}] holds non-finite values; the upload is refused and the "
                    "client keeps its previous personal state")
    return None


def _config(fed: Federation) -> Dict[str, object]:
    return {"method": fed.protocol.name, "seed": fed.seed, "fraction": float(fed.fraction),
            "num_clients": fed.num_clients, "engine": "inprocess", "frozen-sha256": fed.fingerprint}


def checked_history(ckpt: Checkpoint) -> List[RoundRecord]:
    """The round records of ``ckpt``'s history, checked against its round (one record per round, numbered 0, 1, ...)
    and against the server meta's round.

    Raises:
        CheckpointError: names the record or field that does not fit.
    """
    history, where = ckpt.meta.get("history"), f"checkpoint of round {ckpt.round}"
    if not isinstance(history, list) or len(history) != ckpt.round:
        raise CheckpointError(f"{where}: its history has "
                              f"{len(history) if isinstance(history, list) else history!r} rounds")
    records = []
    for i, d in enumerate(history):
        try:
            records.append(RoundRecord.from_dict(d))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: history[{i}] is not a round record ({type(e).__name__}: {e})") from None
        if records[-1].round != i:
            raise CheckpointError(f"{where}: history[{i}] is the record of round {records[-1].round!r}")
    server = ckpt.meta.get("server")
    got = server.get("round") if isinstance(server, Mapping) else server
    if got != ckpt.round:
        raise CheckpointError(f"{where}: meta['server']['round'] is {got!r}; a server that ran {ckpt.round} rounds "
                              "would refuse every later reply")
    return records


def federation_checkpoint(fed: Federation, run: str) -> Checkpoint:
    """``fed``'s state after its last round (see the module docstring)."""
    tensors, server_meta = fed.server.state_dict()
    out = {f"server.{k}": v for k, v in tensors.items()}
    for n, state in enumerate(fed.personal):
        out.update({f"personal.{n}.{k}": v for k, v in state.items()})
    meta = {**_config(fed), "server": server_meta, "history": [r.as_dict() for r in fed.history]}
    return Checkpoint(round=len(fed.history), run=run, tensors=out, meta=meta)


def restore_federation(fed: Federation, ckpt: Checkpoint) -> None:
    """Load ``ckpt`` into a freshly built ``fed``; every check runs before anything changes.

    Raises:
        CheckpointError: another method, seed, fraction or number of clients; a history that does not match the
            round; personal states that do not fit the model; a server state the server refuses.
    """
    check_matches(ckpt, **_config(fed))
    records = checked_history(ckpt)
    like = fed.protocol.initial_personal(fed.model)
    personal = []
    for n in range(fed.num_clients):
        prefix = f"personal.{n}."
        state = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
        if set(state) != set(like) or any(state[k].shape != like[k].shape or state[k].dtype != like[k].dtype
                                          for k in like):
            raise CheckpointError(f"checkpoint: client {n}'s personal state does not fit the model (keys "
                                  f"{sorted(state)[:4]}..., expected {sorted(like)[:4]}...)")
        bad = _nonfinite(state)
        if bad is not None:
            raise CheckpointError(f"checkpoint: client {n}'s personal state [{bad!r}] holds NaN/Inf")
        personal.append({k: v.to(like[k].device) for k, v in state.items()})
    server_tensors = {k[len("server."):]: v for k, v in ckpt.tensors.items() if k.startswith("server.")}
    try:
        fed.server.load_state_dict(server_tensors, ckpt.meta.get("server", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint: the server refused its state ({e})") from None
    fed.personal, fed.history = personal, records
