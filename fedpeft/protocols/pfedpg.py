"""pFedPG (Yang et al., ICCV 2023): a server-side prompt generator writes each client's prompts.

Algorithm 1, for the clients S_t of round t (every client, or a sample)::

    server    P = gen(S_t)                       (|S_t|, L, K, D), kept with its graph       PFedPGServer.payloads
    client n  load P_n into VPT's prompts; train prompts + personal head H_n locally      PFedPG.client_update
              upload P̃_n (L·K·D numbers); H_n never leaves the client
    server    fit gen to the accepted replies: up to S steps of the optimizer on           PFedPGServer.update
              ½ Σ_n ‖gen(n) − P̃_n‖², each one fed.delta_backward(gen(accepted), P̃) + optimizer.step()
              (pseudo-gradient P_n − P̃_n = −ΔP_n: every accepted gen(n) moves toward P̃_n)

S = 1 (``server_steps=1``) is the paper's Eq. 5: one step along ∇φPᵀ(P − P̃). Deployment (Eq. 6): client n uses
``gen(n)`` of the latest generator with its head (``PFedPGServer.deployment``).

Only the accepted replies enter the steps: a dropped or absent client's prompts get no gradient, so under plain SGD
(no momentum, no weight decay: the paper's Eq. 5, α = 0.001, one step, ``PFedPG(recipe="paper")``) its descriptor row
does not move. The default server (``recipe="fedpeft"``) is Adam on the unit-logit generator init that runs
:data:`DEFAULT_SERVER_STEPS` steps per round at :data:`DEFAULT_SERVER_LR`: one step keeps ≈ 0.3 % of what the clients
trained (each round the clients restart from an almost untouched gen(n)), a fit keeps tens of percent
(docs/federated.md, "The server step: a fit, not a nudge"). The step returns diagnostics per round
(``ServerReport.diagnostics``):

- ``clients``: the accepted ids; ``dist_before`` / ``dist_after``: ``‖gen(n) − P̃_n‖`` before and after the fit;
- ``trained_norm``: ``‖P̃_n‖``; ``generated_norm``: ``‖gen(n)‖`` after the fit;
- ``retention``: ``mean_n 1 − dist_after_n / dist_before_n``, the share of the way to P̃_n the fit kept (1: gen(n)
  = P̃_n, 0: nothing kept, < 0: moved away);
- ``residual``: ``mean_n ‖gen(n) − P̃_n‖ / ‖P̃_n‖`` after the fit;
- ``drift``: ``mean_n ‖gen_t(n) − gen_0(n)‖``, how far the accepted clients' prompts are from the initial
  generator's (gen_0, kept from construction);
- ``steps``: the optimizer steps the fit took (< ``server_steps`` when it stopped on ``server_tol``);
- ``spread``: ``mean_n ‖gen(n) − ḡ‖ / ‖ḡ‖`` over all C clients after the fit (ḡ their mean): how different the
  generated prompts are between clients, relative to their size.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _timm, fed
from .._checks import check_positive_int, check_state
from .._wrapping import innermost, wrapper_chain
from ..generator import INITS, PromptGenerator
from ..vpt import VPT
from .privacy import Privacy
from .protocol import Protocol
from .records import ServerReport
from .screening import check_max_weight, screen_replies
from .server import flatten_optimizer, unflatten_optimizer
from .server_privacy import ServerPrivacy, load_privacy
from .shared_personal import _check_ids
from .training import LossFn

__all__ = ["DEFAULT_SERVER_LR", "DEFAULT_SERVER_STEPS", "PARAM_GROUPS", "PFedPG", "PFedPGServer", "param_groups"]

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


#: the generator's parameter groups a per-group server rate may name
PARAM_GROUPS = ("prompt_base", "descriptors", "projections")

#: the default server rates (Adam): 10× on the descriptors, the per-client parameters (docs/protocols.md)
DEFAULT_SERVER_LR: Dict[str, float] = {"prompt_base": 1e-3, "descriptors": 1e-2, "projections": 1e-3}

#: the default server's optimizer steps per round (a fit of gen(n) to the replies, not Eq. 5's one step)
DEFAULT_SERVER_STEPS = 50

#: the default generator's heads: gcd(D, DEFAULT_HEADS) (every offset of Eq. 3 lies in the span of the H·L·K rows of
#: the heads' values, so one head can write only an L·K-dimensional part of each client's prompts)
DEFAULT_HEADS = 16


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_server_lr(server_lr: Any) -> Union[float, Dict[str, float]]:
    """A positive finite rate, or ``{group: rate}`` naming every group of :data:`PARAM_GROUPS` exactly once."""
    if isinstance(server_lr, Mapping):
        unknown = sorted(str(k) for k in server_lr if k not in PARAM_GROUPS)
        if unknown:
            raise ValueError(f"server_lr: unknown parameter group(s) {unknown}; the groups are {list(PARAM_GROUPS)}")
        missing = [g for g in PARAM_GROUPS if g not in server_lr]
        if missing:
            raise ValueError(f"server_lr: a per-group rate needs every group {list(PARAM_GROUPS)}, missing {missing}")
        return {g: _check_rate(f"server_lr[{g!r}]", server_lr[g]) for g in PARAM_GROUPS}
    return _check_rate("server_lr", server_lr)


def param_groups(generator: PromptGenerator) -> Dict[str, List[nn.Parameter]]:
    """The generator's parameters by group: ``prompt_base``, ``descriptors``, ``projections`` (W_Q, W_K, W_V, W_O)."""
    return {
        "prompt_base": [generator.prompt_base],
        "descriptors": [generator.descriptors],
        "projections": [m.weight for m in (generator.q_proj, generator.k_proj, generator.v_proj, generator.out_proj)],
    }


