"""fedpeft: parameter-efficient personalization modules for timm Vision Transformers in federated learning.

Map of the public API:

- ``VPT``: visual prompt tokens in a frozen ViT, shallow or deep (Jia et al., 2022).
- ``PromptGenerator``: pFedPG's server-side cross-attention prompt generator (Yang et al., 2023).
- ``ParallelPrefix``: FedPerfix's input-conditioned key/value offsets; ``Prefix``: vanilla prefix tuning.
- ``LowRankPrompt``, ``knowledge_guided_loss``, ``fedpgp_forward``: FedPGP's global + low-rank prompts and loss.
- ``save_adapter`` / ``load_adapter``: adapter-only safetensors + JSON files.
- ``parameter_summary`` (also ``model.summary()`` / ``model.print_trainable_parameters()`` on every wrapper):
  trainable / total parameters and the per-round size of a personalization split.
- ``fed``: pure server-side functions (aggregation, personal keys, ΔP as a gradient, accounting, interop).
- ``protocols``: every method's federated protocol (client step, server step, what is uploaded), engine-agnostic.
"""

import importlib.util as _importlib_util
import sys as _sys
import types as _types


class _LazyModule(_types.ModuleType):
    """A module whose code runs, in this very object, on the first access to a name it defines.

    Unlike ``importlib.util.LazyLoader``, reading ``__file__``/``__spec__`` (as ``inspect.getmodule`` does while torch
    or torchvision is half-imported) does not load it: only a missing attribute does.
    """

    def __getattr__(self, name: str):
        loader = self.__dict__.pop("_fedpeft_loader", None)
        if loader is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        loader.exec_module(self)
        return getattr(self, name)


def _lazy_module(name: str) -> None:
    """Register the submodule ``name`` of fedpeft to run on first use instead of on import."""
    if name in _sys.modules:
        return
    spec = _importlib_util.find_spec(name)
    module = _LazyModule(name)
    module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
    module.__package__ = name.rpartition(".")[0]
    module._fedpeft_loader = spec.loader
    _sys.modules[name] = module
    globals()[name.rpartition(".")[2]] = module  # as the import system binds a loaded submodule on its package


# timm is imported when a wrapper first touches a model, not by ``import fedpeft`` (every access to timm lives in
# these two modules): a ClientApp whose own code needs no timm does not pay for it on every message.
_lazy_module(__name__ + "._timm_eva")
_lazy_module(__name__ + "._timm")

from . import fed, protocols  # noqa: E402
from ._version import __version__  # noqa: E402
from .adapter_io import load_adapter, save_adapter  # noqa: E402
from .fedpgp import FedPGPOutput, fedpgp_forward  # noqa: E402
from .generator import PromptGenerator  # noqa: E402
from .losses import knowledge_guided_loss  # noqa: E402
from .lowrank import LowRankPrompt  # noqa: E402
from .parallel_prefix import ParallelPrefix  # noqa: E402
from .prefix import Prefix  # noqa: E402
from .summary import ParameterSummary, parameter_summary  # noqa: E402
from .vpt import VPT  # noqa: E402

__all__ = [
    "VPT",
    "FedPGPOutput",
    "LowRankPrompt",
    "ParallelPrefix",
    "ParameterSummary",
    "Prefix",
    "PromptGenerator",
    "__version__",
    "fed",
    "fedpgp_forward",
    "knowledge_guided_loss",
    "load_adapter",
    "parameter_summary",
    "protocols",
    "save_adapter",
]
