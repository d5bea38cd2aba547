"""Supported architectures, one package each; importing this package registers all of them.

Each sub-package (``mamba/``, ``gla/``, ...) registers its layers with
:func:`~.registry.register` on import; adding an architecture is adding one package here (it is
discovered automatically; ``README.md`` shows the template). An error inside our own code fails
the import loudly; a package whose optional third-party dependency is missing is skipped, and
:func:`~.registry.skipped_architectures` says why.
"""

from .base import AGGREGATES, LayerDecomposition
from .registry import (
                       Architecture,
                       CapturedLayer,
                       architectures,
                       discover,
                       find_layers,
                       register,
                       skipped_architectures,
                       supported_model_classes,
)

discover(__name__, __path__)

__all__ = [
    "AGGREGATES", "Architecture", "CapturedLayer", "LayerDecomposition", "architectures", "find_layers",
    "register", "skipped_architectures", "supported_model_classes",
]
