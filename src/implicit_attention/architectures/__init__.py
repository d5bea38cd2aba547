"""Supported architectures. Importing this package registers all of them."""

from .base import AGGREGATES, LayerDecomposition
from .registry import Architecture, CapturedLayer, architectures, find_layers, register, supported_model_classes
from . import mamba  # noqa: F401  (registers the Mamba mixers)

__all__ = [
    "AGGREGATES", "Architecture", "CapturedLayer", "LayerDecomposition", "architectures",
    "find_layers", "register", "supported_model_classes",
]
