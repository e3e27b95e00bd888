"""PromptGenerator: pFedPG's server-side cross-attention prompt generator (Yang et al., ICCV 2023, Eq. 3).

For client n, with descriptor tokens ``d_n`` (T, D) and the shared prompt basis ``P_base`` (M, D), M = depth·K::

    P_n = P_base + softmax( (d_n W_Q)(P_base W_K)ᵀ / sqrt(l_k) ) (P_base W_V) W_O          (M, D) → (depth, K, D)

``heads`` splits the D columns of Q, K, V into H heads of l_k = l_v = D / H (H = 1 is the paper's Eq. 3, l_k = D),
concatenated before W_O, as in ``nn.MultiheadAttention``. By default the projections carry no bias, exactly as Eq. 3,
and W_Q, W_K are D × D; ``bias=True`` and ``kdim`` (the width of Q and K, l_k = kdim / H) build the shapes of the
public pFedPG generators (``nn.Linear`` with biases; one uses a key width of 512 at D = 768), so their weights load.

Every query token of a client attends over all M = depth·K tokens of ``P_base``: Eq. 3 treats the basis as one set,
so with deep prompts a layer-l token may retrieve from every layer's basis tokens. Descriptor layouts:

- ``descriptor_tokens=None`` (T = M): one query per prompt token, a per-token offset (the default).
- ``descriptor_tokens=1`` (T = 1): one descriptor vector per client; its single offset is added to every token.

The server learns the generator from the clients' trained prompts P̃_n only: ``fed.delta_backward(gen(ids), P̃)``
back-propagates ``P_n − P̃_n`` (= −ΔP_n), so the next ``optimizer.step()`` moves every P_n toward its P̃_n
(see ``fedpeft/fed/prompt_update.py`` and docs/federated.md for the sign).
"""

from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_data, check_flag, check_float_dtype, check_positive_int
from .init import vpt_uniform_, vpt_uniform_bound

__all__ = ["PromptGenerator"]

#: the generator's initialisations (see ``PromptGenerator``)
INITS = ("unit_logits", "vpt")


def _patch_area(patch_size: Union[int, Tuple[int, int]]) -> int:
    if isinstance(patch_size, (tuple, list)) and len(patch_size) == 2:
        return check_positive_int("patch_size[0]", patch_size[0]) * check_positive_int("patch_size[1]", patch_size[1])
    if isinstance(patch_size, int) and not isinstance(patch_size, bool) and patch_size > 0:
        return patch_size * patch_size
    raise ValueError(f"patch_size must be a positive int or a pair (p_h, p_w), got {patch_size!r}")


