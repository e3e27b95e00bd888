"""Which fedpeft wrappers wrap a module, so that one wrapper never silently changes another one's state.

Every fedpeft wrapper sets ``requires_grad`` on the ViT it wraps: ``VPT`` freezes the backbone and sets the head's
flag from ``train_head``, ``ParallelPrefix`` / ``Prefix`` freeze or unfreeze it per ``train_backbone``. A second
wrapper around the *same* ViT would therefore change the first one's trainable set (``VPT(vit, train_head=False)``
freezes the head a first ``VPT(vit)`` trains). The rule:

- a ``VPT`` is an *exclusive* wrapper: it refuses a ViT that any live fedpeft wrapper already wraps, and while it
  lives no other wrapper may wrap that ViT directly (wrap the VPT instead: ``ParallelPrefix(vpt)``);
- the attention adapters (``ParallelPrefix``, ``Prefix``) are *shared* wrappers: several may sit on disjoint layers
  of one ViT (each layer refuses a second adapter of its kind), but not on a ViT a VPT holds.

For independent models wrap a copy (``VPT(copy.deepcopy(vit))``). The registry holds weak references only: a wrapper
that is garbage-collected (``del vpt``) or ejected (``eject()``) releases its module, and nothing is stored on the
user's module (it pickles and deep-copies as before; a deep copy of a wrapper holds a new, unclaimed copy of the ViT).
"""

from __future__ import annotations

import weakref
from typing import List, Tuple

from torch import nn

__all__ = ["check_free", "claim", "owners", "release"]

# module -> [(weak reference to a wrapper, exclusive)]
_OWNERS: weakref.WeakKeyDictionary[nn.Module, List[Tuple[weakref.ref, bool]]] = weakref.WeakKeyDictionary()


def owners(module: nn.Module) -> List[Tuple[nn.Module, bool]]:
    """The live wrappers that wrap ``module`` directly, each with whether it is exclusive."""
    live = [(ref(), exclusive) for ref, exclusive in _OWNERS.get(module, [])]
    return [(w, exclusive) for w, exclusive in live if w is not None]


def check_free(module: nn.Module, *, exclusive: bool, wrapper: object = None) -> None:
    """``ValueError`` if ``module`` may not get another wrapper (see the module docstring); changes nothing."""
    others = [(w, ex) for w, ex in owners(module) if w is not wrapper]
    blocking = [w for w, ex in others if ex or exclusive]
    if blocking:
        kind, first = type(module).__name__, type(blocking[0]).__name__
        raise ValueError(
            f"this {kind} is already wrapped by a {first}; another wrapper around the same {kind} would change "
            f"the {first}'s trainable parameters. Wrap the wrapper instead (e.g. ParallelPrefix(vpt)), wrap a copy "
            "(copy.deepcopy(vit)), or drop (del) or eject() the first wrapper"
        )


def claim(module: nn.Module, wrapper: nn.Module, *, exclusive: bool) -> None:
    """Record ``wrapper`` as a wrapper of ``module`` (after :func:`check_free`; raises as it does)."""
    check_free(module, exclusive=exclusive, wrapper=wrapper)
    live = [(ref, ex) for ref, ex in _OWNERS.get(module, []) if ref() is not None and ref() is not wrapper]
    _OWNERS[module] = [*live, (weakref.ref(wrapper), exclusive)]


def release(module: nn.Module, wrapper: nn.Module) -> None:
    """Forget ``wrapper`` as a wrapper of ``module`` (after ``eject()``)."""
    live = [(ref, ex) for ref, ex in _OWNERS.get(module, []) if ref() is not None and ref() is not wrapper]
    if live:
        _OWNERS[module] = live
    else:
        _OWNERS.pop(module, None)
