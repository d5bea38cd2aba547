"""Registry of supported token-mixing layers: adding an architecture is one module plus ``register``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..memory import LayerFootprint
from .base import LayerDecomposition
from .primitives import to_batch


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
        footprint: the :class:`~implicit_attention.memory.LayerFootprint` of a decomposed layer, for
            the memory estimates (``None``: the generic one).
        exact_variants: the variants that are exact identities of the layer (the others leave a
            factor out on purpose); default the first variant alone.
        rounds_in_float32: the module computes part of its forward in float32 whatever the model's
            dtype (the delta-rule kernels, lightning attention's decays and norm), so a float64 model's
            output carries float32 rounding: the default tolerance for its layers is then
            :data:`~implicit_attention.decomposition.FLOAT32_KERNEL_TOLERANCE` rather than 1e-6.
        keeps_unified: a layer of this family that lacks a variant the model's other layers offer keeps
            its exact formulation under it (softmax attention inside a hybrid: it has none of the parts a
            recurrent variant such as ``s6`` or ``no_conv`` drops) instead of refusing it.
        ignores_padding: whether the layer's outputs at real tokens do not depend on left padding
            (a bool, or a function of the module): ``False`` for layers that read padding tokens
            (RWKV-4 and xLSTM ignore the attention mask; a Mamba in-projection bias reaches real
            tokens through the conv). Padded batches of such models are refused by ``explain``.
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
    footprint: LayerFootprint | None = None
    exact_variants: frozenset[str] | None = None
    keeps_unified: bool = False
    ignores_padding: bool | Callable[[nn.Module], bool] = True
    rounds_in_float32: bool = False
    _classes: dict = field(default_factory=dict, compare=False, repr=False)

    def is_exact(self, variant: str) -> bool:
        """Whether ``variant`` is an exact identity of this architecture's layers."""
        return variant in (self.exact_variants if self.exact_variants is not None else {self.variants[0]})

    def classes(self) -> tuple[type, ...]:
        """The layer classes that exist in the installed packages.

        A path whose top package is not imported yet is left for a later call: no model can hold an
        instance of it yet, and importing it here would cost every user its import (``fla`` imports Triton).
        """
        for path in self.module_classes:
            if path in self._classes:
                continue
            module_name, _, class_name = path.rpartition(".")
            if module_name.partition(".")[0] not in sys.modules:
                continue
            try:
                self._classes[path] = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                self._classes[path] = None
        return tuple(c for c in self._classes.values() if c is not None)


def layer_builder(decomposition: Callable[..., LayerDecomposition],
                  read_factors: Callable[[CapturedLayer, torch.dtype], Any]) -> Callable[..., LayerDecomposition]:
    """The ``build`` of an :class:`Architecture`: ``decomposition(read_factors(captured, dtype), variant=...,
    index=..., name=..., output=...)`` with the captured output in the compute dtype (in the batch layout:
    :func:`~.primitives.to_batch`)."""
    def build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> LayerDecomposition:
        output = to_batch(captured.output.detach().to(dtype), captured.inputs, captured.attention_mask)
        return decomposition(read_factors(captured, dtype), variant=variant, index=index, name=captured.name,
                             output=output)
    return build


def input_and_mask(factors: Callable[..., Any]) -> Callable[[CapturedLayer, torch.dtype], Any]:
    """``read_factors`` for a factor function ``factors(module, hidden_states, attention_mask, dtype)``."""
    return lambda captured, dtype: factors(captured.module, captured.inputs, captured.attention_mask, dtype)


_REGISTRY: list[Architecture] = []


def register(architecture: Architecture) -> Architecture:
    """Add an architecture to the registry (replacing one of the same name)."""
    _REGISTRY[:] = [a for a in _REGISTRY if a.name != architecture.name]
    _REGISTRY.append(architecture)
    return architecture


_SKIPPED: dict[str, str] = {}


def discover(package: str, path: Iterable[str]) -> None:
    """Import every sub-package of ``package`` (each registers its architectures), in name order.

    A sub-package whose import fails because a third-party module is missing is skipped and the
    reason kept (:func:`skipped_architectures`); any other error, and any missing module of our
    own, propagates: a broken architecture must not turn into a silent "unsupported model".
    """
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if not info.ispkg:
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if missing == "implicit_attention" or missing.startswith("implicit_attention."):
                raise
            _SKIPPED[info.name] = f"needs the {missing.split('.')[0]!r} package, which is not installed ({error})"


def skipped_architectures() -> dict[str, str]:
    """``{package: reason}`` of the architecture packages that could not be loaded (a missing dependency)."""
    return dict(_SKIPPED)


def architectures() -> tuple[Architecture, ...]:
    """Every registered architecture."""
    return tuple(_REGISTRY)


def supported_model_classes() -> list[str]:
    """Names of the model classes whose token-mixing layers can be decomposed."""
    return list(dict.fromkeys(name for a in _REGISTRY for name in a.model_classes))  # without repeats


def unsupported_model(what: str) -> UnsupportedModelError:
    """The error for a model (named by ``what``) in which no registered layer class was found."""
    return UnsupportedModelError(f"{what} has no token-mixing layer implicit_attention can decompose. "
                                 f"Supported model classes include {_some_head_classes()} (with their "
                                 "backbones; every class and architecture: implicit-attention info --architectures).")


#: The head classes a model can be loaded as (the error lists these, not backbones).
_HEADS = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification", "ForImageClassification")
#: The architectures whose classes the error names first.
_FIRST = ("mamba", "mamba2", "rwkv4", "rwkv6", "rwkv7", "retnet", "hgrn", "gla", "griffin", "xlstm", "attention_gpt2",
          "attention")


def _some_head_classes(per_architecture: int = 2, most: int = 16) -> str:
    """A readable sample of the supported model classes with a head: at most ``per_architecture`` of each
    architecture (well-known ones first), ``most`` in all, without repeats, then how many more there are."""
    order = sorted(_REGISTRY, key=lambda a: _FIRST.index(a.name) if a.name in _FIRST else len(_FIRST))
    heads = list(dict.fromkeys(name for a in order for name in a.model_classes if name.endswith(_HEADS)))
    shown: list[str] = []
    for arch in order:
        shown += [name for name in arch.model_classes if name.endswith(_HEADS) and name not in shown][:per_architecture]
    shown = shown[:most]
    rest = len(heads) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest > 0 else "")


def model_layers(model: nn.Module) -> list[tuple[str, nn.Module, Architecture]]:
    """:func:`find_layers`, raising :class:`~implicit_attention.errors.UnsupportedModelError` when there are none."""
    found = find_layers(model)
    if not found:
        raise unsupported_model(type(model).__name__)
    return found


def padding_leaks(model: nn.Module) -> list[str]:
    """Names of the token-mixing layers of ``model`` whose real-token outputs depend on left padding."""
    return [name for name, module, arch in find_layers(model)
            if not (arch.ignores_padding(module) if callable(arch.ignores_padding) else arch.ignores_padding)]


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module, Architecture]]:
    """Every supported token-mixing layer of ``model`` as ``(name, module, architecture)``, in model order."""
    found = []
    for name, module in model.named_modules():
        for arch in _REGISTRY:
            if isinstance(module, arch.classes()):
                found.append((name, module, arch))
                break
    return found
