"""Communication accounting: what one round sends, for the "communication cost" columns of the papers' tables.

For a state dict ``s`` (e.g. the shared part from :func:`fedpeft.fed.split`, restricted to
:func:`fedpeft.fed.trainable_keys`):

    num_params(s) = Σ_k numel(s[k])                     (FedPerfix Table 2, "Communication (# Params)")
    num_bytes(s)  = Σ_k numel(s[k]) · element_size(s[k])  (in the tensors' own dtypes)

Tied tensors count once per key, as they would be sent once per key. Note that bfloat16 tensors travel as float32
through :func:`fedpeft.fed.to_ndarrays` (NumPy has no bfloat16), i.e. twice ``num_bytes`` on such a wire.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from .._checks import check_state

__all__ = ["num_bytes", "num_params"]


def num_params(state: Mapping[str, Tensor]) -> int:
    """The number of elements in ``state``: ``Σ_k s[k].numel()``.

    Raises:
        TypeError: ``state`` is not a ``Mapping[str, Tensor]`` (pass ``model.state_dict()``, not the model).
    """
    check_state(state)
    return sum(t.numel() for t in state.values())


def num_bytes(state: Mapping[str, Tensor]) -> int:
    """The payload size of ``state`` in bytes: ``Σ_k s[k].numel() · s[k].element_size()``.

    Raises:
        TypeError: ``state`` is not a ``Mapping[str, Tensor]`` (pass ``model.state_dict()``, not the model).
    """
    check_state(state)
    return sum(t.numel() * t.element_size() for t in state.values())
