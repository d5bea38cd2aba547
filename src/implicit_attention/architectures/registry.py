"""Registry of supported token-mixing layers: adding an architecture is one module plus ``register``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import LayerDecomposition


@dataclass
class CapturedLayer:
    """What the forward pass recorded for one token-mixing layer.

    Attributes:
        name: module path of the layer in the model.
        module: the layer itself (its parameters are read, never changed).
        architecture: the registry entry that decomposes it.
        inputs: ``[B, L, H]`` the layer's input hidden states.
        attention_mask: ``[B, L]`` the padding mask the layer received, or ``None``.
        output: ``[B, L, C]`` the layer's output before its output projection (still attached
            to the autograd graph when gradients were requested).
        block_input: ``[B, L, H]`` the residual stream entering the layer's block (the parent
            module), attached to the graph when gradients were requested.
        kwargs: the keyword arguments the layer was called with (tensors detached).
        module_output: what the layer returned (tensors detached), e.g. attention weights.
        extra: anything an architecture's own ``extra_hooks`` recorded.
    """

    name: str
    module: nn.Module
    architecture: "Architecture"
    inputs: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    output: torch.Tensor | None = None
    block_input: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)
    module_output: object = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """How to find and decompose one family of token-mixing layers.

    Attributes:
        name: short name (``"mamba"``).
        module_classes: dotted paths of the layer classes (imported lazily; missing ones skipped).
        model_classes: the user-facing model classes containing them, for error messages.
        variants: the formulations offered; the first is the default exact one.
        output_module: attribute path of the submodule whose *input* is the layer output before
            the output projection (``"out_proj"``), or ``None`` when the layer's own first return
            value is that output (e.g. an attention module whose projection lives outside it).
        build: ``build(captured, *, variant, dtype, index) -> LayerDecomposition``.
        channels: ``channels(module) -> int``, the operator's channel count ``C`` (for memory estimates).
        extra_hooks: optional ``extra_hooks(module, record) -> list[RemovableHandle]`` installing
            further hooks that fill ``record.extra`` (internal quantities the layer does not return).
        block_input: optional ``block_input(model, name) -> nn.Module`` the module whose input is
            the residual stream of this layer (default: the layer's parent module).
    """

    name: str
    module_classes: tuple[str, ...]
    model_classes: tuple[str, ...]
    variants: tuple[str, ...]
    output_module: str | None
    build: Callable[..., LayerDecomposition]
    channels: Callable[[nn.Module], int]
    extra_hooks: Callable | None = None
    block_input: Callable | None = None
    _classes: list = field(default_factory=list, compare=False, repr=False)

    def classes(self) -> tuple[type, ...]:
        """The layer classes that exist in the installed ``transformers``."""
        if not self._classes:
            for path in self.module_classes:
                module_name, _, class_name = path.rpartition(".")
                try:
                    self._classes.append(getattr(importlib.import_module(module_name), class_name))
                except (ImportError, AttributeError):
                    continue
            self._classes.append(type(None))  # marks the lookup as done
        return tuple(c for c in self._classes if c is not type(None))


_REGISTRY: list[Architecture] = []


def register(architecture: Architecture) -> Architecture:
    """Add an architecture to the registry (replacing one of the same name)."""
    _REGISTRY[:] = [a for a in _REGISTRY if a.name != architecture.name]
    _REGISTRY.append(architecture)
    return architecture


def architectures() -> tuple[Architecture, ...]:
    """Every registered architecture."""
    return tuple(_REGISTRY)


def supported_model_classes() -> list[str]:
    """Names of the model classes whose token-mixing layers can be decomposed."""
    return [name for a in _REGISTRY for name in a.model_classes]


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module, Architecture]]:
    """Every supported token-mixing layer of ``model`` as ``(name, module, architecture)``, in model order."""
    found = []
    for name, module in model.named_modules():
        for arch in _REGISTRY:
            if isinstance(module, arch.classes()):
                found.append((name, module, arch))
                break
    return found
