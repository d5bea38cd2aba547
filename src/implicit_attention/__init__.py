"""implicit_attention: exact implicit attention matrices and explanations for gated-linear RNNs.

Main entry points:

- :func:`decompose` -- every token-mixing layer as per-channel attention matrices ``[B, C, L, L]``.
- :func:`explain` -- relevance ``[B, L]`` of the input tokens for a prediction.
- :func:`explain_texts` -- the same from raw strings with a :func:`load_model` model (prompt
  template, tokens, padding, prediction).

The names below are imported on first use, so ``import implicit_attention`` (and the command
line) start without torch; our own models join the ``transformers`` Auto classes as soon as those
are imported (:mod:`.autoregister`). See ``ARCHITECTURE.md`` for a map of the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import autoregister
from .catalog import BASELINE_METHODS, MATRIX_METHODS, METHODS
from .errors import (
    EmptyInputError,
    ImplicitAttentionError,
    MemoryBudgetError,
    OffloadedLayerError,
    PaddingError,
    ReconstructionError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

#: public name -> the module it lives in (imported on first access)
_LAZY: dict[str, str] = {
    "decompose": "decomposition", "Decomposition": "decomposition",
    "explain": "explanations", "run_explanation": "explanations", "Explanation": "explanations",
    "explain_texts": "explanations", "TextExplanation": "explanations", "TextExplanations": "explanations",
    "load_model": "loading", "LoadedModel": "loading", "ModelLoadError": "loading", "TaskError": "loading",
    "DatasetError": "dataset", "OutputDirectoryError": "render",
    "LayerDecomposition": "architectures", "supported_model_classes": "architectures",
    "Contrast": "explanations.target", "LogProb": "explanations.target", "make_method": "explanations.methods",
    "StoredResultError": "persistence", "to_bertviz": "interop",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from .architectures import LayerDecomposition, supported_model_classes
    from .dataset import DatasetError
    from .decomposition import Decomposition, decompose
    from .explanations import Explanation, TextExplanation, TextExplanations, explain, explain_texts, run_explanation
    from .explanations.methods import make_method
    from .explanations.target import Contrast, LogProb
    from .interop import to_bertviz
    from .loading import LoadedModel, ModelLoadError, TaskError, load_model
    from .persistence import StoredResultError
    from .render import OutputDirectoryError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


autoregister.install()

__all__ = [
    "BASELINE_METHODS", "Contrast", "DatasetError", "Decomposition", "EmptyInputError", "Explanation", "ImplicitAttentionError",
    "LayerDecomposition", "LoadedModel", "LogProb", "MATRIX_METHODS", "METHODS", "MemoryBudgetError", "ModelLoadError",
    "OffloadedLayerError", "OutputDirectoryError", "PaddingError", "ReconstructionError", "TaskError", "TextExplanation",
    "TextExplanations", "UnsupportedModelError", "decompose", "explain", "explain_texts", "load_model",
    "make_method", "run_explanation", "supported_model_classes", "StoredResultError", "to_bertviz",
]
