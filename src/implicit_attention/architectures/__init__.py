"""Supported architectures. Importing this package registers all of them.

Every module in this package registers its layers with :func:`register` on import; adding an
architecture is adding one module here (it is discovered automatically).
"""

import importlib
import pkgutil
import warnings

from .base import AGGREGATES, LayerDecomposition
from .registry import Architecture, CapturedLayer, architectures, find_layers, register, supported_model_classes

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in ("base", "registry") and not _info.name.startswith("_") \
            and not _info.name.endswith("_naive"):
        try:
            importlib.import_module(f"{__name__}.{_info.name}")
        except Exception as error:  # one broken architecture must not disable the others
            warnings.warn(f"implicit_attention: architecture module {_info.name!r} failed to load "
                          f"and is disabled: {error!r}", RuntimeWarning, stacklevel=2)

__all__ = [
    "AGGREGATES", "Architecture", "CapturedLayer", "LayerDecomposition", "architectures",
    "find_layers", "register", "supported_model_classes",
]