def _make_optimizer(spec: OptimizerSpec, generator: PromptGenerator,
                    lr: Union[float, Mapping[str, float]]) -> torch.optim.Optimizer:
    if callable(spec):
        return spec(generator.parameters())
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    if not isinstance(spec, str) or spec.lower() not in kinds:
        raise ValueError(f"server optimizer must be 'SGD', 'Adam' or a callable(params) -> Optimizer, got {spec!r}")
    lr = _check_server_lr(lr)
    groups = param_groups(generator)
    if isinstance(lr, dict):
        return kinds[spec.lower()]([{"params": groups[g], "lr": lr[g], "name": g} for g in PARAM_GROUPS], lr=1.0)
    return kinds[spec.lower()]([{"params": groups[g], "name": g} for g in PARAM_GROUPS], lr=lr)


class PFedPGServer:
    """The pFedPG server: a ``PromptGenerator`` and its optimizer (see the module docstring).

    Args:
        generator: the generator (``num_clients`` rows of descriptors).
        optimizer: a ``torch.optim.Optimizer`` over ``generator``'s parameters.
        expected: the upload every client must send: ``{prompt key: tensor of shape (L, K, D)}`` (values unused).
        normalize_delta: rescale each accepted client's pseudo-gradient ``P_n − P̃_n`` to the mean norm over the
            round's accepted clients (every client's direction weighs the same): the fit's target is then
            ``P_n − (P_n − P̃_n)·mean/‖P_n − P̃_n‖`` instead of P̃_n. Default off.
        server_steps: S, optimizer steps per round on ``½ Σ_n ‖gen(n) − P̃_n‖²`` over the accepted replies (the first
            on the graph of :meth:`payloads`, each later one on a fresh ``gen(accepted)``). 1: Eq. 5.
        server_tol: stop the fit before a step once ``‖gen − P̃‖_F / ‖P̃‖_F`` over the accepted clients (the fitted
            target with ``normalize_delta``) is ≤ this; ``None`` (default): always S steps.
        privacy: user-level DP on the generator steps (:class:`~fedpeft.protocols.Privacy`): in every step each
            accepted client's gradient contribution is clipped over all of φ, summed, noised (std σ·C) and divided by
            the round's number of clients; every step is a release (S per round). Not with ``normalize_delta`` (it
            couples the clients) nor ``server_tol`` (a stop that depends on the replies).
        seed: the noise seed under ``privacy`` (``None``: drawn from torch's global RNG; docs/privacy.md).

    Over a run the server counts the client-rounds whose fit *ascended* (``dist_after > dist_before``) and warns
    (``RuntimeWarning``, once) as soon as they are more than half of all client-rounds after at least 3 rounds: the
    generator then moves away from what the clients trained and its rate or optimizer is wrong. It also warns (once)
    when the retention stays under :attr:`LOW_RETENTION` for :attr:`LOW_RETENTION_ROUNDS` rounds in a row: the
    clients then restart every round from an almost untouched gen(n).
    """

    #: retention under this for ``LOW_RETENTION_ROUNDS`` rounds in a row triggers the low-retention warning
    LOW_RETENTION: ClassVar[float] = 0.05
    LOW_RETENTION_ROUNDS: ClassVar[int] = 3

    def __init__(self, generator: PromptGenerator, optimizer: torch.optim.Optimizer,
                 expected: Dict[str, Tensor], *, normalize_delta: bool = False,
                 max_weight: Optional[float] = None, server_steps: int = 1,
                 server_tol: Optional[float] = None, privacy: Optional[Privacy] = None,
                 seed: Optional[int] = None) -> None:
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
        self.max_weight = check_max_weight(max_weight)
        if not isinstance(normalize_delta, bool):
            raise TypeError(f"normalize_delta must be a bool, got {type(normalize_delta).__name__}")
        self.normalize_delta = normalize_delta
        self.server_steps = check_positive_int("server_steps", server_steps)
        self.server_tol = None if server_tol is None else _check_rate("server_tol", server_tol)
        if privacy is not None and normalize_delta:
            raise ValueError("privacy: normalize_delta rescales each client's update by the round's mean norm, so one "
                             "client moves every other's contribution and no clip bounds it; use normalize_delta=False")
        if privacy is not None and server_tol is not None:
            raise ValueError("privacy: server_tol stops the fit when gen is near the replies, a stop no clip bounds "
                             "(and the accountant needs the number of steps in advance); use server_tol=None")
        self.privacy = None if privacy is None else ServerPrivacy(privacy, self.num_clients, seed)
        self.initial = copy.deepcopy(generator).requires_grad_(False)  # gen_0, the reference of ``drift``
        self.steps_taken = 0  # optimizer steps over the run
        self.client_rounds = 0  # accepted client-rounds fitted so far
        self.ascended = 0  # of which ‖gen(n) − P̃_n‖ grew through the fit
        self._warned = False
        self.low_retention_rounds = 0  # rounds in a row with retention < LOW_RETENTION
        self._warned_retention = False

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

    def _fit(self, ids: Tensor, generated: Tensor, target: Tensor, num_sampled: int = 0) -> Tuple[int, List[float]]:
        """Up to ``server_steps`` optimizer steps on ``½ Σ_n ‖gen(n) − target_n‖²`` over the clients ``ids``.

        ``generated``: ``gen(ids)`` with its graph (the first step's). Each step is one ``fed.delta_backward`` of
        ``gen(ids) − target`` and one ``optimizer.step()``: the generator after every step is a release of what
        the replies taught it. Under privacy each step is DP's (:meth:`_private_step`, release = the step) over
        ``num_sampled`` clients, always S of them. Returns the steps taken and, under privacy, the first step's
        per-client gradient norms.
        """
        scale = float(target.norm()) if self.server_tol is not None else 0.0
        taken, norms = 0, []
        for step in range(self.server_steps):
            P = generated if step == 0 else self.generator(ids)  # (n, L, K, D), with graph
            if self.server_tol is not None and float((P.detach() - target).norm()) <= self.server_tol * scale:
                break
            if self.privacy is not None:
                got = self._private_step(P, target, ids.tolist(), num_sampled, release=step)
                norms = got if step == 0 else norms
            else:
                self.optimizer.zero_grad(set_to_none=True)
                fed.delta_backward(P, target)
                self.optimizer.step()
            taken += 1
        return taken, norms

    def update(self, replies: Iterable[Any]) -> ServerReport:
        """Screen the replies, then fit the generator to the accepted ones (nothing moves if none is accepted)."""
        if self._pending is None:
            _, rejected = screen_replies(replies, self.expected_upload, num_clients=self.num_clients, allowed=(),
                                         round=self.round, max_weight=self.max_weight)
            return ServerReport(rejected=rejected)
        ids, generated = self._pending
        # screen first: a call that raises (``update(None)``) leaves the round in flight for its real replies
        accepted, rejected = screen_replies(replies, self.expected_upload, num_clients=self.num_clients,
                                            allowed=set(ids), round=self.round, max_weight=self.max_weight)
        self._pending = None
        self.round += 1
        report = ServerReport(accepted=[r.client_id for r in accepted], rejected=rejected)
        m = len(ids)
        if self.privacy is not None:
            m = self.privacy.sample_size(len(ids))
            report.privacy = self.privacy.close_round(m, releases=self.server_steps)
            if not accepted:  # a release every step, whoever replied: noise only
                for step in range(self.server_steps):
                    self._private_step(generated[:0], generated.detach()[:0], [], m, release=step)
                report.updated = True
        if not accepted:
            return report
        rows = [ids.index(r.client_id) for r in accepted]
        selected = generated if rows == list(range(len(ids))) else generated[rows]
        trained = torch.stack([r.upload[self.key] for r in accepted]).to(selected.device, selected.dtype)
        start = selected.detach()
        before = (start - trained).flatten(1).norm(dim=1)
        target = trained
        if self.normalize_delta:
            scale = before.mean() / before.clamp_min(1e-30)  # ‖P_n − P̃_n‖ → the round's mean norm
            target = start - (start - trained) * scale.view(-1, *[1] * (trained.dim() - 1))
        acc_ids = self._ids_tensor(report.accepted)
        steps, norms = self._fit(acc_ids, selected, target, m)
        self.steps_taken += steps
        report.updated = steps > 0
        report.diagnostics = self._diagnostics(report.accepted, acc_ids, trained, before, steps)
        if self.privacy is not None:
            report.diagnostics["gradient_norms"] = norms  # raw ‖g_n‖ of the first step: not covered by ε
        d = report.diagnostics
        self._watch(d["dist_before"], d["dist_after"], d["retention"])
        return report

    @torch.no_grad()
    def _diagnostics(self, accepted: List[int], acc_ids: Tensor, trained: Tensor, before: Tensor,
                     steps: int) -> Dict[str, Any]:
        everyone = self.generator(torch.arange(self.num_clients, device=acc_ids.device))
        after_sel = everyone[acc_ids]
        mean = everyone.mean(0)
        spread = (everyone - mean).flatten(1).norm(dim=1).mean() / mean.norm().clamp_min(1e-12)
        after = (after_sel - trained).flatten(1).norm(dim=1)
        trained_norm = trained.flatten(1).norm(dim=1)
        kept = 1 - after / before.clamp_min(1e-30)  # a client sent back exactly gen(n): nothing to keep, counts 1
        drift = (after_sel - self.initial(acc_ids)).flatten(1).norm(dim=1)
        return {
            "clients": list(accepted),
            "dist_before": before.tolist(),
            "dist_after": after.tolist(),
            "trained_norm": trained_norm.tolist(),
            "generated_norm": after_sel.flatten(1).norm(dim=1).tolist(),
            "retention": float(kept.mean()),
            "residual": float((after / trained_norm.clamp_min(1e-30)).mean()),
            "drift": float(drift.mean()),
            "steps": steps,
            "spread": float(spread),
        }

    def _watch(self, before: List[float], after: List[float], retention: float) -> None:
        """Count ascending client-rounds and low-retention rounds; warn once for each (see the class docstring)."""
        self.client_rounds += len(before)
        self.ascended += sum(a > b for a, b in zip(after, before))
        if not self._warned and self.round >= 3 and 2 * self.ascended > self.client_rounds:
            self._warned = True
            warnings.warn(
                f"pFedPG server: the step moved gen(n) away from the client's trained prompts (diagnostics "
                f"dist_after > dist_before) in {self.ascended}/{self.client_rounds} client-rounds; lower the server "
                f"rate or use the default server (docs/federated.md)", RuntimeWarning, stacklevel=3)
        self.low_retention_rounds = self.low_retention_rounds + 1 if retention < self.LOW_RETENTION else 0
        if not self._warned_retention and self.low_retention_rounds >= self.LOW_RETENTION_ROUNDS:
            self._warned_retention = True
            warnings.warn(
                f"pFedPG server: retention under {self.LOW_RETENTION:.0%} for {self.low_retention_rounds} rounds "
                f"(last {retention:.2%}): gen(n) keeps almost nothing of what the clients trained, so every round "
                f"they restart from it; raise server_steps (now {self.server_steps}) or the server rate, or use "
                f"the default server (docs/federated.md)", RuntimeWarning, stacklevel=3)

    def _private_step(self, generated: Tensor, trained: Tensor, clients: List[int], num_sampled: int,
                      release: int = 0) -> List[float]:
        """One optimizer step on the DP gradient (:meth:`ServerPrivacy.generator_grads`) of round ``self.round − 1``
        (``generated`` row i is client ``clients[i]``'s; its descriptor row is its own, so it is row-separable);
        returns the clients' gradient norms before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        norms = self.privacy.generator_grads(generated, trained, list(self.generator.named_parameters()), num_sampled,
                                             round=self.round - 1, release=release, rows={"descriptors": clients})
        self.optimizer.step()
        return norms

    def state_dict(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """The generator (``"generator.<key>"``), the initial generator gen_0 (``"initial.<key>"``) and the optimizer's
        state (``"optimizer.<i>.<name>"``) as tensors; the round, the prompt key, the optimizer's class and
        hyper-parameters, the steps taken and the warnings' counters in ``meta`` (see :mod:`.server`)."""
        tensors = {f"{prefix}.{k}": v.detach().to("cpu").clone().contiguous()
                   for prefix, gen in (("generator", self.generator), ("initial", self.initial))
                   for k, v in gen.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer(self.optimizer)
        tensors.update(opt_tensors)
        return tensors, {"kind": "pfedpg", "round": self.round, "key": self.key,
                         "optimizer": {"class": type(self.optimizer).__name__, **opt_meta},
                         "steps_taken": self.steps_taken,
                         "ascent": {"client_rounds": self.client_rounds, "ascended": self.ascended,
                                    "warned": self._warned},
                         "retention": {"low_rounds": self.low_retention_rounds, "warned": self._warned_retention},
                         **({} if self.privacy is None else {"privacy": self.privacy.state_dict()})}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ``ValueError`` (server untouched) on another kind, prompt key,
        optimizer class, generator keys or shapes. A checkpoint of fedpeft ≤ 0.2 (no ``initial.*``) takes the loaded
        generator as gen_0."""
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
        like = self.generator.state_dict()
        gen = {k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")}
        check_state(gen, like=like, finite=True, name="tensors (generator)")
        initial = {k[len("initial."):]: v for k, v in tensors.items() if k.startswith("initial.")} or gen
        check_state(initial, like=like, finite=True, name="tensors (initial generator)")
        for k, v in [*gen.items(), *initial.items()]:
            if v.dtype != like[k].dtype:
                raise ValueError(f"tensors['generator.{k}']: expected dtype {like[k].dtype}, got {v.dtype}")
        try:
            opt_state = unflatten_optimizer(tensors, opt)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tensors/meta: a malformed optimizer state ({type(e).__name__}: {e})") from None
        self._check_moments(opt_state)
        backup = copy.deepcopy(self.optimizer.state_dict())
        try:
            self.optimizer.load_state_dict(opt_state)
        except (KeyError, TypeError, ValueError) as e:
            self.optimizer.load_state_dict(backup)
            raise ValueError(f"tensors/meta: the optimizer state does not fit this server's optimizer ({e})") from None
        try:
            load_privacy(self.privacy, meta)
        except ValueError:
            self.optimizer.load_state_dict(backup)
            raise
        self.generator.load_state_dict(gen)
        self.initial.load_state_dict(initial)
        self._pending = None
        self.round = round_
        self.steps_taken = int(meta.get("steps_taken", 0))
        ascent = meta.get("ascent") if isinstance(meta.get("ascent"), Mapping) else {}  # absent in older checkpoints
        self.client_rounds = int(ascent.get("client_rounds", 0))
        self.ascended = int(ascent.get("ascended", 0))
        self._warned = bool(ascent.get("warned", False))
        low = meta.get("retention") if isinstance(meta.get("retention"), Mapping) else {}
        self.low_retention_rounds = int(low.get("low_rounds", 0))
        self._warned_retention = bool(low.get("warned", False))

    def _check_moments(self, opt_state: Mapping[str, Any]) -> None:
        """Every optimizer tensor that is per-parameter (shape not ()) has its parameter's shape and dtype, and every
        floating one is finite: a wrong shape would crash the first step, a NaN would turn the generator NaN."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for idx, entries in opt_state["state"].items():
            if not 0 <= idx < len(params):
                raise ValueError(f"optimizer state for parameter #{idx}; the generator's optimizer has {len(params)}")
            for name, t in entries.items():
                if not isinstance(t, Tensor):
                    continue
                where = f"tensors['optimizer.{idx}.{name}']"
                if t.dim() and (t.shape != params[idx].shape or t.dtype != params[idx].dtype):
                    raise ValueError(f"{where}: expected {tuple(params[idx].shape)} {params[idx].dtype}, got "
                                     f"{tuple(t.shape)} {t.dtype}")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{where} holds NaN/Inf")


class PFedPG(Protocol):
    """pFedPG's protocol: the client trains VPT prompts + its personal part, uploads the prompts P̃_n.

    The model is a ``fedpeft.VPT`` with its own prompt parameter (possibly under other fedpeft wrappers). Personal:
    every trainable key but the prompts (the head). Upload and download: the prompts (the download is the client's own
    ``gen(n)``, not an average).

    Args:
        recipe: the server's defaults in one word. ``"fedpeft"`` (default): :data:`DEFAULT_SERVER_STEPS` steps of
            ``Adam`` per round with :data:`DEFAULT_SERVER_LR` per parameter group, on a generator with
            ``init="unit_logits"`` and ``gcd(D, 16)`` heads. ``"paper"``: Eq. 5 literally, one plain SGD step α = 1e-3 on every generator
            parameter, on the ``init="vpt"`` generator of fedpeft ≤ 0.1. The arguments below override the recipe's.
            Why the default departs from Eq. 5 (measured by ``benchmarks/study_pfedpg.py``): see docs/federated.md.
        server_optimizer: ``"SGD"``, ``"Adam"``, or a callable ``params -> Optimizer``.
        server_lr: α, one rate > 0 for every parameter, or ``{"prompt_base": α_b, "descriptors": α_d,
            "projections": α_p}`` (:data:`PARAM_GROUPS`, every group named) for per-group rates.
        generator_init: ``PromptGenerator``'s ``init`` (``"unit_logits"`` or ``"vpt"``).
        normalize_delta: ``PFedPGServer``'s option (each client's ΔP rescaled to the round's mean norm).
        server_steps: S, the server's optimizer steps per round on ``½ Σ_n ‖gen(n) − P̃_n‖²`` (1: Eq. 5).
        server_tol: stop a round's fit early once ``‖gen − P̃‖_F / ‖P̃‖_F`` ≤ this (``None``: always S steps).
        heads: the generator's attention heads H (must divide D); ``None``: the recipe's, ``gcd(D, 16)`` for
            ``"fedpeft"`` (:data:`DEFAULT_HEADS`), 1 (Eq. 3 as written) for ``"paper"``.
        descriptor_tokens: the generator's (``PromptGenerator``'s argument).
        loss_fn: the client objective (default cross-entropy).

    Raises ``ValueError`` naming the argument for an unknown recipe, optimizer, init or parameter group, for a
    rate or tolerance that is ≤ 0 or not finite, and for ``server_steps`` < 1.
    """

    RECIPES: ClassVar[Dict[str, Dict[str, Any]]] = {
        "fedpeft": {"server_optimizer": "Adam", "server_lr": DEFAULT_SERVER_LR, "generator_init": "unit_logits",
                    "server_steps": DEFAULT_SERVER_STEPS, "heads": DEFAULT_HEADS},
        "paper": {"server_optimizer": "SGD", "server_lr": 1e-3, "generator_init": "vpt", "server_steps": 1,
                  "heads": 1},
    }

    def __init__(self, *, name: str = "pFedPG", recipe: str = "fedpeft",
                 server_optimizer: Optional[OptimizerSpec] = None,
                 server_lr: Optional[Union[float, Mapping[str, float]]] = None,
                 generator_init: Optional[str] = None, normalize_delta: bool = False,
                 server_steps: Optional[int] = None, server_tol: Optional[float] = None,
                 heads: Optional[int] = None, descriptor_tokens: Optional[int] = None, loss_fn: Optional[LossFn] = None) -> None:
        super().__init__(name=name, loss_fn=loss_fn)
        if recipe not in self.RECIPES:
            raise ValueError(f"recipe must be one of {list(self.RECIPES)}, got {recipe!r}")
        defaults = self.RECIPES[recipe]
        server_optimizer = defaults["server_optimizer"] if server_optimizer is None else server_optimizer
        server_lr = defaults["server_lr"] if server_lr is None else server_lr
        generator_init = defaults["generator_init"] if generator_init is None else generator_init
        if not callable(server_optimizer) and (not isinstance(server_optimizer, str)
                                               or server_optimizer.lower() not in ("sgd", "adam")):
            raise ValueError(f"server_optimizer must be 'SGD', 'Adam' or a callable, got {server_optimizer!r}")
        if generator_init not in INITS:
            raise ValueError(f"generator_init must be one of {INITS}, got {generator_init!r}")
        if not isinstance(normalize_delta, bool):
            raise TypeError(f"normalize_delta must be a bool, got {type(normalize_delta).__name__}")
        self.recipe = recipe
        self.server_optimizer, self.server_lr = server_optimizer, _check_server_lr(server_lr)
        self.generator_init, self.normalize_delta = generator_init, normalize_delta
        self.server_steps = check_positive_int(
            "server_steps", defaults["server_steps"] if server_steps is None else server_steps)
        self.server_tol = None if server_tol is None else _check_rate("server_tol", server_tol)
        self.heads = None if heads is None else check_positive_int("heads", heads)  # None: the recipe's
        self.descriptor_tokens = descriptor_tokens

    def _heads(self, embed_dim: int) -> int:
        """``heads`` if given, else the recipe's: ``gcd(D, DEFAULT_HEADS)`` for ``"fedpeft"``, 1 for ``"paper"``."""
        if self.heads is not None:
            return self.heads
        return math.gcd(embed_dim, self.RECIPES[self.recipe]["heads"])

    def personal_keys(self, model: nn.Module) -> List[str]:
        key = _prompt_key(model)
        return [k for k in fed.trainable_keys(model) if k != key]

    def upload_keys(self, model: nn.Module) -> List[str]:
        return [_prompt_key(model)]

    def make_server(self, model: nn.Module, *, num_clients: Optional[int] = None, seed: Optional[int] = None,
                    privacy: Optional[Privacy] = None) -> PFedPGServer:
        """A generator shaped like ``model``'s prompts for ``num_clients`` clients, and its optimizer.

        Args:
            model: a client model (its VPT gives K, D, the depth L and the patch size of the init bound).
            num_clients: C, required.
            seed: if given, the generator is initialised from ``torch.manual_seed(seed)`` without touching the
                global RNG (so a server in another process builds the same generator); ``None`` draws from the
                global RNG. It also seeds the DP noise under ``privacy``.
            privacy: user-level DP on the generator step (see :class:`PFedPGServer`).
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
                heads=self._heads(vpt.embed_dim), descriptor_tokens=self.descriptor_tokens, init=self.generator_init,
                patch_size=_timm.patch_size(innermost(vpt)), device=ref.device,
                dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32,  # trained in float32 at least
            )
        opt = _make_optimizer(self.server_optimizer, gen, self.server_lr)
        return PFedPGServer(gen, opt, {_prompt_key(model): ref.detach()}, normalize_delta=self.normalize_delta,
                            server_steps=self.server_steps, server_tol=self.server_tol, privacy=privacy, seed=seed)
