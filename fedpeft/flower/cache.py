"""A node's data and built model, reused between messages from its state folder when their fingerprint matches.

A deployed SuperNode starts a fresh ClientApp process for every message, so without help every message reloads the
node's data (``load_data``: for the example, importing scikit-learn and reading the digits, 1–5 s) and rebuilds its
model (``build_model``: for a pre-trained backbone, reading a checkpoint). When the SuperNode is given a state folder
(``--node-config "... state-dir='/var/lib/fedpeft/node0'"``), :class:`NodeCache` keeps both under
``<state-dir>/cache/``:

    data-p<partition>-<fingerprint>.pt     the (train, test) TensorDatasets' tensors  (``torch.load(weights_only=True)``)
    frozen-p<partition>-<fingerprint>.pt   the SHA-256 of the built model's frozen state (what registration compares)
                                           and a :func:`sketch` of the weights it was computed from

The fingerprint is a SHA-256 over everything the two functions are given or made of: the bytes of the source file
that defines ``load_data`` (or ``build_model``) and its qualified name, the node's ``node_config`` (without
``state-dir``) and the run's ``run_config``, and the fedpeft and torch versions. Change any of them and the cache
misses and is rewritten; that partition's files of other fingerprints are removed then, so the folder holds one
entry of each kind per partition (partitions sharing a state folder keep theirs). The cache is optional: a cache
that cannot be written (a file in the way, a full disk) is logged and the message goes on.

What the fingerprint cannot see: files that ``load_data`` reads. If your data changes under the same code and
configuration, delete ``<state-dir>/cache`` (or put a data version into the run config).

Only plain tensors are cached, so loading never unpickles code: data must be ``TensorDataset`` s (or ``None``);
other data is loaded by ``load_data`` every time. The model itself is still built by ``build_model`` on every message
(the architecture must exist, and a pickled module would mean unpickling code); what is reused is the frozen-state
hash that registration needs (:func:`~fedpeft.flower.frozen_fingerprint`, a full pass over the backbone's bytes). For
a pre-trained backbone, let ``build_model`` read a local checkpoint rather than download.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple

import torch

from .. import _atomic

__all__ = ["STATE_DIR", "NodeCache", "fingerprint", "sketch"]

log = logging.getLogger("fedpeft.flower")

#: the ``node_config`` key naming the node's state folder (shared with the node's personal-state store)
STATE_DIR = "state-dir"


def _source_bytes(fn: Callable) -> bytes:
    target = inspect.unwrap(fn)
    try:
        path = inspect.getsourcefile(target)
        data = Path(path).read_bytes() if path else b""
    except (TypeError, OSError):
        data = b""
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"
    return name.encode() + b"\0" + data


def fingerprint(fn: Callable, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``fn``'s source file and name, ``node_config`` (without ``state-dir``), ``run_config``, and
    the fedpeft and torch versions: equal iff the cached result of ``fn`` may be reused."""
    from .._version import __version__

    h = hashlib.sha256()
    h.update(_source_bytes(fn))
    for part in ({k: v for k, v in node_config.items() if k != STATE_DIR}, dict(run_config)):
        h.update(repr(sorted((str(k), repr(v)) for k, v in part.items())).encode())
    h.update(f"fedpeft {__version__} torch {torch.__version__}".encode())
    return h.hexdigest()


def _tensors_of(split: Any) -> Optional[Tuple[torch.Tensor, ...]]:
    """The tensors of a ``TensorDataset`` (``None`` stays ``None``); raises ``TypeError`` for anything else."""
    from torch.utils.data import TensorDataset

    if split is None:
        return None
    if type(split) is TensorDataset:
        return tuple(split.tensors)
    raise TypeError(f"only TensorDataset data is cached, got {type(split).__name__}")


