"""Adapter-only files: the trainable parameters of a fedpeft model as safetensors plus a JSON config.

Layout of ``save_adapter(model, path)`` (``path`` is a directory, like peft's ``save_pretrained``)::

    path/adapter_model.safetensors   trainable parameters only (prompts, adapters, head …), never the backbone;
                                     the config is also stored in its header metadata ("fedpeft_config"): the
                                     single source of truth
    path/adapter_config.json         a copy of the same config, for humans and tools: fedpeft version, format
                                     version, method chain (outermost first) with each wrapper's hyper-parameters
                                     (and its prompt module's), parameter shapes

No pickle anywhere. Writing (see ``fedpeft/_atomic.py``): both files are first written to temporary files in the same
directory with the permissions of a normal write under the user's umask, and fsync'ed; then the old JSON copy is
removed, the weights renamed into place, and the new JSON renamed into place, each step made durable. A crash at any
point leaves either the old adapter or the new one (possibly without its JSON copy, which loading does not need),
never new weights beside an old config. Leftover temporary files of an interrupted save are removed by the next save
into that directory. Concurrent saves into one directory are not supported.

Loading refuses, with a ``ValueError`` naming the file (and the key, where there is one), before anything is copied:
an unreadable or corrupt file (truncated, empty, absurd header length, garbage header, not a safetensors file), a
config that is not a JSON object, has no ``fedpeft_version`` string or an unknown ``format`` version (a file of a
newer fedpeft loads if its format is known; otherwise the message names the writer), another method chain, any
recorded hyper-parameter that differs from the model's (all listed, e.g. ``scale: file 3.0, model 1.5``), recorded
parameter shapes other than the model's, a JSON copy that disagrees with the header, missing or unexpected keys,
other shapes, a dtype that cannot be the parameter's (bool, integer or complex into a floating parameter), NaN/Inf,
and values that overflow the parameter's dtype (float64 ``1e300`` into float32). After a refused load the model is
bit-for-bit unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from . import _atomic
from ._checks import check_fits
from ._version import __version__
from ._wrapping import wrapper_chain

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "save_adapter"]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_FORMAT_VERSION = 1
_META_KEY = "fedpeft_config"

PathLike = Union[str, "os.PathLike[str]"]


def _check_wrapped(model: nn.Module) -> list:
    chain = wrapper_chain(model) if isinstance(model, nn.Module) else []
    if not chain:
        raise TypeError(
            f"expected a fedpeft model (VPT, ParallelPrefix, Prefix, … wrapping a ViT), got {type(model).__name__}"
        )
    return chain


def adapter_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The trainable parameters (``requires_grad=True``) by their names in ``model``, detached."""
    _check_wrapped(model)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _config(model: nn.Module, state: Dict[str, Tensor]) -> Dict[str, Any]:
    chain = _check_wrapped(model)
    return {
        "fedpeft_version": __version__,
        "format": _FORMAT_VERSION,
        "method": "+".join(w.adapter_config()["method"] for w in chain),
        "wrappers": [w.adapter_config() for w in chain],
        "parameters": {k: list(v.shape) for k, v in sorted(state.items())},
    }


# Recorded settings that do not change what the adapter computes in eval mode, and so may differ on load.
TRAINING_ONLY = frozenset({"dropout"})


def _adapter_dir(path: PathLike) -> Path:
    """The adapter folder: ``path``, or its parent when ``path`` names the weights file itself (issue 14.5)."""
    p = Path(path)
    if p.name == ADAPTER_WEIGHTS_NAME and not p.is_dir():
        return p.parent
    return p


