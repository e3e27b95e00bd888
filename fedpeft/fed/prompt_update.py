"""ΔP as a gradient: the pFedPG / pFedHN server update, with the sign that descends.

pFedPG (Yang et al., ICCV 2023, Eq. 4-5) trains the server-side prompt generator from the clients' prompt updates
``ΔP_n = P̃_n − P_n`` (trained minus generated). The paper writes the update as ``φ ← φ − α (∇_φ P_n)ᵀ ΔP_n``; taken
literally that is gradient *ascent* on ``½‖P_n − P̃_n‖²`` and moves ``P_n`` away from ``P̃_n``. The pFedHN code
pFedPG builds on back-propagates ``init − final``, i.e. ``−ΔP``. fedpeft uses that convention:

    pseudo-gradient of the generated prompts  g_n = P_n − P̃_n = −ΔP_n  (= ∇_P ½‖P − P̃‖²)

so that ``optimizer.step()`` after :func:`delta_backward` moves every generated ``P_n`` toward its ``P̃_n``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_fits, check_state

__all__ = ["delta", "delta_backward"]

_DONE = "fedpeft.delta_backward"  # marks an output's autograd node once its graph has been back-propagated


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(
            f"expected two tensors, got {name_a}={type(a).__name__} and {name_b}={type(b).__name__}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )
    for name, t in ((name_a, a), (name_b, b)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    check_state({name_a: a, name_b: b}, finite=True, name="prompts")  # NaN/Inf refused before any update


def _check_difference(name: str, diff: Tensor) -> None:
    """Finite inputs of opposite signs can have a difference beyond the dtype's range: refuse that, not return Inf."""
    try:
        check_fits(name, diff, diff.dtype)
    except ValueError:
        raise ValueError(
            f"{name} overflows {diff.dtype} (finite inputs, but their difference exceeds "
            f"±{torch.finfo(diff.dtype).max:.6g}); nothing was computed into any state"
        ) from None


def delta(before: Tensor, after: Tensor) -> Tensor:
    """The paper's prompt update ``ΔP = P̃ − P = after − before`` (a new tensor, detached, inputs untouched).

    Args:
        before: prompts sent to the client, ``P`` (any shape, e.g. ``(n, L, K, D)``).
        after: prompts the client trained, ``P̃`` (same shape). The result has its dtype.

    Raises:
        ValueError: shapes differ, an input holds NaN/Inf, or the difference is not finite in ``after``'s dtype
            (e.g. float32 ``3e38 − (−3e38)``).
        TypeError: not floating-point tensors, or sparse/meta tensors.
    """
    _check_pair("before", before, "after", after)
    check_fits("before (as the dtype of after)", before, after.dtype)
    out = after.detach() - before.detach().to(after.dtype)
    _check_difference("after − before", out)
    return out


def delta_backward(generated: Tensor, trained: Tensor) -> None:
    """Back-propagate ``generated − trained`` (= −ΔP) through a generator's output.

    After this call, ``optimizer.step()`` on the generator's parameters moves every generated prompt toward the
    prompt its client trained: the call accumulates ``∇_φ ½ Σ_n ‖P_n(φ) − P̃_n‖²`` into ``.grad``, exactly as
    ``(0.5 * (generated - trained).pow(2).sum()).backward()`` would, without building that extra graph.

    Args:
        generated: ``P = gen(client_ids)`` with its autograd graph, shape ``(n, L, K, D)`` (any shape works).
        trained: the clients' trained prompts ``P̃``, same shape; detached if it carries a graph.

    Raises:
        ValueError: if shapes differ, either tensor holds NaN/Inf, or ``trained`` or ``generated − trained`` is not
            finite in ``generated``'s dtype (a float32 ``1e5`` is ``inf`` in float16). Validation happens before any
            gradient is written, so the generator's parameters and ``.grad`` are untouched on error.
        TypeError: if ``generated`` has no autograd graph (nothing to update) or inputs are not float tensors.
        ValueError: also if ``generated`` was already passed to ``delta_backward`` (its graph is freed by the first
            call): generate the prompts again. Slices of one output (``P[0]``, ``P[1]``) share its graph: pass the
            whole output once.

    Example::

        P = gen(ids)                       # (n, L, K, D), keeps the graph
        P_trained = ...                    # what the clients sent back
        opt.zero_grad()
        fed.delta_backward(P, P_trained)   # gradient = P − P̃ = −ΔP
        opt.step()                         # every P_n moves toward its P̃_n
    """
    _check_pair("generated", generated, "trained", trained)
    if not generated.requires_grad:
        raise TypeError(
            "generated must carry an autograd graph (the output of the generator's forward without no_grad); "
            "got a tensor with requires_grad=False"
        )
    node = generated.grad_fn  # None for a leaf: nothing is freed, a second call accumulates again
    if node is not None and node.metadata.get(_DONE):
        raise ValueError(
            "generated was already passed to fed.delta_backward: its autograd graph is freed after one backward; "
            "generate the prompts again (P = gen(ids)) for another update"
        )
    check_fits(f"trained (as {generated.dtype}, the generator's dtype)", trained, generated.dtype)
    grad = generated.detach() - trained.detach().to(device=generated.device, dtype=generated.dtype)
    _check_difference("the gradient generated − trained", grad)
    generated.backward(gradient=grad)
    if node is not None:
        node.metadata[_DONE] = True
