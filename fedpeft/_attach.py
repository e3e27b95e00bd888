"""Shared plumbing of the attention adapters (``ParallelPrefix``, ``Prefix``): what they wrap, which layers they
touch, which parameters train, and how they hand the model back.

Both adapters change a ViT's attention *in place* without replacing any module, so the user's model keeps its
structure and timm's state-dict keys:

- ``ParallelPrefix`` registers a forward hook on each adapted ``attn.qkv`` (``RemovableHandle`` kept);
- ``Prefix`` puts an instance-level ``forward`` on each adapted ``attn`` (the class's forward is untouched).
- On timm's Eva attention (``EvaAttention``, ``AttentionRope``) and on a transformers attention (separate
  q/k/v projections, ``_hf.py``) both use one instance-level ``forward``, ``AdapterSlots``, with one slot per adapter
  (``offset`` for ParallelPrefix, ``prefix`` for Prefix): Eva's fused projection is often ``F.linear`` on
  ``qkv.weight`` (no module call a hook could see) and RoPE must skip the prefix keys; a transformers attention needs
  one A for both K and V, and SDPA whatever its ``attn_implementation``. The slots compose in either wrapping order;
  the ``forward`` is deleted once both are empty.

``AttentionWrapper.eject()`` undoes exactly that and returns the user's model plain.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _freeze, _ownership, _timm
from ._checks import check_flag
from ._wrapping import innermost, is_wrapper

__all__ = [
    "AdapterSlots",
    "AttentionWrapper",
    "adapter_slot",
    "clear_adapter_slot",
    "has_forward_override",
    "remove_handles",
    "resolve_blocks",
    "set_adapter_slot",
]


def resolve_blocks(blocks: Optional[Iterable[int]], depth: int) -> Tuple[int, ...]:
    """``None`` → every block; else the given indices (negative ones count from the end), sorted, each once."""
    if blocks is None:
        return tuple(range(depth))
    if isinstance(blocks, (int, str, bytes)) or not isinstance(blocks, Iterable):
        raise TypeError(
            f"blocks must be None or an iterable of block indices (e.g. [9, 10, 11]), got {blocks!r}"
        )
    given = list(blocks)
    out = []
    for i in given:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"block indices must be ints, got {i!r} in {given!r}")
        i = operator.index(i)
        if not -depth <= i < depth:
            raise ValueError(
                f"block index {i} out of range for a ViT with {depth} blocks (valid: 0..{depth - 1})"
            )
        out.append(i % depth)
    if not out:
        raise ValueError("blocks is empty; pass None to adapt every block")
    if len(set(out)) != len(out):
        raise ValueError(f"blocks lists a block twice: {given!r}")
    return tuple(sorted(out))


def has_forward_override(module: nn.Module) -> bool:
    """Whether ``module`` carries an instance-level ``forward`` (a ``Prefix`` or someone else's patch)."""
    return "forward" in vars(module)


class _GradThroughReentrantCheckpoint:
    """Forward hook on the blocks' input (``_timm.register_block_input_hook``): while the model checkpoints its
    blocks with torch's *reentrant* checkpoint and grad is enabled, a block input that does not require grad (a
    frozen backbone) is replaced by a detached copy that does. Otherwise the reentrant checkpoint, which only
    back-propagates when an *input* requires grad, would silently give the adapters inside no gradient (torch only
    warns "None of the inputs have requires_grad=True"). peft's ``enable_input_require_grads`` does the same.
    Cost: the input gradient of block 0, which is otherwise skipped."""

    def __init__(self, vit: nn.Module) -> None:
        self.vit = vit

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Optional[Tensor]:
        if torch.is_grad_enabled() and not output.requires_grad and _timm.uses_reentrant_checkpointing(self.vit):
            return output.detach().requires_grad_(True)
        return None


class AdapterSlots:
    """Instance-level ``forward`` of an adapted Eva or transformers attention: ``_timm.eva_attention_forward`` or
    ``_timm.hf_attention_forward`` with the adapters in its slots. ``offset``: a ``KVAdapter`` (ParallelPrefix);
    ``prefix``: an object with ``tokens() -> (K_p, V_p)`` and ``mask(attn_mask, is_causal, n, p, device)`` (Prefix).
    Deep-copyable like the adapters' other hooks."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self.offset: Optional[Any] = None
        self.prefix: Optional[Any] = None

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        kv_prefix = self.prefix.tokens() if self.prefix is not None else None
        if not _timm.is_eva_attention(self.attn):  # transformers: (hidden_states, mask, **kwargs) → (out, None)
            return _timm.hf_attention_forward(self.attn, x, *args, kv_offset=self.offset, kv_prefix=kv_prefix, **kwargs)
        return self._eva(x, *args, kv_prefix=kv_prefix, **kwargs)

    def _eva(
        self,
        x: Tensor,
        rope: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        *,
        kv_prefix: Optional[Tuple[Tensor, Tensor]],
    ) -> Tensor:
        if kv_prefix is not None:
            attn_mask = self.prefix.mask(attn_mask, is_causal, x.shape[1], kv_prefix[0].shape[-2], x.device)
            is_causal = False
        return _timm.eva_attention_forward(
            self.attn, x, rope, attn_mask, is_causal, kv_offset=self.offset, kv_prefix=kv_prefix
        )


def adapter_slot(attn: nn.Module, slot: str) -> Optional[Any]:
    """What occupies ``slot`` of an Eva / transformers attention (``None`` if empty). Raises ``ValueError`` if someone
    else's instance-level ``forward`` sits there (fedpeft would silently replace it)."""
    fwd = vars(attn).get("forward")
    if fwd is None:
        return None
    if not isinstance(fwd, AdapterSlots) or fwd.attn is not attn:
        raise ValueError(
            f"this {type(attn).__name__} already has an instance-level forward that is not fedpeft's "
            f"({type(fwd).__name__}); remove it first (the model is unchanged)"
        )
    return getattr(fwd, slot)


def set_adapter_slot(attn: nn.Module, slot: str, value: Any) -> None:
    fwd = vars(attn).get("forward")
    if fwd is None:
        fwd = attn.forward = AdapterSlots(attn)
    setattr(fwd, slot, value)


def clear_adapter_slot(attn: nn.Module, slot: str, owner: Any) -> None:
    """Empty ``slot`` if ``owner`` (compared by ``is``) holds it; delete the ``forward`` when no slot is used."""
    fwd = vars(attn).get("forward")
    if isinstance(fwd, AdapterSlots) and getattr(fwd, slot) is owner:
        setattr(fwd, slot, None)
        if fwd.offset is None and fwd.prefix is None:
            del attn.forward


def _resolve_target(vit_or_wrapper: nn.Module) -> Tuple[nn.Module, nn.Module, bool]:
    """→ ``(inner module to hold as .model, the user's ViT, whether inner is a fedpeft wrapper)``."""
    if not isinstance(vit_or_wrapper, nn.Module):
        raise TypeError(
            f"expected a timm or transformers ViT or a fedpeft wrapper (e.g. VPT), got {type(vit_or_wrapper).__name__}"
        )
    wraps = is_wrapper(vit_or_wrapper)
    return vit_or_wrapper, _timm.as_vision_transformer(innermost(vit_or_wrapper)), wraps


class AttentionWrapper(nn.Module):
    """Base of ``ParallelPrefix`` and ``Prefix``: holds the wrapped module as ``self.model``, delegates ``forward``,
    applies the freezing rule, and implements ``unwrap()`` / ``eject()``.

    Subclasses call ``super().__init__``, validate and collect their layers (raising before any change), create
    their parameters, attach, and finally call ``self._configure_training()``. They implement ``_detach()``.
    """

    def __init__(
        self, vit_or_wrapper: nn.Module, *, train_backbone: bool, train_head: Optional[bool]
    ) -> None:
        super().__init__()
        train_backbone = check_flag("train_backbone", train_backbone)
        train_head = check_flag("train_head", train_head, allow_none=True)
        inner, vit, is_wrapper = _resolve_target(vit_or_wrapper)
        _ownership.check_free(inner, exclusive=False)  # not a ViT a VPT holds; claimed in _configure_training
        self.model = inner
        self.wraps_wrapper = is_wrapper
        self.train_backbone = train_backbone
        self._train_head_arg = train_head
        self.train_head = True if train_head is None and not is_wrapper else train_head
        self.ejected = False
        self.depth = _timm.depth(vit)

    # ---- construction helpers -----------------------------------------------------------------------------------

    def _vit(self) -> nn.Module:
        return innermost(self.model)

    def _attention_layers(self, indices: Iterable[int]) -> Dict[int, nn.Module]:
        """Validate every requested layer first (``_timm.attention_layer`` raises for what we would get wrong)."""
        vit = self._vit()
        return {i: _timm.attention_layer(vit, i) for i in indices}

    def _reference_tensor(self) -> Tensor:
        return next(self._vit().parameters())

    def _configure_training(self) -> None:
        """The freezing rule (``docs/prefix.md``), applied once the adapter is attached.

        - plain ViT, ``train_backbone=False``: backbone frozen, classifier(s) ``requires_grad = train_head``;
        - ``train_backbone=True``: every backbone parameter trains (FedPerfix), classifier(s) per ``train_head``;
        - wrapping a fedpeft wrapper (e.g. VPT) with ``train_backbone=False``: the wrapper's choices are kept; the
          classifier follows ``train_head`` only if it was given.
        """
        _ownership.claim(self.model, self, exclusive=False)
        vit = self._vit()
        self._input_grad_handle = _timm.register_block_input_hook(vit, _GradThroughReentrantCheckpoint(vit))
        head = _freeze.classifier_param_ids(vit)
        if not self.wraps_wrapper and not self.train_backbone:
            _freeze.freeze_backbone(vit, train_head=bool(self.train_head))
            return
        if self.train_backbone:
            _freeze.unfreeze(p for p in vit.parameters() if id(p) not in head)
        if self._train_head_arg is not None:
            for p in vit.parameters():
                if id(p) in head:
                    p.requires_grad_(self._train_head_arg)
        if self.train_head is None:  # keep the wrapper's choice, recorded for adapter_config()
            self.train_head = any(p.requires_grad for p in vit.parameters() if id(p) in head)

    def _common_config(self) -> Dict[str, Any]:
        vit = self._vit()
        return {
            "train_backbone": self.train_backbone,
            "train_head": self.train_head,
            "backbone": type(vit).__name__,
            "embed_dim": _timm.embed_dim(vit),
            "depth": self.depth,
            "wraps": self.model.adapter_config()["method"] if self.wraps_wrapper else None,
        }

    # ---- forward ------------------------------------------------------------------------------------------------

    def _check_attached(self) -> None:
        if self.ejected:
            raise RuntimeError(
                f"this {type(self).__name__} was ejected; its model runs plain now (use the model eject() returned)"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward (``vit(x)``, or ``vpt(x, prompts=P)``) with the adapted attention; a tensor
        (the logits) for a transformers model too (``_timm.forward``)."""
        self._check_attached()
        if self.wraps_wrapper:
            return self.model(*args, **kwargs)
        return _timm.forward(self.model, *args, **kwargs)

    def forward_features(self, *args: Any, **kwargs: Any) -> Tensor:
        """The wrapped module's ``forward_features`` (normed tokens), with the adapted attention."""
        self._check_attached()
        if self.wraps_wrapper:
            return self.model.forward_features(*args, **kwargs)
        return _timm.forward_features(self.model, *args, **kwargs)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooling and classifier(s) on the tokens of ``forward_features``."""
        if self.wraps_wrapper:
            return self.model.forward_head(x, pre_logits=pre_logits)
        return _timm.forward_head(self.model, x, pre_logits=pre_logits)

    # ---- wrapper protocol ---------------------------------------------------------------------------------------

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """``copy.deepcopy`` / ``pickle``: the copy claims its own copy of the wrapped module, like the original."""
        super().__setstate__(state)
        if not self.ejected:
            _ownership.claim(self.model, self, exclusive=False)

    def train(self, mode: bool = True) -> AttentionWrapper:
        super().train(mode)
        _freeze.apply_train_mode(self._vit(), mode)
        return self

    def unwrap(self) -> nn.Module:
        """The user's ViT (through any inner wrapper), like peft's ``get_base_model()``: its structure and state-dict
        keys are untouched, but the adapter is still attached to its attention layers, so running it alone still
        applies the adapter. Use ``eject()`` to get it back plain."""
        return self._vit()

    def eject(self) -> nn.Module:
        """Detach the adapter from the attention layers and return the user's ViT, running exactly as before.

        ``requires_grad`` flags are left as they are. The wrapper cannot run afterwards (its parameters stay readable,
        e.g. for ``state_dict()``). Calling ``eject()`` again is a no-op.
        """
        if not self.ejected:
            self._detach()
            self._input_grad_handle.remove()
            self.ejected = True
            _ownership.release(self.model, self)
        return self._vit()

    def _detach(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def remove_handles(handles: List[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()
