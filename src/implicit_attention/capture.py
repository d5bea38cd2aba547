"""Input validation and forward hooks that record what each token-mixing layer saw and produced."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import inspect
from contextlib import contextmanager

import torch
from torch import nn

from .architectures import CapturedLayer, find_layers, supported_model_classes
from .architectures.registry import Architecture
from .errors import EmptyInputError, UnsupportedModelError


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's first floating parameter."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def prepare_inputs(model: nn.Module, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``input_ids`` (``[L]``, ``[B, L]``, list or tensor) and the mask; move them to the model.

    Returns ``input_ids [B, L]`` (long) and ``attention_mask [B, L]`` (long) or ``None``.
    Raises :class:`EmptyInputError` for an empty input or a row with no real token.
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [L] or [B, L], got shape {tuple(ids.shape)}")
    if ids.numel() == 0 or ids.shape[1] == 0:
        raise EmptyInputError("input_ids is empty: there is nothing to explain (empty text?)")
    if ids.is_floating_point():
        raise TypeError("input_ids must hold integer token ids")
    device = model_device(model)
    ids = ids.long().to(device)
    mask = None
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
        mask = mask.long().to(device)
        if (mask.sum(dim=1) == 0).any():
            raise EmptyInputError("a row of attention_mask has no real token (all padding)")
    return ids, mask


def select_layers(model: nn.Module, layers: int | Sequence[int] | None) -> list[tuple[str, nn.Module, Architecture]]:
    """The supported token-mixing layers of ``model``, restricted to the indices ``layers`` (negatives count from the end)."""
    found = find_layers(model)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} contains no token-mixing layer implicit_attention can decompose. "
            f"Supported model classes: {', '.join(supported_model_classes())}.")
    if layers is None:
        return found
    if isinstance(layers, int):
        layers = [layers]
    chosen = []
    for index in layers:
        if not -len(found) <= index < len(found):
            raise IndexError(f"layer index {index} out of range: the model has {len(found)} token-mixing layers")
        chosen.append(index % len(found))
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers lists a layer twice: {list(layers)}")
    return [found[i] for i in sorted(chosen)]


def layer_indices(model: nn.Module, selected: list[tuple[str, nn.Module, Architecture]]) -> list[int]:
    """Position of each selected layer among all of the model's token-mixing layers."""
    names = [name for name, _, _ in find_layers(model)]
    return [names.index(name) for name, _, _ in selected]


def _first_tensor(args, kwargs, key: str) -> torch.Tensor:
    return args[0] if args else kwargs[key]


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def call_model(model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
               inputs_embeds: torch.Tensor | None = None):
    """Run ``model`` on ids (or embeddings) and the mask, without a cache where the model has one."""
    kwargs = {"attention_mask": attention_mask}
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = input_ids
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return model(**kwargs)


@contextmanager
def capture(model: nn.Module, targets: list[tuple[str, nn.Module, Architecture]], *,
            keep_graph: bool = False, block_inputs: bool = False) -> Iterator[list[CapturedLayer]]:
    """Hooks recording each target layer's input, padding mask and pre-projection output.

    With ``keep_graph`` the outputs (and block inputs) stay attached to autograd so that
    gradients with respect to them can be taken. Hooks are removed on exit, also on error.
    """
    records = [CapturedLayer(name=name, module=module, architecture=arch) for name, module, arch in targets]
    handles = []

    def on_layer(record):
        def hook(module, args, kwargs):
            if record.inputs is not None:
                raise RuntimeError(f"layer {record.name!r} ran twice in one forward pass; shared layers are not supported")
            record.inputs = _first_tensor(args, kwargs, "hidden_states").detach()
            record.kwargs = {k: _detached(v) for k, v in kwargs.items()}
            mask = kwargs.get("attention_mask")
            record.attention_mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return hook

    def on_layer_output(record):
        def hook(module, args, kwargs, output):
            record.module_output = _detached(output)
            if record.architecture.output_module is None:
                first = output[0] if isinstance(output, (tuple, list)) else output
                record.output = first if keep_graph else first.detach()
        return hook

    def on_output(record):
        def hook(module, args):
            record.output = args[0] if keep_graph else args[0].detach()
        return hook

    def on_block(record):
        def hook(module, args, kwargs):
            tensor = _first_tensor(args, kwargs, "hidden_states")
            record.block_input = tensor if keep_graph else tensor.detach()
        return hook

    try:
        for record in records:
            arch = record.architecture
            handles.append(record.module.register_forward_pre_hook(on_layer(record), with_kwargs=True))
            handles.append(record.module.register_forward_hook(on_layer_output(record), with_kwargs=True))
            if arch.output_module is not None:
                output_module = record.module.get_submodule(arch.output_module)
                handles.append(output_module.register_forward_pre_hook(on_output(record)))
            if arch.extra_hooks is not None:
                handles.extend(arch.extra_hooks(record.module, record))
            if block_inputs:
                parent = arch.block_input(model, record.name) if arch.block_input is not None \
                    else model.get_submodule(record.name.rpartition(".")[0])
                handles.append(parent.register_forward_pre_hook(on_block(record), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()