def save_adapter(model: nn.Module, path: PathLike) -> Path:
    """Write ``model``'s trainable parameters and config to directory ``path`` (created if needed); returns it.

    ``path`` may also name the weights file (``.../adapter_model.safetensors``): its folder is used. The pair of
    files is replaced atomically (see the module docstring).
    """
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("the model has no trainable parameters; nothing to save")
    config = _config(model, state)
    text = json.dumps(config, indent=2, sort_keys=True)
    directory = _adapter_dir(path)
    directory.mkdir(parents=True, exist_ok=True)
    weights, json_copy = directory / ADAPTER_WEIGHTS_NAME, directory / ADAPTER_CONFIG_NAME
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
        _atomic.remove_stale(directory, name)
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    def write_weights(tmp: str) -> None:  # into our file: safetensors' save_file would make it 0600
        with open(tmp, "wb") as f:
            f.write(save(tensors, metadata={_META_KEY: text}))

    tmp_weights = _atomic.write_temp(weights, write_weights)
    tmp_json = None
    try:
        tmp_json = _atomic.write_temp(json_copy, write_json)
        if json_copy.exists():  # from here on the folder never holds new weights beside the old config
            json_copy.unlink()
            _atomic.fsync_dir(directory)
        _atomic.replace(tmp_weights, weights)
        _atomic.replace(tmp_json, json_copy)
    except BaseException:
        for tmp in (tmp_weights, tmp_json):
            if tmp is not None and tmp.exists():
                tmp.unlink()
        raise
    return directory


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` (in place); returns ``model``.

    ``path`` is the adapter folder or its ``adapter_model.safetensors``. The config is read from the weights file's
    header; ``adapter_config.json``, if present, must agree with it.

    Raises:
        FileNotFoundError: no adapter file under ``path``.
        ValueError: anything the module docstring lists (corrupt file, config, hyper-parameters, keys, shapes, dtypes,
            non-finite or overflowing values), naming the file and the key. Nothing is copied then.
    """
    target = adapter_state_dict(model)
    directory = _adapter_dir(path)
    if directory.is_file():
        raise ValueError(f"{path} is a file; pass the folder that holds {ADAPTER_WEIGHTS_NAME} (or that file itself)")
    file = directory / ADAPTER_WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {directory}")
    config, loaded = _read(file)
    _check_config(file, config, model, target)
    _check_json_copy(directory / ADAPTER_CONFIG_NAME, config)
    _check_tensors(file, loaded, target)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in loaded.items():
            params[key].copy_(value)
    return model


# ---- reading and checking ---------------------------------------------------------------------------------------


def _read(file: Path) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """The header config (a dict) and every tensor; ``ValueError`` naming ``file`` for anything unreadable."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
            if meta is None:
                raise ValueError(f"{file} is not a fedpeft adapter (no '{_META_KEY}' metadata)")
            loaded = {k: f.get_tensor(k) for k in f.keys()}
    except (ValueError, OSError):
        raise
    except Exception as e:  # safetensors' SafetensorError and whatever a damaged file provokes
        raise ValueError(f"{file} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    try:
        config = json.loads(meta)
    except ValueError as e:
        raise ValueError(f"{file}: the '{_META_KEY}' metadata is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: the '{_META_KEY}' metadata must be a JSON object, got {type(config).__name__}")
    return config, loaded


def _flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; a dict stays a dict only as its leaves."""
    out: Dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_config(file: Path, config: Dict[str, Any], model: nn.Module, target: Dict[str, Tensor]) -> None:
    """Format version (a file of a newer fedpeft loads if its format is this one), method chain, every recorded
    hyper-parameter (all mismatches listed) and the recorded parameter shapes, against the model's."""
    version, writer = config.get("format"), config.get("fedpeft_version")
    if not isinstance(writer, str):
        raise ValueError(f"{file}: 'fedpeft_version' must be a version string, got {writer!r}")
    if isinstance(version, bool) or version != _FORMAT_VERSION:  # a newer fedpeft's file loads if its format is known
        raise ValueError(
            f"{file}: unknown adapter format version {version!r} (written by fedpeft {writer}); this fedpeft "
            f"({__version__}) reads format {_FORMAT_VERSION}: upgrade fedpeft to load this file"
        )
    expected = json.loads(json.dumps(_config(model, target)))  # JSON round trip: tuples → lists, like the file
    if config.get("method") != expected["method"]:
        raise ValueError(f"{file}: adapter method is {config.get('method')!r} but the model is {expected['method']!r}")
    recorded = config.get("wrappers")
    if not isinstance(recorded, list) or len(recorded) != len(expected["wrappers"]) or not all(
        isinstance(w, dict) for w in recorded
    ):
        raise ValueError(f"{file}: 'wrappers' must list one JSON object per wrapper of {expected['method']!r}")
    chain = len(recorded) > 1
    mismatches = []
    for theirs, ours in zip(recorded, expected["wrappers"]):
        where = f"{ours['method']}." if chain else ""
        theirs, ours = _flatten(theirs), _flatten(ours)
        for key in sorted(theirs.keys() | ours.keys()):
            if key.split(".")[-1] in TRAINING_ONLY:
                continue
            if key not in ours:
                mismatches.append(f"{where}{key}: file {theirs[key]!r}, model has no such setting")
            elif key not in theirs:
                continue  # not recorded by the fedpeft that wrote the file: nothing to compare
            elif theirs[key] != ours[key] or isinstance(theirs[key], bool) != isinstance(ours[key], bool):
                mismatches.append(f"{where}{key}: file {theirs[key]!r}, model {ours[key]!r}")
    if mismatches:
        raise ValueError(
            f"{file}: the adapter was saved with other hyper-parameters than the model has: " + "; ".join(mismatches)
        )
    if config.get("parameters") != expected["parameters"]:  # the header's shapes, not only the tensors'
        raise ValueError(
            f"{file}: the parameter shapes in the header do not match the model's: "
            + _shape_mismatches(config.get("parameters"), expected["parameters"])
        )


def _shape_mismatches(recorded: Any, expected: Dict[str, List[int]]) -> str:
    """The header's ``parameters`` entry against the model's ``{key: shape}``, as a readable list of differences."""
    if not isinstance(recorded, dict):
        return f"'parameters' must be a JSON object {{key: shape}}, got {type(recorded).__name__}"
    diffs = [
        f"{k!r}: file {recorded.get(k, 'missing')}, model {expected.get(k, 'no such parameter')}"
        for k in sorted(recorded.keys() | expected.keys())
        if recorded.get(k) != expected.get(k)
    ]
    return "; ".join(diffs[:5]) + (f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else "")


def _check_json_copy(json_file: Path, config: Dict[str, Any]) -> None:
    """``adapter_config.json`` is a copy of the header config: if it is there, it must say the same."""
    if not json_file.exists():
        return
    try:
        copy = json.loads(json_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_file} is not valid JSON: {e}") from None
    if copy != config:
        raise ValueError(
            f"{json_file} does not match the config stored in {ADAPTER_WEIGHTS_NAME} (edited by hand, or left from "
            "another save?); the weights file is authoritative: delete the JSON copy or save the adapter again"
        )


def _check_tensors(file: Path, loaded: Dict[str, Tensor], target: Dict[str, Tensor]) -> None:
    """Keys, shapes, dtypes and values of the file's tensors against the model's trainable parameters."""
    missing, unexpected = sorted(set(target) - set(loaded)), sorted(set(loaded) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"{file}: adapter keys do not match the model's trainable parameters: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for key, value in loaded.items():
        want = target[key]
        if value.shape != want.shape:
            raise ValueError(
                f"{file}: shape mismatch for {key!r}: the model expects {tuple(want.shape)}, the file has "
                f"{tuple(value.shape)}"
            )
        if want.is_floating_point() and not value.is_floating_point():
            raise ValueError(
                f"{file}: {key!r} has dtype {value.dtype}, which cannot be the model's {want.dtype} parameter "
                "(expected a floating-point tensor)"
            )
        if value.dtype != want.dtype and not want.is_floating_point():
            raise ValueError(f"{file}: {key!r} has dtype {value.dtype}, the model's parameter is {want.dtype}")
    for key, value in loaded.items():
        check_fits(f"{file}: {key!r}", value, target[key].dtype)
