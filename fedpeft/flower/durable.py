"""The ClientApp's side of surviving restarts and hostile servers: where personal state lives, what a message must be.

Where a client's personal state lives (:func:`personal_store`):

- with a state folder — ``node_config["state-dir"]`` (``flower-supernode --node-config "... state-dir='/var/x'"``),
  else ``client_app(state_dir=...)`` — one safetensors file per (run, partition) on the node's disk
  (:class:`~fedpeft.flower.node_state.NodeState`): a SuperNode killed and restarted continues from its last
  completed round, and a round the server sends again after resuming from its checkpoint is redone from the state
  that round started from;
- without one, Flower's in-memory ``context.state`` (:mod:`.node`), as in 0.1: lost when the SuperNode restarts.

The run id (``fedpeft.run`` in the message's config, else Flower's ``context.run_id``) names the file's run.

What a message must be (:func:`message_round`, :func:`check_download`), else the handler raises and Flower sends an
error reply (the node's state untouched): a config record with an integer round ``>= 0`` (a message without config
was taken as round 0, a round of −5 accepted), and downloaded arrays that are finite and floating where the model's
parameters are floating (NaN prompts from a server were trained on and stored for every later round; int64 arrays
were cast silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from flwr.app import ConfigRecord, Context, Message
from torch import Tensor

from .node import check_fresh, load_personal, save_personal
from .node_state import NodeState, state_dir_of
from .records import CONFIG, ROUND, SEED

__all__ = ["RUN", "ContextStore", "FileStore", "check_download", "message_round", "personal_store", "run_of"]

RUN = "fedpeft.run"


def message_round(msg: Message) -> Tuple[ConfigRecord, int, int]:
    """``(config, round, seed)`` of a train/evaluate message.

    Raises:
        ValueError: no config record, no round, or a round / seed that is not an integer (a negative round neither).
    """
    cfg = msg.content.config_records.get(CONFIG)
    if cfg is None:
        raise ValueError(f"the message has no config record {CONFIG!r} (the round it belongs to is unknown)")
    if ROUND not in cfg:
        raise ValueError(f"the message's config has no {ROUND!r}")
    round_, seed = cfg[ROUND], cfg.get(SEED, 0)
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"config[{ROUND!r}] must be an integer >= 0, got {round_!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"config[{SEED!r}] must be an integer, got {seed!r}")
    return cfg, round_, seed


def check_download(shared: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> None:
    """Refuse downloaded arrays that are not finite, or not floating where the model's parameter is.

    Raises:
        ValueError: names the key and what came.
    """
    for k, v in shared.items():
        ref = like.get(k)
        if ref is not None and ref.is_floating_point() and not v.is_floating_point():
            raise ValueError(f"the server sent {k!r} as {v.dtype}; the model's parameter is {ref.dtype}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"the server sent non-finite values (NaN/Inf) in {k!r}; refusing to train or deploy on "
                             "them")


def run_of(cfg: ConfigRecord, context: Context) -> str:
    """The fedpeft run id: ``fedpeft.run`` from the server, else Flower's run id."""
    run = cfg.get(RUN)
    return run if isinstance(run, str) and run else str(context.run_id)


class ContextStore:
    """Personal state in ``context.state`` (:mod:`.node`): a round not newer than the stored one is refused."""

    durable = False

    def __init__(self, context: Context, method: str, like: Mapping[str, Tensor]) -> None:
        self.context, self.method, self.like = context, method, like

    def start(self, round_: int) -> Optional[Dict[str, Tensor]]:
        check_fresh(self.context, self.method, round_)
        return load_personal(self.context, self.method, like=self.like)[0]

    def deployed(self) -> Tuple[Optional[Dict[str, Tensor]], Optional[int]]:
        return load_personal(self.context, self.method, like=self.like)

    def save(self, round_: int, personal: Mapping[str, Tensor]) -> None:
        save_personal(self.context, self.method, personal, round_)

    def stored_round(self) -> Optional[int]:
        return self.deployed()[1]


class FileStore:
    """Personal state in the node's state folder (:class:`~fedpeft.flower.node_state.NodeState`)."""

    durable = True

    def __init__(self, state: NodeState, like: Mapping[str, Tensor]) -> None:
        self.state, self.like = state, like

    def start(self, round_: int) -> Optional[Dict[str, Tensor]]:
        return self.state.start_state(round_, self.like)[0]

    def deployed(self) -> Tuple[Optional[Dict[str, Tensor]], Optional[int]]:
        return self.state.deployed_state(self.like)

    def save(self, round_: int, personal: Mapping[str, Tensor]) -> None:
        self.state.save(round_, personal, self.like)

    def stored_round(self) -> Optional[int]:
        return self.state.stored_round()


def personal_store(context: Context, cfg: ConfigRecord, *, method: str, partition: int, like: Mapping[str, Tensor],
                   fingerprint: Any, state_dir: Union[str, Path, None] = None) -> Union[ContextStore, FileStore]:
    """The store of this client's personal state (see the module docstring).

    ``fingerprint`` is the frozen backbone's fingerprint, or a zero-argument callable computing it (only called when
    a state folder is used).
    """
    folder = state_dir_of(context.node_config, state_dir)
    if folder is None:
        return ContextStore(context, method, like)
    fp = fingerprint() if callable(fingerprint) else fingerprint
    return FileStore(NodeState(folder, run=run_of(cfg, context), partition=partition, method=method, fingerprint=fp),
                     like)
