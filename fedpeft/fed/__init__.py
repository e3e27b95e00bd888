"""fedpeft.fed: the server side of every method, as pure functions over state dicts.

Every function takes ``Mapping[str, Tensor]`` (or tensors) and returns new objects; inputs are never mutated, there is
no global state, and bad input raises ``ValueError``/``TypeError`` naming the key, what was expected and what came,
before anything is computed or accumulated. See docs/fed.md.

ΔP as a gradient (pFedPG)          ``delta(before, after)``, ``delta_backward(generated, trained)``
Aggregation (FedAvg)               ``average(states, weights=None)``, ``Averager`` (``add``, ``result``; streaming)
Partial personalization            ``personal_keys(model_or_state, patterns)``, ``WORDS``, ``PRESETS``,
                                   ``trainable_keys(model)``, ``trainable_state(model)``, ``split(state, keys)``, ``merge(shared, personal)``
Identity of a frozen backbone      ``frozen_fingerprint(model)`` (SHA-256 of every non-trainable state entry)
Communication accounting           ``num_bytes(state)``, ``num_params(state)``
Interop (Flower NDArrays)          ``to_ndarrays(state)``, ``from_ndarrays(keys, arrays, like=/dtypes=)``
"""

from .accounting import num_bytes, num_params
from .aggregate import Averager, average
from .interop import from_ndarrays, to_ndarrays
from .keys import (
    PRESETS,
    WORDS,
    frozen_fingerprint,
    merge,
    personal_keys,
    split,
    trainable_keys,
    trainable_state,
)
from .prompt_update import delta, delta_backward

__all__ = [
    "PRESETS",
    "WORDS",
    "Averager",
    "average",
    "delta",
    "delta_backward",
    "from_ndarrays",
    "frozen_fingerprint",
    "merge",
    "num_bytes",
    "num_params",
    "personal_keys",
    "split",
    "to_ndarrays",
    "trainable_keys",
    "trainable_state",
]
