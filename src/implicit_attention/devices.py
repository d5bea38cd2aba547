"""Where things compute: the devices of a model, of a layer spread by ``accelerate``, and moving records there."""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch
from torch import nn

from .architectures.registry import CapturedLayer


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device ``accelerate`` gave it, else its parameters' device.

    A model loaded with ``device_map`` has its layers on several devices; ``accelerate`` moves each
    dispatched module's inputs to its execution device when it is called.
    """
    hooks = [getattr(module, "_hf_hook", None)]
    hooks += list(getattr(hooks[0], "hooks", ()))  # a SequentialHook holds several
    for hook in hooks:
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    param = next((p for p in module.parameters() if not p.is_meta), None)
    return param.device if param is not None else torch.device("cpu")


def on_device(device: torch.device | str):
    """Make ``device`` the current CUDA device inside the context (a no-op for other devices).

    Kernels that launch on the current device (Triton's, and tensors created with a bare
    ``device="cuda"``) then run on the GPU of the layer being decomposed, not on ``cuda:0``.
    """
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def offloaded_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters that live on the ``meta`` device (offloaded by ``accelerate``)."""
    return [name for name, p in module.named_parameters() if p.is_meta]


def to_device(value, device: torch.device):
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``; tensors already there kept."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def record_on_device(record: CapturedLayer, device: torch.device | None = None) -> CapturedLayer:
    """A copy of ``record`` whose tensors sit on ``device`` (default: the layer's :func:`execution_device`).

    The forward hooks run before ``accelerate`` moves a dispatched module's arguments, so with a
    ``device_map`` that places a layer apart from its caller the captured input can sit on the
    previous device; the layer's factors are recomputed from its parameters, on its own device.
    ``output`` (kept attached to autograd for gradients) is detached in the copy; the original
    record is left as it is.
    """
    device = execution_device(record.module) if device is None else torch.device(device)
    output = None if record.output is None else to_device(record.output.detach(), device)
    return dataclasses.replace(
        record, inputs=to_device(record.inputs, device), attention_mask=to_device(record.attention_mask, device),
        output=output, block_input=None, kwargs=to_device(record.kwargs, device),
        module_output=to_device(record.module_output, device), extra=to_device(record.extra, device))


def model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's first floating parameter."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def refuses_float64_experts(model: nn.Module) -> bool:
    """Whether ``model`` runs in float64 with ``transformers``' grouped-matmul mixture-of-experts
    kernel, which some models' experts refuse in float64 (the eager experts compute the same function)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_experts_implementation", None) if config is not None else None
    return model_dtype(model) == torch.float64 and implementation == "grouped_mm"


def float64_experts_error(model: nn.Module, error: RuntimeError) -> ValueError | None:
    """The error to raise instead of ``error`` when it is the grouped-matmul experts refusing float64
    (with the fix in one line), or ``None`` for any other error."""
    if not (refuses_float64_experts(model) and "to be Float32, BFloat16 or Float16" in str(error)):
        return None
    return ValueError(f"{type(model).__name__} runs its mixture-of-experts layers with transformers' grouped_mm "
                      "kernel, which refuses float64: call model.set_experts_implementation('eager') first (the "
                      "same function in plain matmuls), or run it in float32")


def triton_without_gpu_error(model: nn.Module, error: RuntimeError) -> RuntimeError | None:
    """The error to raise instead of ``error`` when it is Triton finding no GPU driver because
    flash-linear-attention's kernels ran on a CPU (``transformers`` hands its Gated DeltaNet and Kimi
    Delta Attention layers to them whenever ``fla`` is installed), or ``None`` for any other error."""
    if "active drivers" not in str(error) or "fla" not in sys.modules:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return RuntimeError(
        f"{type(model).__name__} ran flash-linear-attention's Triton kernels on {device}, and Triton found no GPU "
        f"driver ({error}). fla's own layers (fla.layers) and, when fla is installed, transformers' Gated "
        "DeltaNet and Kimi Delta Attention layers run only through those kernels: move the model to a CUDA "
        "device, or, on a machine without a GPU, use transformers' classes in an environment without fla "
        "(pip uninstall flash-linear-attention fla-core), where they run in plain PyTorch")
