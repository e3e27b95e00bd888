"""VPT: learned prompt tokens inserted into a frozen timm Vision Transformer (Jia et al., ECCV 2022).

Token layout entering block 0 (prefix = class / register / distillation tokens, no positional embedding on prompts)::

    [ prefix (n_p) | prompts P_0 (K) | patches + pos (N) ]        length n_p + K + N

Deep VPT replaces the K prompt slots before every block i ≥ 1 with layer i's prompts ``P_i`` (they do not
accumulate). By default (``pooling="img_pool"``) the prompt slots are removed before the final norm, so every pooling
mode sees exactly its usual tokens; ``pooling="original"`` keeps them, as VPT's code does by default on globally pooled
backbones (its ``MODEL.PROMPT.VIT_POOL_TYPE``): there ``avg`` pooling averages the prompts into the feature.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import _freeze, _ownership, _timm
from ._checks import check_data, check_fits, check_flag
from .init import vpt_uniform_
from .summary import SummaryMixin

__all__ = ["POOLINGS", "VPT"]

#: what the pooling of a prompted model sees (VPT's ``VIT_POOL_TYPE`` names): image tokens only, or prompts too
POOLINGS = ("img_pool", "original")


def _drop_slots(x: Tensor, n_p: int, k: int) -> Tensor:
    """(B, n_p + K + N, D) → (B, n_p + N, D): the K prompt slots after the prefix tokens removed."""
    if not k:
        return x
    return torch.cat([x[:, :n_p], x[:, n_p + k :]], dim=1) if n_p else x[:, k:]


def _check_images(x: object) -> None:
    """``x`` must be a batch of images (B, C, H, W): one image (C, H, W) would run through timm's patch embedding
    unbatched and fail far from here."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor of images (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (one image? use x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}{hint}")


