"""implicit_attention: exact implicit attention matrices and explanations for gated-linear RNNs.

Main entry points:

- :func:`decompose` -- every token-mixing layer as per-channel attention matrices ``[B, C, L, L]``.
- :func:`explain` -- relevance ``[B, L]`` of the input tokens for a prediction.
"""

from . import models as _models  # noqa: F401  registers our RetNet/HGRN/GLA/RWKV-6/RWKV-7 with the Auto classes
from .architectures import LayerDecomposition, supported_model_classes
from .decompose import Decomposition, decompose
from .explain import METHODS, Explanation, explain, run_explanation
from .errors import (EmptyInputError, ImplicitAttentionError, MemoryBudgetError, OffloadedLayerError,
                     ReconstructionError, UnsupportedModelError)

__version__ = "0.1.0"

__all__ = [
    "Decomposition", "EmptyInputError", "Explanation", "METHODS", "explain", "run_explanation", "ImplicitAttentionError", "LayerDecomposition", "MemoryBudgetError",
    "OffloadedLayerError", "ReconstructionError", "UnsupportedModelError", "decompose", "supported_model_classes",
]
