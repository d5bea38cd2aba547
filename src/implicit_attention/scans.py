"""The model's own scans, run in parallel while the library runs the model.

Without the CUDA kernels (``mamba_ssm``), ``transformers``' Mamba mixers run their selective scan
token by token in Python, and its backward runs through the loop (on this project's 2-core CPU, the
bundled model at 512 tokens: forward and backward 3.0 s token by token, 0.15 s with the parallel scan;
``benchmarks/bench_scans.py``). The mixers already offer ``mambapy``'s parallel scan
(``use_mambapy``, PyPI ``mambapy``, a dependency of this package), which computes the same states
(to float32 rounding; every decomposition's reconstruction check still compares against what the
model computed). :func:`parallel_scans` switches it on, for float32 mixers (``transformers``' mambapy path
mixes float32 states with the model's dtype, which fails in bfloat16 and float16, and a float64 model
is run as configured), for the duration of a call and restores each
module's own setting afterwards: the user's model is left as it was, nothing is patched globally.
Where the CUDA kernels are installed, the mixers use them whatever the flag says.

The parallel scan keeps every layer's ``[B, L, E, N]`` states for the backward (about four copies:
137 GiB for a 24-layer Mamba-130M shape at 16k tokens). Given the input's shape, :func:`parallel_scans`
also recomputes each block in the backward (``torch.utils.checkpoint``, non-reentrant) when those states
would not fit in half the device's free memory: then one block's states live at a time, for the cost
of a second forward. Forward hooks inside a block fire again during that recomputation: a caller
that records with hooks stops recording once its forward has run
(:meth:`implicit_attention.hooks.CapturedLayers.stop`).

Set :data:`ENABLED` to ``False`` to run the modules exactly as configured.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .memory import available_bytes

#: Whether :func:`parallel_scans` switches the parallel scan on (``False``: the modules as configured).
ENABLED = True


def mambapy_available() -> bool:
    return importlib.util.find_spec("mambapy") is not None


def _float32(module: nn.Module) -> bool:
    # transformers' mambapy path multiplies float32 states by the model-dtype C: only float32 models agree
    parameter = next(module.parameters(), None)
    return parameter is not None and parameter.dtype == torch.float32


#: Copies of a mixer's ``[B, L, E, N]`` states that the parallel scan keeps for the backward (measured:
#: 136.6 GiB for 24 layers of E = 1536, N = 16 at L = 16,384, 3.7 copies).
STATE_COPIES = 4

#: Share of the device's free memory the kept states may take before blocks are recomputed instead.
RECOMPUTE_ABOVE = 0.5


def kept_state_bytes(mixers: list[nn.Module], batch: int, length: int) -> int:
    """Bytes the parallel scans of ``mixers`` keep for the backward on a ``[batch, length]`` input (float32)."""
    total = 0
    for mixer in mixers:
        channels = getattr(mixer, "intermediate_size", None)
        state = getattr(mixer, "ssm_state_size", None)
        if isinstance(channels, int) and isinstance(state, int):
            total += STATE_COPIES * batch * length * channels * state * 4
    return total


logger = logging.getLogger(__name__)
#: Model classes already told that their blocks are recomputed (said once per process).
_TOLD: set[type] = set()

_CACHES = ("cache", "cache_params", "past_key_values", "layer_past")


def _recompute_in_backward(block: nn.Module) -> None:
    """Shadow ``block.forward`` (on the instance; an ``accelerate`` hook's forward is kept inside, and put
    back by :func:`_restore`) by one that checkpoints it when gradients are on."""
    original = block.forward
    if "forward" in vars(block):
        block._ia_forward_before_recompute = vars(block)["forward"]

    def forward(*args, **kwargs):
        # a cache the forward fills would be filled again by the recomputation, which then differs
        if not torch.is_grad_enabled() or any(kwargs.get(key) is not None for key in _CACHES):
            return original(*args, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    forward._ia_recompute = True     # not shadowed twice
    block.forward = forward


def _restore(block: nn.Module) -> None:
    """Undo :func:`_recompute_in_backward`: the class's forward again, or the instance's own from before."""
    vars(block).pop("forward", None)
    before = vars(block).pop("_ia_forward_before_recompute", None)
    if before is not None:
        block.forward = before


def _recomputable(block: nn.Module) -> bool:
    """Whether ``block`` runs its class's forward, or ``accelerate``'s hook around it (``device_map`` and
    offloaded models: the hook moves the inputs, and loads offloaded weights, again when recomputed); a
    forward of the user's own on the instance is left alone."""
    own = vars(block).get("forward")
    return own is None or (getattr(block, "_hf_hook", None) is not None and not getattr(own, "_ia_recompute", False))


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


@contextmanager
def parallel_scans(model: nn.Module, shape: tuple[int, int] | None = None,
                   recompute: bool | None = None) -> Iterator[list[str]]:
    """Run ``model``'s Mamba mixers with ``mambapy``'s parallel scan inside the ``with`` block.

    With the input's ``shape`` ``(batch, length)`` and ``recompute=None``, the block around each
    switched mixer is recomputed in the backward when the states the scans keep
    (:func:`kept_state_bytes`) would exceed :data:`RECOMPUTE_ABOVE` of the device's free memory;
    ``recompute=True`` / ``False`` forces it on / off. Yields the names of the modules switched (none
    when :data:`ENABLED` is off or ``mambapy`` is not installed); each module's ``use_mambapy`` and
    each block's ``forward`` are restored on exit, also on error.
    """
    switched: list[tuple[str, nn.Module, bool]] = []
    if ENABLED and mambapy_available():
        for name, module in model.named_modules():
            if isinstance(getattr(module, "use_mambapy", None), bool) and not module.use_mambapy \
                    and _float32(module):
                switched.append((name, module, module.use_mambapy))
                module.use_mambapy = True
    if recompute is None and shape is not None and switched:
        kept = kept_state_bytes([module for _, module, _ in switched], *shape)
        free = available_bytes(next(switched[0][1].parameters()).device)
        recompute = kept > RECOMPUTE_ABOVE * free
        if recompute and type(model) not in _TOLD:
            _TOLD.add(type(model))
            logger.warning("%s: recomputing each Mamba block in the backward, as the parallel scans would keep "
                           "%.1f GiB of states for a %d x %d input (%.1f GiB free): slower, in far less memory; "
                           "said once per model class", type(model).__name__, kept / 2**30, *shape, free / 2**30)
    blocks = [_parent(model, name) for name, _, _ in switched if "." in name] if recompute else []
    shadowed = list({id(block): block for block in blocks if _recomputable(block)}.values())   # each once
    try:
        for block in shadowed:
            _recompute_in_backward(block)
        yield [name for name, _, _ in switched]
    finally:
        for block in shadowed:
            _restore(block)
        for _, module, before in switched:
            module.use_mambapy = before
