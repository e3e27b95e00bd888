"""A server's DP state and steps: the noise seed, the privacy ledger, the private average and the per-round summary.

Both servers hold one (``AveragingServer(..., privacy=)``, ``PFedPGServer(..., privacy=)``) and call it at fixed
points, so the maths lives here once (:mod:`~fedpeft.protocols.privacy`, :mod:`~fedpeft.protocols.accountant`):

- ``screen(accepted, rejected, reference)``: refuses a reply whose update exceeds the clip bound (the client clips; a hostile
  one cannot buy influence by skipping it);
- ``average(shared, accepted, num_sampled)``: DP-FedAvg's step, equal weights and the fixed denominator m;
- ``generator_grads(...)``: pFedPG's clipped, noised generator gradient, one call per server step (release);
- ``close_round(num_sampled, releases)``: records the round in the ledger and returns the record's ``privacy`` entry.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .accountant import PrivacyLedger
from .privacy import Privacy, add_noise, clip_update, global_norm, private_generator_grads, upload_norm_bound
from .records import Rejection, Reply, rejection_order

__all__ = ["ServerPrivacy", "client_clip", "load_privacy", "make_private_server", "note_sample"]

log = logging.getLogger("fedpeft.protocols")


class ServerPrivacy:
    """One server's DP: settings, ledger, noise seed and round counter (see the module docstring).

    Args:
        privacy: the settings.
        num_clients: C (required: the sampling rate m / C enters the accounting).
        seed: the noise seed; ``None`` draws one from torch's global RNG, as a server's other random values are
            drawn (so two engines that seed torch alike draw the same noise). It is kept in the checkpoint (a resumed
            run draws the same noise). Keep it secret: whoever knows it can subtract the noise.
    """

    def __init__(self, privacy: Privacy, num_clients: Optional[int], seed: Optional[int] = None) -> None:
        if not isinstance(privacy, Privacy):
            raise TypeError(f"privacy must be a fedpeft.protocols.Privacy or None, got {type(privacy).__name__}")
        if num_clients is None:
            raise ValueError("privacy needs num_clients (the accountant's sampling rate is m / num_clients)")
        self.privacy = privacy
        self.ledger = PrivacyLedger(privacy, num_clients)
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 1 << 62, (1,)))
        self.last: Optional[Dict[str, Any]] = None  # the latest round's summary
        self.sampled: Optional[int] = None  # the round's drawn sample size, when an engine sent to fewer (note_sample)

    @property
    def noise_std(self) -> float:
        """σ·C, the noise's std on the clipped sum."""
        return self.privacy.noise_multiplier * self.privacy.clip_norm

    def screen(self, accepted: Sequence[Reply], rejected: Sequence[Rejection],
               reference: Mapping[str, Tensor]) -> Tuple[List[Reply], List[Rejection]]:
        """``accepted`` without the replies whose ``‖upload − reference‖`` exceeds the clip bound
        (:func:`~fedpeft.protocols.privacy.upload_norm_bound`), and ``rejected`` with them added (sorted by client)."""
        bound = upload_norm_bound(self.privacy.clip_norm, reference)
        keep: List[Reply] = []
        refused = list(rejected)
        for r in accepted:
            norm = global_norm({k: r.upload[k].to(torch.float64) - v.to(torch.float64) for k, v in reference.items()})
            if norm > bound:
                reason = (f"its update's L2 norm {norm:.6g} exceeds clip_norm {self.privacy.clip_norm:g} (privacy: "
                          "a client clips its update before sending it)")
                log.warning("dropped the reply of client %r: %s", r.client_id, reason)
                refused.append(Rejection(r.client_id, reason))
            else:
                keep.append(r)
        refused.sort(key=rejection_order)
        return keep, refused

    def average(self, shared: Mapping[str, Tensor], accepted: Sequence[Reply], num_sampled: int,
                round: int) -> Tuple[Dict[str, Tensor], List[float]]:
        """``(shared + (Σ_n clip(upload_n − shared) + σ C z) / m, [‖upload_n − shared‖])``, in float64, returned
        in each tensor's dtype.

        Every accepted reply weighs the same (a sample-count weight would let one client's share exceed C / m)."""
        total = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in shared.items()}
        norms = []
        for r in accepted:
            delta = {k: r.upload[k].to(v.device, torch.float64) - v.to(torch.float64) for k, v in shared.items()}
            clipped, norm = clip_update(delta, self.privacy.clip_norm)
            norms.append(norm)
            for k in total:
                total[k] += clipped[k]
        noisy = add_noise(total, self.noise_std, seed=self.seed, round=round)
        return {k: (v.to(torch.float64) + noisy[k] / num_sampled).to(v.dtype) for k, v in shared.items()}, norms

    def generator_grads(self, generated: Tensor, trained: Tensor, params: Sequence[Tuple[str, nn.Parameter]],
                        num_sampled: int, round: int, release: int = 0,
                        rows: Optional[Mapping[str, Sequence[int]]] = None) -> List[float]:
        """pFedPG's private gradient (:func:`~fedpeft.protocols.privacy.private_generator_grads`) into ``.grad``."""
        return private_generator_grads(generated, trained, params, self.privacy, num_sampled=num_sampled,
                                       seed=self.seed, round=round, release=release, rows=rows)

    def sample_size(self, sent: int) -> int:
        """m of the round in flight: the clients it was sent to, or the drawn sample an engine noted when some had no
        node (they add 0: the fixed denominator). Resets the note."""
        m, self.sampled = max(int(sent), self.sampled or 0), None
        return m

    def close_round(self, num_sampled: int, releases: int = 1) -> Dict[str, Any]:
        """Account for one round (``releases`` noisy steps on ``num_sampled`` clients); returns its summary."""
        self.ledger.record(num_sampled, releases)
        self.last = self.ledger.summary(num_sampled, releases)
        return self.last

    @property
    def epsilon(self) -> float:
        """ε(δ) of every round so far."""
        return self.ledger.epsilon

    def state_dict(self) -> Dict[str, Any]:
        """``{"ledger": ..., "seed": s, "last": summary}`` (JSON-ready)."""
        return {"ledger": self.ledger.state_dict(), "seed": self.seed, "last": self.last}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`'s output; ``ValueError`` (untouched) when the settings differ (see
        :meth:`PrivacyLedger.load_state_dict`) or the checkpoint was written without privacy."""
        if not isinstance(state, Mapping):
            raise ValueError(f"privacy: this server runs with {self.privacy.as_dict()} but the checkpoint has no "
                             "privacy state (it was written without privacy)")
        seed = state.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"privacy: the checkpoint's noise seed must be an int, got {seed!r}")
        last = state.get("last")
        self.ledger.load_state_dict(state.get("ledger"))  # checks settings before anything changes
        self.seed, self.last = seed, dict(last) if isinstance(last, Mapping) else None


def load_privacy(privacy: Optional[ServerPrivacy], meta: Mapping[str, Any]) -> None:
    """Restore a server's DP state from its checkpoint ``meta["privacy"]``; ``ValueError`` (nothing changed) when
    one of the two has privacy and the other not, or the settings differ."""
    if privacy is None:
        if meta.get("privacy") is not None:
            theirs = meta["privacy"].get("ledger", {}).get("privacy") if isinstance(meta["privacy"], Mapping) else None
            raise ValueError(f"privacy: the checkpoint was written with privacy {theirs}, this server runs without; "
                             "resume with the same privacy settings")
        return
    privacy.load_state_dict(meta.get("privacy"))


def make_private_server(protocol: Any, model: nn.Module, num_clients: int, privacy: Optional[Privacy],
                        seed: Optional[int] = None) -> Any:
    """``protocol.make_server(model, num_clients=, seed=)``, with ``privacy=`` only when it is set (so a protocol
    whose ``make_server`` predates privacy still works without it).

    Raises:
        ValueError: ``privacy`` is set and the protocol's server cannot honour it.
    """
    if privacy is None:
        return protocol.make_server(model, num_clients=num_clients, seed=seed)
    if not isinstance(privacy, Privacy):
        raise TypeError(f"privacy must be a fedpeft.protocols.Privacy or None, got {type(privacy).__name__}")
    try:
        server = protocol.make_server(model, num_clients=num_clients, seed=seed, privacy=privacy)
    except TypeError as e:
        if "privacy" not in str(e):
            raise
        raise ValueError(f"privacy: {protocol.name}'s server cannot honour it (its make_server takes no privacy=)") \
            from None
    if not isinstance(getattr(server, "privacy", None), ServerPrivacy):
        raise ValueError(f"privacy: {protocol.name}'s server ({type(server).__name__}) ignored it")
    return server


def client_clip(server: Any) -> Dict[str, float]:
    """``{"clip_norm": C}`` when ``server`` wants its clients to clip their update, else ``{}`` (the keyword
    arguments an engine adds to ``protocol.client_update``)."""
    clip = getattr(server, "client_clip_norm", None)
    return {} if clip is None else {"clip_norm": clip}


def note_sample(server: Any, sampled: int) -> None:
    """Tell a private ``server`` how many clients this round drew (an engine that sends to fewer, because some drawn
    clients have no live node, calls it before ``payloads``); no-op for a server without privacy."""
    dp = getattr(server, "privacy", None)
    if isinstance(dp, ServerPrivacy):
        dp.sampled = int(sampled)
