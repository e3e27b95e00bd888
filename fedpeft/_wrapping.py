"""The small protocol every fedpeft wrapper follows, and the one place that recognises a wrapper.

A fedpeft wrapper (``VPT``, ``ParallelPrefix``, ``Prefix``) holds the module it wraps as ``model`` and describes
itself with ``adapter_config()``; wrappers nest (``ParallelPrefix(VPT(vit))``), and the innermost ``model`` is the
user's ViT.
"""

from __future__ import annotations

from typing import List

from torch import nn

__all__ = ["innermost", "is_wrapper", "wrapper_chain"]


def is_wrapper(module: object) -> bool:
    """Whether ``module`` is a fedpeft wrapper: it has ``adapter_config`` and holds an ``nn.Module`` as ``model``."""
    return hasattr(module, "adapter_config") and isinstance(getattr(module, "model", None), nn.Module)


def wrapper_chain(module: nn.Module) -> List[nn.Module]:
    """``[outer, ..., innermost wrapper]``: the fedpeft wrappers from ``module`` down (empty for a plain model)."""
    chain = []
    while is_wrapper(module):
        chain.append(module)
        module = module.model
    return chain


def innermost(module: nn.Module) -> nn.Module:
    """The user's model under any stack of fedpeft wrappers."""
    chain = wrapper_chain(module)
    return chain[-1].model if chain else module
