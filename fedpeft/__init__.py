"""fedpeft: parameter-efficient personalization modules for timm Vision Transformers in federated learning.

Map of the public API:

- ``VPT``: visual prompt tokens in a frozen ViT, shallow or deep (Jia et al., 2022).
- ``PromptGenerator``: pFedPG's server-side cross-attention prompt generator (Yang et al., 2023).
- ``ParallelPrefix``: FedPerfix's input-conditioned key/value offsets; ``Prefix``: vanilla prefix tuning.
- ``LowRankPrompt``, ``knowledge_guided_loss``, ``fedpgp_forward``: FedPGP's global + low-rank prompts and loss.
- ``save_adapter`` / ``load_adapter``: adapter-only safetensors + JSON files.
- ``fed``: pure server-side functions (aggregation, personal keys, ΔP as a gradient, accounting, interop).
- ``protocols``: every method's federated protocol (client step, server step, what is uploaded), engine-agnostic.
"""

from . import fed, protocols
from ._version import __version__
from .adapter_io import load_adapter, save_adapter
from .fedpgp import FedPGPOutput, fedpgp_forward
from .generator import PromptGenerator
from .losses import knowledge_guided_loss
from .lowrank import LowRankPrompt
from .parallel_prefix import ParallelPrefix
from .prefix import Prefix
from .vpt import VPT

__all__ = [
    "VPT",
    "FedPGPOutput",
    "LowRankPrompt",
    "ParallelPrefix",
    "Prefix",
    "PromptGenerator",
    "__version__",
    "fed",
    "fedpgp_forward",
    "knowledge_guided_loss",
    "load_adapter",
    "protocols",
    "save_adapter",
]