class VPT(SummaryMixin, nn.Module):
    """Visual Prompt Tuning around a timm ``VisionTransformer`` or ``Eva``, or a ``transformers`` ViT / DeiT / DINOv2
    model; the backbone is frozen, prompts (and head) train. On an Eva (DINOv3, EVA-02, PE, RoPE ViTs) the prompts get no rotary embedding either: every attention
    treats them as K more prefix tokens (``_timm_eva.skip_rope``).

    Args:
        vit: a timm ``VisionTransformer`` (any of the family, see ``fedpeft._timm.SUPPORTED_MODELS``) or a supported
            ``transformers`` model (``fedpeft._hf.SUPPORTED_CLASSES``; ``forward`` then returns its logits, or the
            pooled output of a bare ``*Model``, as a tensor). It is kept as ``self.model`` with its structure and
            state-dict keys untouched; ``unwrap()`` returns it.
        num_prompts: K, prompt tokens per layer (0 gives exactly the plain model).
        deep: one prompt set per block (VPT-deep) instead of one set before block 0 (VPT-shallow).
        dropout: dropout on the prompt tokens (VPT uses 0.1 on some tasks; 0 by default).
        prompts: optional prompt source: an ``nn.Module`` whose ``forward()`` returns ``(L, K, D)`` (e.g.
            ``LowRankPrompt``), used instead of an own parameter.
        train_head: keep the classifier(s) trainable (``head``, and ``head_dist`` for distilled DeiT).
        pooling: what the model's pooling sees, by VPT's names (``MODEL.PROMPT.VIT_POOL_TYPE``, Jia et al.'s code):
            ``"img_pool"`` (default): the prompt tokens are removed before the final norm, so every pooling mode
            (``token``, ``avg``, ``map`` …) sees exactly the tokens it sees without prompts; ``"original"`` (VPT's
            default for globally pooled backbones such as MAE): the prompt tokens stay after the prefix tokens, so
            ``avg`` pooling averages them into the feature, ``mean([P ; patches])``, and ``forward_features`` returns
            (B, n_p + K + N, D). With class-token pooling both give the same output.

    Attributes:
        prompts: ``nn.Parameter`` of shape ``(L, K, D)`` with ``L = depth if deep else 1``, initialised
            U(−v, v), ``v = sqrt(6 / (3·p² + D))`` (p = patch size); or the given prompt module.

    Freezing: every backbone parameter gets ``requires_grad=False`` (the head keeps ``requires_grad=train_head``).
    While the backbone is frozen, ``train()`` leaves it in eval mode (no dropout / drop-path in the frozen model); the
    prompt dropout follows ``train()``/``eval()``.

    Shapes: ``forward(x)`` with ``x`` (B, C, H, W) returns the model's usual output (B, num_classes).

    Raises ``TypeError`` for a non-bool ``deep``/``train_head`` (``deep="False"`` is not false) and ``ValueError`` for a
    ViT another live fedpeft wrapper already wraps (it would change that wrapper's trainable set; wrap the wrapper or
    a ``copy.deepcopy`` of the ViT, see ``fedpeft/_ownership.py``); the ViT is untouched then.
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
        num_prompts: int,
        deep: bool = False,
        dropout: float = 0.0,
        prompts: Optional[nn.Module] = None,
        train_head: bool = True,
        pooling: str = "img_pool",
    ) -> None:
        super().__init__()
        vit = _timm.as_vision_transformer(vit)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} (VPT's VIT_POOL_TYPE), got {pooling!r}")
        deep = check_flag("deep", deep)
        train_head = check_flag("train_head", train_head)
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 0:
            raise ValueError(f"num_prompts must be an int >= 0, got {num_prompts!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if prompts is not None and not isinstance(prompts, nn.Module):
            raise TypeError(
                f"prompts must be None or an nn.Module returning (L, K, D), got {type(prompts).__name__}; "
                "to run with a prompt tensor, pass it to forward(x, prompts=P)"
            )
        self.num_prompts = num_prompts
        self.pooling = pooling
        self.deep = bool(deep)
        self.prompt_depth = _timm.depth(vit) if self.deep else 1
        self.embed_dim = _timm.embed_dim(vit)
        self.train_head = bool(train_head)
        expected = (self.prompt_depth, num_prompts, self.embed_dim)
        if prompts is None:
            ref = next(vit.parameters())
            self.prompts: Union[nn.Parameter, nn.Module] = nn.Parameter(
                torch.empty(expected, device=ref.device, dtype=ref.dtype)
            )
        else:
            with torch.no_grad():
                out = prompts()
            if not isinstance(out, Tensor) or tuple(out.shape) != expected:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"the prompt module must return shape (L, K, D) = {expected}, got {got}")
            self.prompts = prompts
        self.prompt_dropout = nn.Dropout(float(dropout))
        self._patch_area = _timm.patch_area(vit)
        _ownership.claim(vit, self, exclusive=True)  # last check: a ViT another live wrapper holds is refused
        _freeze.freeze_backbone(vit, train_head=self.train_head)
        self.model = vit
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the own prompt parameter with VPT's uniform init (a prompt module keeps its own init)."""
        if isinstance(self.prompts, nn.Parameter):
            vpt_uniform_(self.prompts, self._patch_area, self.embed_dim)

    # ---- prompts ------------------------------------------------------------------------------------------------

    def prompt_tensor(self) -> Tensor:
        """The current prompts, ``(L, K, D)``: the own parameter, or the prompt module's output."""
        return self.prompts if isinstance(self.prompts, nn.Parameter) else self.prompts()

    def get_prompts(self) -> Tensor:
        """A detached copy of the current prompts (L, K, D): what a pFedPG client sends back as P̃_n.

        A copy, so a later ``set_prompts`` (which writes in place) cannot change what was sent.
        """
        return self.prompt_tensor().detach().clone()

    @torch.no_grad()
    def set_prompts(self, prompts: Tensor) -> None:
        """Copy ``prompts`` (L, K, D) into the own prompt parameter (detached), e.g. a generator's ``P_n``.

        pFedPG's client step: ``vpt.set_prompts(gen(ids)[i])``, train, send back ``vpt.get_prompts()``.
        Raises ``TypeError`` if the prompts come from a module, are not floating-point or are a meta tensor,
        ``ValueError`` on a shape mismatch or on values that are not finite once stored in the prompts' dtype (NaN,
        Inf, float64 ``1e300`` into float32); the prompts are unchanged then.
        """
        if not isinstance(self.prompts, nn.Parameter):
            raise TypeError(
                f"set_prompts needs VPT's own prompt parameter; this VPT reads its prompts from a "
                f"{type(self.prompts).__name__} module"
            )
        if not isinstance(prompts, Tensor):
            raise TypeError(f"prompts must be a Tensor, got {type(prompts).__name__}")
        if prompts.shape != self.prompts.shape:
            raise ValueError(
                f"prompts must have shape (L, K, D) = {tuple(self.prompts.shape)}, got {tuple(prompts.shape)}"
            )
        if not prompts.is_floating_point():
            raise TypeError(f"prompts must be a floating-point tensor, got dtype {prompts.dtype}")
        check_data("prompts", prompts, beside=self.prompts)
        try:  # finite in the dtype they are stored in: float64 1e300 would become inf in float32 prompts
            check_fits("prompts", prompts, self.prompts.dtype)
        except ValueError as e:
            raise ValueError(f"{e}; the VPT prompts were left unchanged") from None
        self.prompts.copy_(prompts.detach())

    def _prompts_for_batch(self, prompts: Optional[Tensor], x: Tensor) -> Tensor:
        """Resolve and check the prompts of one forward call → (B, L, K, D) (a broadcast view when shared)."""
        p = self.prompt_tensor() if prompts is None else prompts
        if not isinstance(p, Tensor):
            raise TypeError(f"prompts must be a Tensor of shape (L, K, D) or (B, L, K, D), got {type(p).__name__}")
        if not p.is_floating_point():  # a complex tensor would lose its imaginary part in the cast below
            raise TypeError(f"prompts must be a floating-point tensor, got dtype {p.dtype}")
        check_data("prompts", p, beside=x)
        batch = x.shape[0]
        L, D = self.prompt_depth, self.embed_dim
        if p.dim() == 3 and p.shape[0] == L and p.shape[2] == D:
            p = p.unsqueeze(0).expand(batch, -1, -1, -1)
        elif not (p.dim() == 4 and p.shape[0] == batch and p.shape[1] == L and p.shape[3] == D):
            raise ValueError(
                f"prompts must have shape (L, K, D) or (B, L, K, D) with L={L}, D={D}, B={batch} "
                f"(K may be any length), got {tuple(p.shape)}"
            )
        return self.prompt_dropout(p)

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward_features(self, x: Tensor, prompts: Optional[Tensor] = None) -> Tensor:
        """Images (B, C, H, W) → normed tokens (B, n_p + N, D), prompt tokens already removed (kept with
        ``pooling="original"``: (B, n_p + K + N, D)).

        ``prompts`` overrides the module's own prompts for this call: (L, K, D) shared, or (B, L, K, D) per sample,
        floating-point (complex, integer and meta tensors raise ``TypeError``). ``x`` other than 4-D raises
        ``ValueError``.
        """
        return _timm.final_norm(self.model, self._forward_tokens(x, prompts)[0])

    def _forward_tokens(
        self, x: Tensor, prompts: Optional[Tensor], take: Sequence[int] = (), last: Optional[int] = None
    ) -> Tuple[Tensor, List[Tensor]]:
        """Run the prompted blocks ``0..last`` (all if ``None``) → ``(tokens after the last one, [tokens after each
        block in take])``, every tensor (B, n_p + N, D) with the prompt slots removed (the last one keeps them with
        ``pooling="original"``) and not normed."""
        vit = self.model
        _check_images(x)
        x, pos = _timm.embed_positions(vit, x)  # (B, n_p + N, D); pos: an Eva's RoPE (None for a ViT)
        p = self._prompts_for_batch(prompts, x).to(x.dtype)  # (B, L, K, D)
        n_p, K = _timm.num_prefix_tokens(vit), p.shape[2]
        if K:
            x = torch.cat([x[:, :n_p], p[:, 0], x[:, n_p:]], dim=1)  # [prefix | P_0 | patches]
            pos = _timm.skip_positions(vit, pos, K)  # Eva: no RoPE on the prompts (identity rotations)
        x = _timm.pre_norm(vit, x)
        ckpt = _timm.uses_grad_checkpointing(vit) and torch.is_grad_enabled()
        taken: List[Tensor] = []
        for i, block in enumerate(_timm.blocks(vit)):
            if last is not None and i > last:
                break
            if i > 0 and self.deep and K:
                x = torch.cat([x[:, :n_p], p[:, i], x[:, n_p + K :]], dim=1)  # replace the prompt slots
            kw = _timm.block_kwargs(vit, pos, i)
            x = checkpoint(block, x, use_reentrant=False, **kw) if ckpt else block(x, **kw)
            if i in take:
                taken.append(_drop_slots(x, n_p, K))
        return (x if self.pooling == "original" else _drop_slots(x, n_p, K)), taken

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        prompts: Optional[Tensor] = None,
    ) -> Union[List[Any], Tuple[Tensor, List[Any]]]:
        """timm's ``forward_intermediates`` (the signature of ``Eva``'s; ``VisionTransformer``'s ``output_dict``,
        ``attn_mask``, ``is_causal`` are not offered) on the prompted model, prompt tokens removed everywhere.

        ``indices``: the last n blocks (int), or these block indices (list), or all (``None``). Each intermediate is
        the output of its block (``norm=True``: passed through the final norm), split into patch tokens, as
        (B, D, H', W') for ``output_fmt="NCHW"`` or (B, N, D) for ``"NLC"``, and, with ``return_prefix_tokens``,
        paired with its (B, n_p, D) prefix tokens. Returns the list (``intermediates_only``) or
        ``(forward_features-like normed final tokens, list)``; with ``stop_early`` the blocks after the last
        requested one are not run (the final tokens are then those of that block, as in timm).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        vit = self.model
        take, max_index = _timm.feature_take_indices(_timm.depth(vit), indices)
        _check_images(x)
        B, _, height, width = x.shape
        final, inter = self._forward_tokens(x, prompts, take=take, last=max_index if stop_early else None)
        if norm:
            inter = [_timm.final_norm(vit, y) for y in inter]
        n_p = _timm.num_prefix_tokens(vit)
        prefix = [y[:, :n_p] for y in inter]
        inter = [y[:, n_p:] for y in inter]
        if output_fmt == "NCHW":
            H, W = _timm.feature_grid(vit, (height, width))
            inter = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        out: List[Any] = list(zip(inter, prefix)) if return_prefix_tokens and n_p else inter
        return out if intermediates_only else (_timm.final_norm(vit, final), out)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's own pooling and head on the prompt-free tokens of ``forward_features``."""
        return _timm.forward_head(self.model, x, pre_logits=check_flag("pre_logits", pre_logits))

    def forward(self, x: Tensor, prompts: Optional[Tensor] = None) -> Tensor:
        """Images (B, C, H, W) → logits (B, num_classes); ``prompts`` as in ``forward_features``."""
        return self.forward_head(self.forward_features(x, prompts))

    # ---- wrapper protocol ---------------------------------------------------------------------------------------

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """``copy.deepcopy`` / ``pickle``: the copy holds its own copy of the ViT, and claims it like the original."""
        super().__setstate__(state)
        _ownership.claim(self.model, self, exclusive=True)

    def train(self, mode: bool = True) -> VPT:
        super().train(mode)
        _freeze.apply_train_mode(self.model, mode)
        return self

    def unwrap(self) -> nn.Module:
        """The user's ViT, structure and state-dict keys untouched (its ``requires_grad`` flags are VPT's)."""
        return self.model

    def adapter_config(self) -> Dict[str, Any]:
        """Hyper-parameters recorded in adapter files (see ``fedpeft.save_adapter``)."""
        return {
            "method": "VPT",
            "num_prompts": self.num_prompts,
            "deep": self.deep,
            "dropout": self.prompt_dropout.p,
            "train_head": self.train_head,
            "pooling": self.pooling,
            "prompt_source": "parameter" if isinstance(self.prompts, nn.Parameter) else type(self.prompts).__name__,
            "prompt_module": _prompt_module_config(self.prompts),
            "backbone": type(self.model).__name__,
            "embed_dim": self.embed_dim,
            "depth": _timm.depth(self.model),
        }

    def extra_repr(self) -> str:
        pooling = f", pooling={self.pooling!r}" if self.pooling != "img_pool" else ""
        return f"num_prompts={self.num_prompts}, deep={self.deep}, prompt_depth={self.prompt_depth}{pooling}"


def _prompt_module_config(prompts: Union[nn.Parameter, nn.Module]) -> Optional[Dict[str, Any]]:
    """A prompt module's own hyper-parameters (e.g. ``LowRankPrompt``'s rank) for adapter files; None for the parameter."""
    if isinstance(prompts, nn.Parameter):
        return None
    config = getattr(prompts, "adapter_config", None)
    return config() if callable(config) else {"method": type(prompts).__name__}
