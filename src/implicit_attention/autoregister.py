"""Our models (RetNet, HGRN, GLA, RWKV-6, RWKV-7) join the ``transformers`` Auto classes on first use.

``import implicit_attention`` does not import torch or transformers (the command line starts in a
fraction of a second). Instead :func:`install` imports :mod:`implicit_attention.models` (which
registers our configurations and models with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``) right after ``transformers``' ``configuration_auto`` or ``modeling_auto``
is imported, whichever comes first, or at once if it already has been: before or after
``import implicit_attention``, the Auto classes know our ``model_type`` names by the time a user
can call them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable

CONFIG_TRIGGER = "transformers.models.auto.configuration_auto"
MODEL_TRIGGER = "transformers.models.auto.modeling_auto"


def register_models() -> None:
    """Register every configuration and model class (``import implicit_attention.models``)."""
    importlib.import_module("implicit_attention.models")


def _after_configuration_auto() -> None:
    # imported by modeling_auto's own first lines: register once modeling_auto has finished instead
    # (our model packages import AutoModel, which does not exist before then)
    if MODEL_TRIGGER not in sys.modules:
        register_models()


class _RunAfter(importlib.abc.Loader):
    """A loader that runs ``action`` once the wrapped loader has executed the module."""

    def __init__(self, loader: importlib.abc.Loader, action: Callable[[], None]):
        self.loader, self.action = loader, action

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.action()

    def __getattr__(self, name: str):  # get_source, get_filename, ... for tracebacks and tools
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the trigger modules like the normal path finder, with a loader that registers afterwards."""

    def __init__(self, actions: dict[str, Callable[[], None]]):
        self.actions = actions

    def find_spec(self, fullname: str, path, target=None):
        action = self.actions.pop(fullname, None)
        if action is None:
            return None
        if not self.actions and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RunAfter(spec.loader, action)
        return spec


def install() -> None:
    """Register at once if ``transformers``' Auto classes are already imported, else as soon as they are."""
    if MODEL_TRIGGER in sys.modules or CONFIG_TRIGGER in sys.modules:
        register_models()
        return
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport({MODEL_TRIGGER: register_models,
                                              CONFIG_TRIGGER: _after_configuration_auto}))