class PromptGenerator(nn.Module):
    """pFedPG's prompt generator: client-specific prompts from a shared basis, by cross-attention (Eq. 3).

    Args:
        num_clients: C, rows of the descriptor bank (client ids are 0 … C−1).
        num_prompts: K, prompt tokens per layer (VPT's ``num_prompts``).
        embed_dim: D, the ViT's embedding dim (VPT's ``embed_dim``).
        depth: prompt layers, L: 1 for shallow VPT, ``len(vit.blocks)`` for deep VPT (VPT's ``prompt_depth``).
        heads: H, attention heads; must divide D. Default 1, the paper's Eq. 3 (l_k = l_v = D).
        descriptor_tokens: T, descriptor tokens per client: ``None`` (or L·K) for one query per prompt token, ``1``
            for one descriptor vector whose offset is broadcast on every token. Other values raise ``ValueError``.
        patch_size: the client ViT's patch size p (int or (p_h, p_w), timm: ``vit.patch_embed.patch_size``); only
            sets the init bound, so that ``prompt_base`` starts like the client's VPT prompts.
        init: ``"unit_logits"`` (default) or ``"vpt"``, see *Init* below. Only the initial values differ; the forward
            maths (Eq. 3) is the same.
        bias: give W_Q, W_K, W_V, W_O a bias (``nn.Linear(..., bias=True)``, as the public reference generators);
            default ``False``, Eq. 3 as written. The biases keep ``nn.Linear``'s default init.
        kdim: the width of the projected queries and keys (W_Q, W_K: D → kdim), divisible by ``heads``; the softmax
            scale is then 1/sqrt(kdim / H). Default ``None`` = D (the paper's l_k = D).
        device, dtype: factory arguments for all parameters.

    Parameters (state-dict names):
        prompt_base: P_base, (L·K, D): the basis as one token set, row ``l·K + k`` is layer l's token k.
        descriptors: the client descriptor bank, (C, T, D).
        q_proj, k_proj, v_proj, out_proj: ``nn.Linear``: W_Q, W_K (D → kdim), W_V, W_O (D → D), without bias unless
            ``bias=True`` (weights are the transposed matrices, ``q_proj(x) = x W_Q``).

    Init: ``prompt_base`` always as VPT prompts, U(−v, v), v = sqrt(6 / (3·p² + D)); ``v_proj`` and ``out_proj`` keep
    ``nn.Linear``'s default (Kaiming-uniform with a = √5, i.e. U(±1/sqrt(D))), so the attention offset starts small
    next to P_base and every client begins near the shared basis.

    - ``init="unit_logits"`` (default, a fedpeft choice; the paper gives no init): descriptors ~ N(0, 1),
      W_Q ~ N(0, 1/D) and W_K ~ N(0, 1/(D·s²)) with s² = mean(P_base²) at init. Then every entry of q = d W_Q and of
      k = P_base W_K has unit variance, and the logits q_h·k_h/sqrt(l_k) of every head have unit variance: the
      softmax starts away from uniform, so each client's descriptors receive a gradient of the same order as
      P_base's and the server can personalize.
    - ``init="vpt"`` (fedpeft ≤ 0.1): descriptors as VPT prompts too and W_Q, W_K nn.Linear's default. The logits then
      start at ≈ 1e-3 (uniform softmax), descriptors get ≈ 1e-4 of P_base's gradient, and under SGD at one rate
      (the paper's Eq. 5) the generated prompts stay client-agnostic (``benchmarks/study_pfedpg.py``).

    Shapes: ``forward(client_ids)`` with ``client_ids`` a 1-D integer tensor (n,) → prompts (n, L, K, D). Duplicate
    ids are allowed (their gradients add up).

    Batching: the n·T query tokens of all requested clients go through one ``scaled_dot_product_attention`` call
    along its query axis (queries never interact), in gcd(n, 16) groups of whole clients so that a CPU backward can
    use several threads; K and V of P_base are computed once and shared as expanded views. There is no loop over
    clients. ``gen(torch.arange(C))`` (every client, in order) also skips the gather of the descriptor bank.

    Cost: per query token, Eq. 3 as written costs 2·D² + 2·M·D multiply-adds (Q and output projections, then the
    attention). Since W_Q and W_O also act on the shared basis, the same result is
    ``Σ_h softmax(d_n (K_h W_Q,hᵀ)ᵀ / sqrt(l_k)) (V_h W_O,h)`` with the (M, D) products K_h W_Q,hᵀ and V_h W_O,h
    formed once per call: 2·H·M·D per token (W_Q,h: the D × l_k columns of head h, W_O,h: its l_v × D rows). The
    generator evaluates whichever order is cheaper, the folded one whenever (H − 1)·M < D (always with one head); both
    are Eq. 3 and agree to rounding.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        num_prompts: int,
        embed_dim: int,
        depth: int = 1,
        heads: int = 1,
        descriptor_tokens: Optional[int] = None,
        patch_size: Union[int, Tuple[int, int]] = 16,
        init: str = "unit_logits",
        bias: bool = False,
        kdim: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.num_clients = check_positive_int("num_clients", num_clients)
        self.num_prompts = check_positive_int("num_prompts", num_prompts)
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.depth = check_positive_int("depth", depth)
        self.heads = check_positive_int("heads", heads)
        if embed_dim % heads:
            raise ValueError(f"heads must divide embed_dim, got heads={heads} and embed_dim={embed_dim}")
        self.bias = check_flag("bias", bias)
        self.kdim = embed_dim if kdim is None else check_positive_int("kdim", kdim)
        if self.kdim % heads:
            raise ValueError(f"heads must divide kdim, got heads={heads} and kdim={self.kdim}")
        self.num_tokens = depth * num_prompts  # M, tokens of the basis
        if descriptor_tokens is None:
            descriptor_tokens = self.num_tokens
        if isinstance(descriptor_tokens, bool) or not isinstance(descriptor_tokens, int):
            raise TypeError(
                f"descriptor_tokens must be None or an int (1 or depth·num_prompts = {self.num_tokens}), got "
                f"{type(descriptor_tokens).__name__} {descriptor_tokens!r}"
            )
        if descriptor_tokens not in (1, self.num_tokens):
            raise ValueError(
                f"descriptor_tokens must be None or depth·num_prompts = {self.num_tokens} (one query per prompt "
                f"token) or 1 (one descriptor vector per client), got {descriptor_tokens!r}"
            )
        self.descriptor_tokens = descriptor_tokens
        self._patch_area = _patch_area(patch_size)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        M, D, factory = self.num_tokens, embed_dim, {"device": device, "dtype": check_float_dtype("dtype", dtype)}
        self.prompt_base = nn.Parameter(torch.empty(M, D, **factory))
        self.descriptors = nn.Parameter(torch.empty(num_clients, descriptor_tokens, D, **factory))
        self.q_proj = nn.Linear(D, self.kdim, bias=self.bias, **factory)
        self.k_proj = nn.Linear(D, self.kdim, bias=self.bias, **factory)
        self.v_proj = nn.Linear(D, D, bias=self.bias, **factory)
        self.out_proj = nn.Linear(D, D, bias=self.bias, **factory)
        # folded (2·H·M·D per query token) vs as written (2·D² + 2·M·D): see the class docstring; the folded order
        # is written for bias-free D × D projections only
        self._fold = not self.bias and self.kdim == D and heads * M < D + M
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw every parameter with the generator's ``init`` (see the class docstring)."""
        vpt_uniform_(self.prompt_base, self._patch_area, self.embed_dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.reset_parameters()
        if self.init == "vpt":
            vpt_uniform_(self.descriptors, self._patch_area, self.embed_dim)
            return
        D = self.embed_dim
        with torch.no_grad():
            self.descriptors.normal_(0.0, 1.0)
            s2 = float(self.prompt_base.detach().float().pow(2).mean()) if self.prompt_base.device.type != "meta" \
                else vpt_uniform_bound(self._patch_area, D) ** 2 / 3
            self.q_proj.weight.normal_(0.0, 1.0 / math.sqrt(D))
            self.k_proj.weight.normal_(0.0, 1.0 / math.sqrt(D * max(s2, 1e-30)))

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(self, client_ids: Union[Tensor, Sequence[int]]) -> Tensor:
        """Client ids (n,) → their prompts P_n, (n, L, K, D), with the autograd graph (for ``fed.delta_backward``).

        ``client_ids``: a 1-D integer tensor, or what ``torch.as_tensor`` makes one of (a list or tuple of ints, a
        NumPy integer array). Raises ``TypeError`` unless the ids are integers, ``ValueError`` unless they are 1-D,
        non-empty and every id lies in [0, num_clients).
        """
        return self._generate(self._check_ids(client_ids), fold=self._fold)

    def prompts_for(self, client_id: Union[int, Tensor]) -> Tensor:
        """One client's prompts, (L, K, D): ``gen(torch.tensor([client_id]))[0]``, e.g. for ``vpt.set_prompts``.

        ``client_id``: an int, a 0-d integer tensor (``ids[i]``) or a NumPy integer; ``TypeError`` otherwise.
        """
        if isinstance(client_id, Tensor):
            if client_id.dim() != 0 or client_id.dtype.is_floating_point or client_id.dtype.is_complex or (
                client_id.dtype == torch.bool
            ):
                raise TypeError(
                    f"client_id must be an int or a 0-d integer tensor, got a tensor of shape "
                    f"{tuple(client_id.shape)} and dtype {client_id.dtype}"
                )
            check_data("client_id", client_id)
        elif isinstance(client_id, bool) or not hasattr(client_id, "__index__"):
            raise TypeError(f"client_id must be an int or a 0-d integer tensor, got {type(client_id).__name__}")
        index = operator.index(client_id)
        if not 0 <= index < self.num_clients:  # checked here: beyond int64 no tensor could even hold it
            raise ValueError(f"client_id must lie in [0, num_clients) = [0, {self.num_clients}), got {index}")
        ids = torch.tensor([index], device=self.descriptors.device)
        return self(ids)[0]

    def _generate(self, ids: Tensor, *, fold: bool) -> Tensor:
        """Eq. 3 for the (checked, int64) ids in one SDPA call; ``fold`` picks the evaluation order (same maths)."""
        n, H, M, D = ids.shape[0], self.heads, self.num_tokens, self.embed_dim
        hd, hk = D // H, self.kdim // H  # l_v and l_k per head
        base = self.prompt_base  # (M, D)
        if n == self.num_clients and torch.equal(ids, torch.arange(n, device=ids.device)):
            d = self.descriptors  # (C, T, D): every client in order, no gather; its gradient is written in place
        else:
            d = self.descriptors.index_select(0, ids)  # (n, T, D)
        T = d.shape[1]
        B = math.gcd(n, 16)  # B groups of whole clients on SDPA's batch axis, n/B·T queries each on its query axis
        k = self.k_proj(base).view(M, H, hk).transpose(0, 1)  # (H, M, hk): K = P_base W_K, once for all
        v = self.v_proj(base).view(M, H, hd).transpose(0, 1)  # (H, M, hd): V = P_base W_V
        if fold:
            # (d W_Q,h) K_hᵀ = d (K_h W_Q,hᵀ)ᵀ and A_h V_h W_O,h = A_h (V_h W_O,h): fold W_Q, W_O into the basis
            k = k @ self.q_proj.weight.view(H, hk, D)  # (H, M, D): W_Q,hᵀ = q_proj.weight's rows of head h
            v = v @ self.out_proj.weight.view(D, H, hd).permute(1, 2, 0)  # (H, M, D): its columns of head h
            q = d.view(B, 1, n // B * T, D).expand(B, H, n // B * T, D)  # a view
        else:
            q = self.q_proj(d).view(B, n // B * T, H, hk).transpose(1, 2)  # (B, H, n/B·T, hk)
        o = F.scaled_dot_product_attention(
            q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), scale=1.0 / math.sqrt(hk)
        )  # (B, H, n/B·T, D or hd)
        if fold:
            o = (o[:, 0] if H == 1 else o.sum(1)).view(n, T, D)  # Σ_h A_h (V_h W_O,h)
        else:
            o = self.out_proj(o.transpose(1, 2).reshape(n, T, D))  # concat heads, then W_O
        prompts = base + o  # (n, M, D); with T = 1 the single offset broadcasts over the M tokens
        return prompts.view(n, self.depth, self.num_prompts, D)

    def _check_ids(self, client_ids: Union[Tensor, Sequence[int]]) -> Tensor:
        if not isinstance(client_ids, Tensor):
            if isinstance(client_ids, (str, bytes)) or not (
                isinstance(client_ids, Sequence) or hasattr(client_ids, "__array__")  # a list, tuple, NumPy array
            ):
                raise TypeError(
                    "client_ids must be a 1-D integer tensor or a sequence of ints (e.g. [0, 3]), got "
                    f"{type(client_ids).__name__}"
                )
            try:
                client_ids = torch.as_tensor(client_ids)
            except (TypeError, ValueError, RuntimeError):
                huge = _beyond_int64(client_ids)
                if huge:
                    raise ValueError(self._range_message(huge)) from None
                raise TypeError(f"client_ids must be a sequence of ints (e.g. [0, 3]), got {client_ids!r}") from None
        dt = client_ids.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise TypeError(f"client_ids must have an integer dtype (e.g. torch.long), got {dt}")
        check_data("client_ids", client_ids)
        if dt == torch.uint64:  # values >= 2**63 would wrap to negative ids in int64: show them as they are
            wrapped = client_ids.view(torch.int64)
            if bool((wrapped < 0).any()):
                raise ValueError(self._range_message(sorted({v + 2**64 for v in wrapped[wrapped < 0].tolist()})[:8]))
        if client_ids.dim() != 1:
            raise ValueError(f"client_ids must be 1-D, shape (n,), got shape {tuple(client_ids.shape)}")
        if client_ids.numel() == 0:
            raise ValueError("client_ids is empty; pass at least one client id")
        ids = client_ids.to(device=self.descriptors.device, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_clients:
            raise ValueError(self._range_message(ids[(ids < 0) | (ids >= self.num_clients)].unique()[:8].tolist()))
        return ids

    def _range_message(self, bad: Sequence[int]) -> str:
        return f"client ids must lie in [0, num_clients) = [0, {self.num_clients}), got {list(bad)}"

    def extra_repr(self) -> str:
        return (
            f"num_clients={self.num_clients}, num_prompts={self.num_prompts}, embed_dim={self.embed_dim}, "
            f"depth={self.depth}, heads={self.heads}, descriptor_tokens={self.descriptor_tokens}, init={self.init!r}"
            + (", bias=True" if self.bias else "") + (f", kdim={self.kdim}" if self.kdim != self.embed_dim else "")
        )


def _beyond_int64(values: object) -> List[int]:
    """The Python ints of ``values`` (a flat sequence) that no int64 tensor can hold (at most 8), else ``[]``."""
    if not isinstance(values, Sequence):
        return []
    huge = [
        operator.index(v)
        for v in values
        if hasattr(v, "__index__") and not isinstance(v, bool) and not -(2**63) <= operator.index(v) < 2**63
    ]
    return sorted(set(huge))[:8]