def sketch(model: torch.nn.Module) -> str:
    """A cheap check that ``model``'s state is the one a cached frozen hash was computed from: SHA-256 of every
    entry's name, dtype and shape and of ≈ 4096 evenly strided values (all of a smaller tensor). Any other checkpoint
    (retrained, fine-tuned, another seed: every weight differs) changes it, at a few % of a full hash's cost
    (ViT-B/16, one CPU thread: 0.023 s vs 0.84 s); an edit confined to unsampled entries of a large matrix is missed.
    No defence against a crafted state, and none is needed: a node reports its own fingerprint at registration."""
    h = hashlib.sha256()
    with torch.no_grad():
        for k, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            sample = flat[:: max(1, flat.numel() // 4096)].to("cpu").contiguous()
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class NodeCache:
    """``<state-dir>/cache/`` of one node (see the module docstring).

    Args:
        folder: the cache folder itself (``<state-dir>/cache``); created on the first write.
    """

    def __init__(self, folder: os.PathLike) -> None:
        self.folder = Path(folder)

    @classmethod
    def of(cls, context: Any, fallback: Any = None) -> Optional[NodeCache]:
        """The cache of the node ``context`` runs on: ``<state-dir>/cache`` of its ``node_config`` (else of
        ``fallback``, the ClientApp's own ``state_dir``), or ``None`` when it has no state folder."""
        from .node_state import state_dir_of  # the one parser of state-dir

        state_dir = state_dir_of(context.node_config, fallback)
        return None if state_dir is None else cls(state_dir / "cache")

    def _path(self, kind: str, context: Any, key: str = "*") -> Path:
        """``<kind>-p<partition>-<key>.pt``: partitions sharing a state folder keep their own entries."""
        return self.folder / f"{kind}-p{context.node_config.get('partition-id')}-{key}.pt"

    def _replace(self, kind: str, context: Any, key: str, obj: Any) -> None:
        """Write one entry (optional: a failure is logged, never raised) and drop this partition's older ones."""
        path = self._path(kind, context, key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic.remove_stale(self.folder, path.name)
            _atomic.replace(_atomic.write_temp(path, lambda p: torch.save(obj, p)), path)
            for old in self.folder.glob(self._path(kind, context).name):
                if old.name != path.name:
                    old.unlink(missing_ok=True)
        except (OSError, RuntimeError) as e:  # a file in the way, a full disk, a read-only folder
            log.warning("node cache %s not written (%s); going on without it", path, e)

    def data(self, context: Any, load_data: Callable[[Any], Tuple[Any, Any]]) -> Tuple[Any, Any]:
        """``load_data(context)``, or its cached ``(train, test)`` when the fingerprint matches."""
        from torch.utils.data import TensorDataset

        key = fingerprint(load_data, context.node_config, context.run_config)
        path = self._path("data", context, key)
        if path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
                return tuple(None if t is None else TensorDataset(*t) for t in saved)  # type: ignore[return-value]
            except Exception as e:  # a torn or foreign file: reload and rewrite it
                log.warning("data cache %s unreadable (%s); reloading", path, e)
        train, test = load_data(context)
        try:
            entry = [_tensors_of(train), _tensors_of(test)]
        except TypeError as e:
            log.info("not caching this node's data: %s", e)
        else:
            self._replace("data", context, key, entry)
        return train, test

    def frozen_hash(self, context: Any, build_model: Callable, model: torch.nn.Module,
                    compute: Callable[[torch.nn.Module], str]) -> str:
        """``compute(model)`` (the frozen-state SHA-256 of ``build_model(context)``), cached by fingerprint and
        recomputed when ``model``'s :func:`sketch` differs from the cached one (``build_model``'s weights changed)."""
        key = fingerprint(build_model, context.node_config, context.run_config)
        path, now = self._path("frozen", context, key), sketch(model)
        if path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
                if saved.get("sketch") == now:
                    return str(saved["sha256"])
                log.info("frozen-hash cache %s: the model's weights changed; recomputing", path)
            except Exception as e:
                log.warning("frozen-hash cache %s unreadable (%s); recomputing", path, e)
        value = compute(model)
        self._replace("frozen", context, key, {"sha256": value, "sketch": now})
        return value
