"""Supported architectures. Importing this package registers all of them.

Every module in this package registers its layers with :func:`register` on import; adding an
architecture is adding one module here (it is discovered automatically).
"""

import importlib
import pkgutil

from .base import AGGREGATES, LayerDecomposition
from .registry import Architecture, CapturedLayer, architectures, find_layers, register, supported_model_classes

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in ("base", "registry") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "AGGREGATES", "Architecture", "CapturedLayer", "LayerDecomposition", "architectures",
    "find_layers", "register", "supported_model_classes",
]
