"""``decompose``: every token-mixing layer of a model as exact implicit attention."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import CapturedLayer, LayerDecomposition
from .capture import call_model, capture, layer_indices, model_dtype, prepare_inputs, select_layers
from .capture import prepare_model_inputs
from .errors import ReconstructionError
from .memory import DEFAULT_BLOCK_BYTES, ensure_fits

#: Default relative-error tolerance of the exactness check, by the dtype the *model* runs in.
DEFAULT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


@dataclass
class Decomposition:
    """The result of :func:`decompose`.

    Attributes:
        layers: one :class:`~implicit_attention.architectures.LayerDecomposition` per decomposed
            token-mixing layer, in model order.
        input_ids: ``[B, L]`` the ids that were run (``[B, channels, height, width]`` pixels for image models).
        attention_mask: ``[B, L]`` or ``None``.
        logits: the model's output logits (``[B, L, V]`` for a causal LM), or ``None`` for a model
            without a head.
        variant: the formulation used.
    """

    layers: list[LayerDecomposition]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    logits: torch.Tensor | None
    variant: str
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerDecomposition]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> LayerDecomposition:
        return self.layers[i]

    @property
    def errors(self) -> list[float]:
        """Measured relative reconstruction error of each layer."""
        return [layer.error for layer in self.layers]

    def aggregate(self, how: str = "mean") -> torch.Tensor:
        """``[layers, B, L, L]`` every layer's aggregated map stacked."""
        return torch.stack([layer.aggregate(how) for layer in self.layers])


def compute_dtype_for(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """float64 for float64 models, float32 otherwise, unless ``dtype`` says."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


#: Tensors of ``[B, L, C]`` each decomposed layer keeps (values, offset, output and the factors).
_PER_LAYER_TENSORS = 10
#: Block-sized temporaries at the peak of a block computation.
_BLOCK_TEMPORARIES = 5


def estimate_bytes(targets, batch: int, length: int, itemsize: int) -> int:
    """Bytes :func:`decompose` holds: every kept layer's ``[B, L, C]`` tensors plus one channel block."""
    channels = [arch.channels(module) for _, module, arch in targets]
    kept = sum(_PER_LAYER_TENSORS * batch * length * c * itemsize for c in channels)
    one_channel_block = _BLOCK_TEMPORARIES * batch * length * length * itemsize
    return kept + max(one_channel_block, min(DEFAULT_BLOCK_BYTES, one_channel_block * max(channels, default=1)))


def ensure_decomposition_fits(targets, ids: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise :class:`~implicit_attention.errors.MemoryBudgetError` before running if it would not fit."""
    batch, length = ids.shape
    ensure_fits(f"decomposing {len(targets)} layer(s) of a [B={batch}, L={length}] input",
                estimate_bytes(targets, batch, length, dtype.itemsize), ids.device,
                "Pass fewer layers= (e.g. layers=[-1]), a smaller batch, a shorter input, or dtype=torch.float32.")


def check_variant(targets, variant: str) -> None:
    for name, _, arch in targets:
        if variant not in arch.variants:
            raise ValueError(f"variant {variant!r} is not offered for {arch.name} layers ({name}); "
                             f"choose one of {arch.variants}")


def build_layers(captured: list[CapturedLayer], indices: list[int], *, variant: str, dtype: torch.dtype,
                 check: bool, tolerance: float, progress: bool | None) -> list[LayerDecomposition]:
    """Decompose captured layers and measure each reconstruction error; raise if an exact one misses."""
    layers = []
    for record, index in tqdm(list(zip(captured, indices)), desc="decomposing", unit="layer",
                              disable=(not progress) if progress is not None else True):
        if record.inputs is None or record.output is None:
            raise RuntimeError(f"layer {record.name!r} did not run during the forward pass")
        layer = record.architecture.build(record, variant=variant, dtype=dtype, index=index)
        layer.measure_error()
        if check and layer.exact and not layer.error <= tolerance:
            raise ReconstructionError(layer.name, layer.error, tolerance)
        layers.append(layer)
    return layers


def decompose(model: nn.Module, input_ids, attention_mask=None, *, variant: str = "unified",
              layers: int | Sequence[int] | None = None, dtype: torch.dtype | None = None,
              check: bool = True, tolerance: float | None = None,
              progress: bool | None = None) -> Decomposition:
    """Rewrite every token-mixing layer of ``model`` as an exact, data-controlled attention operator.

    Args:
        model: a supported Hugging Face model (``MambaForCausalLM``, ``MambaModel``,
            ``FalconMambaForCausalLM``, ...), used as loaded, never modified.
        input_ids: ``[B, L]`` or ``[L]`` token ids (pad causal models on the left, encoders such as
            BERT on the right), or ``pixel_values`` ``[B, channels, height, width]`` for image models.
        attention_mask: ``[B, L]`` 1 for real tokens, 0 for padding.
        variant: ``"unified"`` (exact, the default), or an ablation: ``"s6"`` (the predecessor's
            S6-only hidden attention), ``"no_conv"``, ``"no_gate"``, ``"no_act"``.
        layers: indices among the model's token-mixing layers (negatives count from the end);
            default all. Memory grows with the number of layers kept.
        dtype: compute dtype, ``torch.float32`` or ``torch.float64``; default float64 for float64
            models and float32 otherwise.
        check: raise :class:`~implicit_attention.errors.ReconstructionError` when an exact
            variant misses the module's output by more than ``tolerance``.
        tolerance: relative error allowed; default by model dtype (1e-6 float64, 1e-4 float32,
            1e-2 float16, 5e-2 bfloat16).
        progress: show a progress bar over layers (default: off).

    Returns:
        A :class:`Decomposition`; ``result.layers[l].matrix`` is ``[B, C, L, L]`` and
        ``einsum("bcij,bjc->bic", matrix, values) + offset`` reproduces the layer's output before
        its output projection, to the relative error ``result.layers[l].error``.
    """
    inputs = prepare_model_inputs(model, input_ids, attention_mask)  # token ids or pixel_values
    ids, mask = inputs.values, inputs.attention_mask
    targets = select_layers(model, layers)
    check_variant(targets, variant)
    compute_dtype = compute_dtype_for(model, dtype)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(model_dtype(model), 1e-4)
    ensure_decomposition_fits(targets, inputs, compute_dtype)
    with torch.no_grad(), capture(model, targets) as captured:
        outputs = inputs.call(model)
    built = build_layers(captured, layer_indices(model, captured), variant=variant, dtype=compute_dtype,
                         check=check, tolerance=tol, progress=progress)
    return Decomposition(layers=built, input_ids=ids, attention_mask=mask,
                         logits=getattr(outputs, "logits", None), variant=variant)
