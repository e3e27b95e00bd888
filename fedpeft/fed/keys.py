"""Partial personalization: which state-dict keys stay on the client, and splitting a state by them.

``personal_keys(model_or_state, patterns)`` resolves patterns to a sorted, printable list of keys, so a user can audit
exactly what leaves the client. A pattern is one of

- a **glob** (it contains ``*``, ``?``, ``[`` or ``.``): ``fnmatch`` on the whole key, case-sensitive
  (``"*head*"``, ``"*blocks.11.*"``; a dotted name without wildcards, ``"head.weight"``, matches that exact key);
- a **word** from :data:`WORDS`: a layer type of the FedPerfix sensitivity study (Sun et al., ICCV 2023, Table 1)
  or one of fedpeft's / peft's parts, matched on dotted name components at any nesting depth (so wrappers' ``model.``
  and peft's ``base_model.model.`` prefixes do not matter);
- a **preset** from :data:`PRESETS`: the personal part of a paper's split, e.g. ``"fedperfix"``.

Words can overlap (``blocks.0.attn.q_norm.weight`` is both ``attn`` and ``norm``); the result is the union. Keys no word
covers (``cls_token``, ``reg_token``, ``dist_token``, LayerScale ``ls1``/``ls2``, MAP pooling ``attn_pool.*`` apart
from its norm and mlp) are selected with globs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import warnings
from types import MappingProxyType
from typing import Dict, Iterable, List, Mapping, Tuple, Union

import torch
from torch import Tensor, nn

from .._checks import check_state, format_keys

__all__ = ["PRESETS", "WORDS", "frozen_fingerprint", "merge", "personal_keys", "split", "trainable_keys", "trainable_state"]


def _component(*names: str) -> str:
    """Regex: one of ``names`` is a whole dotted component of the key, at any depth."""
    return rf"(?:^|\.)(?:{'|'.join(names)})(?:\.|$)"


def _last(*names: str) -> str:
    """Regex: the key's last component (the parameter's own name) is one of ``names``."""
    return rf"(?:^|\.)(?:{'|'.join(names)})$"


#: word -> regular expression searched in each key. The docs (docs/fed.md) list what each one matches. Each word also
#: names the parts of the transformers ViT / DeiT / DINOv2 models fedpeft wraps (``fedpeft/_hf.py``), 4.x and 5.x.
WORDS: Mapping[str, str] = MappingProxyType({
    # blocks.<i>.attn.{qkv,proj,q_norm,k_norm,norm}.*, and adapters injected there; transformers' layer.<i>.attention.*
    "attn": _component("attn", "attention"),
    # PromptGenerator's parameters, not inside a backbone's blocks (Eva's and transformers' attention have q_proj too)
    "generator": r"^(?!(?:.*\.)?(?:blocks|layers?)\.)(?:.*\.)?"
    r"(?:prompt_base|descriptors|q_proj|k_proj|v_proj|out_proj)(?:\.|$)",
    "head": _component("head", "head_dist", "classifier", "cls_classifier", "distillation_classifier"),
    "lora": _component("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"),
    "lowrank": _last("u", "v"),  # LowRankPrompt's U and V
    # transformers 4.x ViT / DeiT: layer.<i>.intermediate.dense and layer.<i>.output.dense are the MLP's two linears
    "mlp": _component("mlp", "intermediate") + r"|(?:^|\.)layer\.\d+\.output(?:\.|$)",
    "norm": _component(  # every LayerNorm
        "norm", "norm1", "norm2", "norm_pre", "fc_norm", "q_norm", "k_norm", "layernorm", "layernorm_before",
        "layernorm_after",
    ),
    "patch_embed": _component("patch_embed", "patch_embeddings"),
    "pos_embed": _component("pos_embed", "position_embeddings"),
    "prefix": r"(?:^|\.)adapters\.\d+\.(?:down|up)(?:\.|$)|" + _last("keys", "values"),  # ParallelPrefix, Prefix
    "prompts": _component("prompts"),  # VPT's prompts, or the parameters of its prompt module
})

#: preset -> the words that are personal (kept on the client) in that paper's split; the rest is shared.
PRESETS: Mapping[str, Tuple[str, ...]] = MappingProxyType({
    "fedavg": (),  # everything shared (McMahan et al., 2017)
    "fedbn": ("norm",),  # normalization layers local (Li et al., 2021; LayerNorm in a ViT, FedPerfix Table 2)
    "fedperfix": ("prefix", "head"),  # adapters + head personal, the rest shared (Sun et al., ICCV 2023)
    "fedpgp": ("lowrank", "head"),  # U, V and head personal, global_prompt shared (Cui et al., ICML 2024)
    "fedrep": ("head",),  # head personal, representation shared (Collins et al., 2021)
    "fedvpt": ("head",),  # prompts shared and averaged, head personal
    "pfedpg": ("head",),  # head personal; the prompts go up every round as P̃ for the generator (Yang et al., 2023)
    "vanilla_attention": ("attn", "head"),  # FedPerfix's "Vanilla Attention" baseline
})

_COMPILED = {word: re.compile(rx) for word, rx in WORDS.items()}
_GLOB_CHARS = frozenset("*?[.")


def _state_keys(model_or_state: Union[nn.Module, Mapping[str, Tensor]]) -> List[str]:
    if isinstance(model_or_state, nn.Module):
        return list(model_or_state.state_dict().keys())
    check_state(model_or_state, name="model_or_state")
    return list(model_or_state.keys())


def _match(keys: List[str], pattern: str) -> List[str]:
    if _GLOB_CHARS.intersection(pattern):
        return [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
    if pattern in _COMPILED:
        return [k for k in keys if _COMPILED[pattern].search(k)]
    if pattern in PRESETS:
        return [k for word in PRESETS[pattern] for k in _match(keys, word)]
    raise ValueError(
        f"unknown word {pattern!r}: known words are {sorted(WORDS)}, presets are {sorted(PRESETS)}; "
        f"for key names use a glob, e.g. '*{pattern}*'"
    )


def personal_keys(
    model_or_state: Union[nn.Module, Mapping[str, Tensor]], patterns: Union[str, Iterable[str]]
) -> List[str]:
    """The sorted list of state-dict keys selected by ``patterns`` (globs, words or presets; see the module doc).

    Args:
        model_or_state: a module (its ``state_dict()`` keys are used: frozen parameters and buffers included) or a
            state dict.
        patterns: one pattern or an iterable of them; the result is the union, e.g.
            ``["fedperfix", "*blocks.11.*"]`` (FedPerfix's CIFAR-100 split, last block personal too).

    Returns:
        Sorted key names. A pattern that selects nothing triggers a ``UserWarning`` (a typo must not silently send a
        personal layer to the server); an empty preset (``"fedavg"``) does not. So does a preset one of whose words
        matches nothing (``"fedpgp"`` on a model without a ``LowRankPrompt``).

    Raises:
        ValueError: a bare word that is neither in :data:`WORDS` nor in :data:`PRESETS`.
        TypeError: ``model_or_state`` is neither a module nor a ``Mapping[str, Tensor]``, or ``patterns`` is neither a
            str nor an iterable of str (``None``, ``b"head"``).
    """
    keys = _state_keys(model_or_state)
    patterns = _pattern_list(patterns)
    selected = set()
    for pattern in patterns:
        matched = _match(keys, pattern)
        empty_preset = pattern in PRESETS and not PRESETS[pattern]
        if not matched and not empty_preset:
            warnings.warn(f"personal_keys: pattern {pattern!r} matches no key", UserWarning, stacklevel=2)
        elif pattern in PRESETS and not _GLOB_CHARS.intersection(pattern):
            unmatched = [word for word in PRESETS[pattern] if not _match(keys, word)]
            if unmatched:  # e.g. "fedpgp" on a model without U and V: only the head would be kept
                warnings.warn(
                    f"personal_keys: preset {pattern!r} keeps {list(PRESETS[pattern])} personal, but "
                    f"{unmatched} match no key of this model (is it the model the preset is for?)",
                    UserWarning,
                    stacklevel=2,
                )
        selected.update(matched)
    return sorted(selected)


def _pattern_list(patterns: object) -> List[str]:
    """``patterns`` as a list of str: one str, or an iterable of them; a clear ``TypeError`` for anything else."""
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (bytes, bytearray)) or not isinstance(patterns, Iterable):
        raise TypeError(
            f"patterns must be a str or an iterable of str (e.g. 'fedperfix' or ['head', '*blocks.11.*']), "
            f"got {type(patterns).__name__} {patterns!r}"
        )
    out = list(patterns)
    for pattern in out:
        if not isinstance(pattern, str):
            raise TypeError(f"patterns must be str, got {type(pattern).__name__} {pattern!r} in {out!r}")
    return out


def trainable_keys(model: nn.Module) -> List[str]:
    """Sorted names of ``model``'s parameters with ``requires_grad=True`` (tied parameters under every name).

    A state dict also holds frozen parameters and buffers; what a round actually sends is the trainable, shared part:
    ``split({k: state[k] for k in trainable_keys(model)}, personal)[0]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sorted({n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad})


def trainable_state(model: nn.Module) -> Dict[str, Tensor]:
    """Detached copies of ``model``'s trainable parameters, by name in ``trainable_keys`` order: what a client uploads.

    Copies, not views: ``state_dict()`` tensors share storage with the live parameters, so an upload kept without a
    copy would silently change as local training goes on. Typical client step::

        shared, personal = fed.split(fed.trainable_state(model), fed.personal_keys(model, "fedperfix"))
    """
    keys = trainable_keys(model)  # also checks the type
    params = dict(model.named_parameters(remove_duplicate=False))
    return {k: params[k].detach().clone() for k in keys}


def split(state: Mapping[str, Tensor], keys: Iterable[str]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Split ``state`` into ``(shared, personal)``: ``personal`` holds ``keys``, ``shared`` everything else.

    Both are new dicts in ``state``'s key order holding the same tensor objects (no copy, like ``state_dict()``).
    ``merge(*split(state, keys)) == state``, tensor for tensor.

    Raises:
        ValueError: a key in ``keys`` is not in ``state``.
        TypeError: ``keys`` is a single str (wrap it in a list), not an iterable, holds a non-str, or ``state`` is not
            a ``Mapping[str, Tensor]``.
    """
    check_state(state)
    if isinstance(keys, str):
        raise TypeError(f"keys must be an iterable of key names, got the str {keys!r}; wrap it in a list")
    if isinstance(keys, bytes) or not isinstance(keys, Iterable):
        raise TypeError(
            f"keys must be an iterable of key names (e.g. fed.personal_keys(...)), got {type(keys).__name__} {keys!r}"
        )
    keys = list(keys)
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"keys must be str, got {type(k).__name__} {k!r}")
    keys = set(keys)
    missing = keys - state.keys()
    if missing:
        raise ValueError(f"split(): keys not in state: {format_keys(missing)}")
    shared = {k: v for k, v in state.items() if k not in keys}
    personal = {k: v for k, v in state.items() if k in keys}
    return shared, personal


def merge(shared: Mapping[str, Tensor], personal: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The union of two disjoint state dicts (shared keys first), e.g. the new aggregate and a client's own part.

    A new dict holding the same tensor objects (no copy); ready for ``model.load_state_dict``.

    Raises:
        ValueError: a key is in both (which one should win is ambiguous, so neither does).
    """
    check_state(shared, name="shared")
    check_state(personal, name="personal")
    overlap = shared.keys() & personal.keys()
    if overlap:
        raise ValueError(f"merge(): keys in both shared and personal: {format_keys(overlap)}")
    return {**shared, **personal}


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of ``model``'s frozen state (every state-dict entry that
    is not a trainable parameter), in sorted key order: equal on two machines iff their frozen backbones are equal."""
    trainable = set(trainable_keys(model))
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        if k in trainable:
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
