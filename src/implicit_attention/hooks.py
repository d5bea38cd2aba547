"""Choosing the token-mixing layers of a model and recording, with forward hooks, what each one saw and produced."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .architectures import CapturedLayer, find_layers
from .architectures.registry import Architecture, model_layers
from .inputs import first_tensor


def select_layers(model: nn.Module, layers: int | Sequence[int] | None) -> list[tuple[str, nn.Module, Architecture]]:
    """The supported token-mixing layers of ``model``, restricted to the indices ``layers`` (negatives count from the end)."""
    found = model_layers(model)
    if layers is None:
        return found
    if isinstance(layers, int):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError("layers=[] selects no layer: pass layers=None for every token-mixing layer, or at least "
                         f"one index (the model has {len(found)})")
    chosen = []
    for index in layers:
        if not -len(found) <= index < len(found):
            raise IndexError(f"layer index {index} out of range: the model has {len(found)} token-mixing layers")
        chosen.append(index % len(found))
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers lists a layer twice: {list(layers)}")
    return [found[i] for i in sorted(chosen)]


def layer_indices(model: nn.Module, selected) -> list[int]:
    """Position of each selected layer among all of the model's token-mixing layers.

    ``selected`` holds ``(name, module, architecture)`` triples or :class:`CapturedLayer` records;
    every call of a module run several times (``name#2``, ...) gets that module's index, so that
    ``layers=[index]`` selects it again.
    """
    names = [name for name, _, _ in find_layers(model)]
    return [names.index(base_name(item.name if isinstance(item, CapturedLayer) else item[0])) for item in selected]


def base_name(name: str) -> str:
    """``"model.layers.5.self_attn#2"`` -> ``"model.layers.5.self_attn"`` (the module of a repeated call)."""
    return name.split("#", 1)[0]


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


class CapturedLayers(list):
    """The :class:`CapturedLayer` records of :func:`capture`, in call order; :meth:`stop` ends the recording."""

    recording = True

    def stop(self) -> None:
        """Record nothing more: the forward has run. A backward that recomputes blocks (checkpointing,
        :func:`implicit_attention.scans.parallel_scans`) calls the hooked modules again, and those calls
        must not count as new calls."""
        self.recording = False


@contextmanager
def capture(model: nn.Module, targets: list[tuple[str, nn.Module, Architecture]], *,
            keep_graph: bool = False, block_inputs: bool = False) -> Iterator[list[CapturedLayer]]:
    """Hooks recording each target layer's input, padding mask and pre-projection output.

    With ``keep_graph`` the outputs (and block inputs) stay attached to autograd so that
    gradients with respect to them can be taken. Hooks are removed on exit, also on error.

    A module called ``k`` times in one forward (a shared block, as in Zamba) yields ``k`` records
    named ``name``, ``name#2``, ..., each with its own inputs and outputs. The yielded list is
    kept in call order while the forward runs; records of layers that did not run stay at its end.
    Calls after its :meth:`~CapturedLayers.stop` are not recorded.
    """
    records = CapturedLayers(CapturedLayer(name=name, module=module, architecture=arch)
                             for name, module, arch in targets)
    handles = []
    called = [0]  # how many calls have started: records[:called] are in call order

    def place(record):
        """Move ``record`` to the next call-order slot of ``records``."""
        position = next(i for i, r in enumerate(records) if r is record)
        records.insert(called[0], records.pop(position))
        called[0] += 1

    def on_layer(record, calls, pending):
        def hook(module, args, kwargs):
            if not records.recording:
                return
            if record.inputs is not None:
                # repeated call: freeze the previous call in a copy; the hooked record starts afresh
                finished = dataclasses.replace(record)
                records[next(i for i, r in enumerate(records) if r is record)] = finished
                records.insert(called[0], record)
                calls[0] += 1
                record.name = f"{base_name(record.name)}#{calls[0]}"
                record.output = record.module_output = record.attention_mask = None
                record.kwargs, record.extra = {}, {}
            record.block_input = pending.pop("block_input", None)
            if calls[0] == 1:
                place(record)
            else:
                called[0] += 1
            record.inputs = first_tensor(args, kwargs, "hidden_states").detach()
            record.kwargs = {k: _detached(v) for k, v in kwargs.items()}
            mask = kwargs.get("attention_mask")
            record.attention_mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return hook

    def on_layer_output(record):
        def hook(module, args, kwargs, output):
            if not records.recording:
                return
            record.module_output = _detached(output)
            if record.architecture.output_module is None:
                first = output[0] if isinstance(output, (tuple, list)) else output
                record.output = first if keep_graph else first.detach()
        return hook

    def on_output(record):
        def hook(module, args):
            if records.recording:
                record.output = args[0] if keep_graph else args[0].detach()
        return hook

    def on_block(pending):
        # the block runs before the layer inside it: keep the tensor until the layer's call starts
        def hook(module, args, kwargs):
            if not records.recording:
                return
            tensor = first_tensor(args, kwargs, "hidden_states")
            pending["block_input"] = tensor if keep_graph else tensor.detach()
        return hook

    try:
        for record in records:
            arch = record.architecture
            calls, pending = [1], {}
            handles.append(record.module.register_forward_pre_hook(on_layer(record, calls, pending), with_kwargs=True))
            handles.append(record.module.register_forward_hook(on_layer_output(record), with_kwargs=True))
            if arch.output_module is not None:
                output_module = record.module.get_submodule(arch.output_module)
                handles.append(output_module.register_forward_pre_hook(on_output(record)))
            if arch.extra_hooks is not None:
                handles.extend(arch.extra_hooks(record.module, record))
            if block_inputs:
                parent = arch.block_input(model, record.name) if arch.block_input is not None \
                    else model.get_submodule(record.name.rpartition(".")[0])
                handles.append(parent.register_forward_pre_hook(on_block(pending), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()
