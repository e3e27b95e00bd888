"""pFedPG (Yang et al., ICCV 2023): a server-side prompt generator writes each client's prompts.

Algorithm 1, for the clients S_t of round t (every client, or a sample)::

    server    P = gen(S_t)                       (|S_t|, L, K, D), kept with its graph       PFedPGServer.payloads
    client n  load P_n into VPT's prompts; train prompts + personal head H_n locally      PFedPG.client_update
              upload P̃_n (L·K·D numbers); H_n never leaves the client
    server    fed.delta_backward(P[accepted], P̃[accepted]); optimizer.step()            PFedPGServer.update
              (pseudo-gradient P_n − P̃_n = −ΔP_n: every accepted gen(n) moves toward P̃_n)

Deployment (Eq. 6): client n uses ``gen(n)`` of the latest generator with its head (``PFedPGServer.deployment``).

Only the accepted replies enter the step: a dropped or absent client's prompts get no gradient, so under plain SGD
(no momentum, no weight decay: the paper's Eq. 5, α = 0.001, the default here) its descriptor row does not move.
Adam keeps moving rows from stale moments. The step returns diagnostics per round (``ServerReport.diagnostics``):

- ``clients``: the accepted ids; ``dist_before`` / ``dist_after``: ``‖gen(n) − P̃_n‖`` before and after the step;
- ``trained_norm``: ``‖P̃_n‖``; ``generated_norm``: ``‖gen(n)‖`` after the step;
- ``spread``: ``mean_n ‖gen(n) − ḡ‖ / ‖ḡ‖`` over all C clients after the step (ḡ their mean): how different the
  generated prompts are between clients, relative to their size.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _timm, fed
from .._checks import check_positive_int, check_state
from .._wrapping import innermost, wrapper_chain
from ..generator import PromptGenerator
from ..vpt import VPT
from .protocol import Protocol
from .records import ServerReport
from .screening import screen_replies
from .server import flatten_optimizer, unflatten_optimizer
from .shared_personal import _check_ids
from .training import LossFn

__all__ = ["PFedPG", "PFedPGServer"]

OptimizerSpec = Union[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]]


def _find_vpt(model: nn.Module) -> VPT:
    for m in [model, *wrapper_chain(model)]:
        if isinstance(m, VPT):
            if not isinstance(m.prompts, nn.Parameter):
                raise TypeError("pFedPG needs VPT's own prompt parameter; this VPT reads its prompts from a module")
            return m
    raise TypeError(f"pFedPG needs a fedpeft.VPT (possibly wrapped), got {type(model).__name__}")


def _prompt_key(model: nn.Module) -> str:
    vpt = _find_vpt(model)
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is vpt.prompts:
            if not p.requires_grad:
                raise ValueError(f"pFedPG: the prompts {name!r} must be trainable")
            return name
    raise ValueError("pFedPG: the VPT's prompts are not a parameter of the model")  # pragma: no cover


def _make_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if callable(spec):
        return spec(params)
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    if not isinstance(spec, str) or spec.lower() not in kinds:
        raise ValueError(f"server optimizer must be 'SGD', 'Adam' or a callable(params) -> Optimizer, got {spec!r}")
    return kinds[spec.lower()](params, lr=lr)


class PFedPGServer:
    """The pFedPG server: a ``PromptGenerator`` and its optimizer (see the module docstring).

    Args:
        generator: the generator (``num_clients`` rows of descriptors).
        optimizer: a ``torch.optim.Optimizer`` over ``generator``'s parameters.
        expected: the upload every client must send: ``{prompt key: tensor of shape (L, K, D)}`` (values unused).
    """

    def __init__(self, generator: PromptGenerator, optimizer: torch.optim.Optimizer,
                 expected: Dict[str, Tensor]) -> None:
        if not isinstance(generator, PromptGenerator):
            raise TypeError(f"generator must be a fedpeft.PromptGenerator, got {type(generator).__name__}")
        (self.key, ref), = expected.items()
        shape = (generator.depth, generator.num_prompts, generator.embed_dim)
        if tuple(ref.shape) != shape:
            raise ValueError(f"the clients' prompts have shape {tuple(ref.shape)} but the generator makes {shape}")
        self.generator, self.optimizer = generator, optimizer
        self.num_clients = generator.num_clients
        self.expected_upload = {self.key: torch.empty(shape, dtype=ref.dtype)}
        self._pending: Optional[tuple] = None  # (ids, P with graph) of the round in flight
        self.round = 0  # update() calls so far

    @property
    def own_params(self) -> int:
        """The generator's parameter count (trained on the server only)."""
        return sum(p.numel() for p in self.generator.parameters())

    def _ids_tensor(self, ids: List[int]) -> Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.generator.descriptors.device)

    def payloads(self, client_ids: Iterable[int]) -> Dict[int, Dict[str, Tensor]]:
        """Each client's own generated prompts ``{n: {key: gen(n)}}`` from one batched ``gen(ids)`` call.

        The batch is kept (with its graph) for the next :meth:`update`; a second call replaces it.
        """
        ids = _check_ids(client_ids, self.num_clients)
        if not ids:
            raise ValueError("payloads() needs at least one client id")
        generated = self.generator(self._ids_tensor(ids))  # (n, L, K, D), with graph
        self._pending = (ids, generated)
        dtype = self.expected_upload[self.key].dtype
        return {cid: {self.key: generated[i].detach().to(dtype).clone()} for i, cid in enumerate(ids)}

    @torch.no_grad()
    def deployment(self, client_ids: Iterable[int]) -> Dict[int, Dict[str, Tensor]]:
        """Each client's deployed prompts ``gen(n)`` of the current generator (no graph, no side effect)."""
        ids = _check_ids(client_ids, self.num_clients)
        if not ids:
            return {}
        generated = self.generator(self._ids_tensor(ids))
        dtype = self.expected_upload[self.key].dtype
        return {cid: {self.key: generated[i].to(dtype).clone()} for i, cid in enumerate(ids)}

    def update(self, replies: Iterable[Any]) -> ServerReport:
        """Screen the replies, then one generator step on the accepted ones (nothing moves if none is accepted)."""
        if self._pending is None:
            _, rejected = screen_replies(replies, self.expected_upload, num_clients=self.num_clients, allowed=())
            return ServerReport(rejected=rejected)
        ids, generated = self._pending
        self._pending = None
        self.round += 1
        accepted, rejected = screen_replies(replies, self.expected_upload, num_clients=self.num_clients,
                                            allowed=set(ids))
        report = ServerReport(accepted=[r.client_id for r in accepted], rejected=rejected)
        if not accepted:
            return report
        rows = [ids.index(r.client_id) for r in accepted]
        selected = generated if rows == list(range(len(ids))) else generated[rows]
        trained = torch.stack([r.upload[self.key] for r in accepted]).to(selected.device, selected.dtype)
        before = (selected.detach() - trained).flatten(1).norm(dim=1)
        self.optimizer.zero_grad(set_to_none=True)
        fed.delta_backward(selected, trained)
        self.optimizer.step()
        report.updated = True
        with torch.no_grad():
            everyone = self.generator(torch.arange(self.num_clients, device=self.generator.descriptors.device))
            after_sel = everyone[self._ids_tensor(report.accepted)]
            mean = everyone.mean(0)
            spread = (everyone - mean).flatten(1).norm(dim=1).mean() / mean.norm().clamp_min(1e-12)
            report.diagnostics = {
                "clients": list(report.accepted),
                "dist_before": before.tolist(),
                "dist_after": (after_sel - trained).flatten(1).norm(dim=1).tolist(),
                "trained_norm": trained.flatten(1).norm(dim=1).tolist(),
                "generated_norm": after_sel.flatten(1).norm(dim=1).tolist(),
                "spread": float(spread),
            }
        return report

    def state_dict(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """The generator (``"generator.<key>"``) and its optimizer's state (``"optimizer.<i>.<name>"``) as tensors;
        the round, the prompt key and the optimizer's class and hyper-parameters in ``meta`` (see :mod:`.server`)."""
        tensors = {f"generator.{k}": v.detach().to("cpu").clone().contiguous()
                   for k, v in self.generator.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer(self.optimizer)
        tensors.update(opt_tensors)
        return tensors, {"kind": "pfedpg", "round": self.round, "key": self.key,
                         "optimizer": {"class": type(self.optimizer).__name__, **opt_meta}}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ``ValueError`` (server untouched) on another kind, prompt key,
        optimizer class, generator keys or shapes."""
        if not isinstance(meta, Mapping) or meta.get("kind") != "pfedpg":
            raise ValueError("meta: expected a pFedPG server's checkpoint, got kind "
                             f"{meta.get('kind') if isinstance(meta, Mapping) else type(meta).__name__!r}")
        round_, key, opt = meta.get("round"), meta.get("key"), meta.get("optimizer")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise ValueError(f"meta['round'] must be an int >= 0, got {round_!r}")
        if key != self.key:
            raise ValueError(f"meta['key']: this server's clients send {self.key!r}, the checkpoint's {key!r}")
        if not isinstance(opt, Mapping) or opt.get("class") != type(self.optimizer).__name__:
            raise ValueError(f"meta['optimizer']: this server steps with {type(self.optimizer).__name__}, the "
                             f"checkpoint's {opt.get('class') if isinstance(opt, Mapping) else opt!r}")
        gen = {k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")}
        check_state(gen, like=self.generator.state_dict(), finite=True, name="tensors (generator)")
        opt_state = unflatten_optimizer(tensors, opt)
        backup = copy.deepcopy(self.optimizer.state_dict())
        try:
            self.optimizer.load_state_dict(opt_state)
        except (KeyError, TypeError, ValueError) as e:
            self.optimizer.load_state_dict(backup)
            raise ValueError(f"tensors/meta: the optimizer state does not fit this server's optimizer ({e})") from None
        self.generator.load_state_dict(gen)
        self._pending = None
        self.round = round_


class PFedPG(Protocol):
    """pFedPG's protocol: the client trains VPT prompts + its personal part, uploads the prompts P̃_n.

    The model is a ``fedpeft.VPT`` with its own prompt parameter (possibly under other fedpeft wrappers). Personal:
    every trainable key but the prompts (the head). Upload and download: the prompts (the download is the client's own
    ``gen(n)``, not an average).

    Args:
        server_optimizer: ``"SGD"`` (default: the paper's Eq. 5 is plain gradient descent), ``"Adam"``, or a callable
            ``params -> Optimizer``.
        server_lr: α, the server's learning rate (the paper: 0.001).
        heads, descriptor_tokens: the generator's (``PromptGenerator``'s arguments).
        loss_fn: the client objective (default cross-entropy).
    """

    def __init__(self, *, name: str = "pFedPG", server_optimizer: OptimizerSpec = "SGD", server_lr: float = 1e-3,
                 heads: int = 1, descriptor_tokens: Optional[int] = None, loss_fn: Optional[LossFn] = None) -> None:
        super().__init__(name=name, loss_fn=loss_fn)
        if not callable(server_optimizer) and (not isinstance(server_optimizer, str)
                                               or server_optimizer.lower() not in ("sgd", "adam")):
            raise ValueError(f"server_optimizer must be 'SGD', 'Adam' or a callable, got {server_optimizer!r}")
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not server_lr > 0:
            raise ValueError(f"server_lr must be a number > 0, got {server_lr!r}")
        self.server_optimizer, self.server_lr = server_optimizer, float(server_lr)
        self.heads = check_positive_int("heads", heads)
        self.descriptor_tokens = descriptor_tokens

    def personal_keys(self, model: nn.Module) -> List[str]:
        key = _prompt_key(model)
        return [k for k in fed.trainable_keys(model) if k != key]

    def upload_keys(self, model: nn.Module) -> List[str]:
        return [_prompt_key(model)]

    def make_server(self, model: nn.Module, *, num_clients: Optional[int] = None,
                    seed: Optional[int] = None) -> PFedPGServer:
        """A generator shaped like ``model``'s prompts for ``num_clients`` clients, and its optimizer.

        Args:
            model: a client model (its VPT gives K, D, the depth L and the patch size of the init bound).
            num_clients: C, required.
            seed: if given, the generator is initialised from ``torch.manual_seed(seed)`` without touching the
                global RNG (so a server in another process builds the same generator); ``None`` draws from the
                global RNG.
        """
        if num_clients is None:
            raise ValueError("pFedPG's server needs num_clients (one descriptor row per client)")
        vpt = _find_vpt(model)
        ref = vpt.prompts
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            gen = PromptGenerator(
                num_clients=num_clients, num_prompts=vpt.num_prompts, embed_dim=vpt.embed_dim, depth=vpt.prompt_depth,
                heads=self.heads, descriptor_tokens=self.descriptor_tokens,
                patch_size=_timm.patch_size(innermost(vpt)), device=ref.device,
                dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32,  # trained in float32 at least
            )
        opt = _make_optimizer(self.server_optimizer, gen.parameters(), self.server_lr)
        return PFedPGServer(gen, opt, {_prompt_key(model): ref.detach()})
