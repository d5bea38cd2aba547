"""``decompose``: every token-mixing layer of a model as exact implicit attention."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import CapturedLayer, LayerDecomposition
from .devices import execution_device, model_dtype, offloaded_parameters, on_device, record_on_device
from .errors import MemoryBudgetError, OffloadedLayerError, ReconstructionError
from .hooks import capture, layer_indices, select_layers
from .inputs import as_module, prepare_model_inputs
from .memory import budget_bytes, estimate
from .scans import parallel_scans

#: Default relative-error tolerance of the exactness check, by the dtype the *model* runs in.
DEFAULT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

#: Default tolerance of a float64 model's layers whose module rounds through float32 inside
#: (``Architecture.rounds_in_float32``): their float64 output is only as exact as that rounding.
FLOAT32_KERNEL_TOLERANCE = 1e-5


@dataclass
class Decomposition:
    """The result of :func:`decompose`.

    Attributes:
        layers: one :class:`~implicit_attention.architectures.LayerDecomposition` per decomposed
            token-mixing layer, in model order.
        input_values: the model input that was run: ``[B, L]`` token ids, or
            ``[B, channels, height, width]`` pixel values for image models.
        attention_mask: ``[B, L]`` or ``None``.
        logits: the model's output logits (``[B, L, V]`` for a causal LM), or ``None`` for a model
            without a head.
        variant: the formulation used.
    """

    layers: list[LayerDecomposition]
    input_values: torch.Tensor
    attention_mask: torch.Tensor | None
    logits: torch.Tensor | None
    variant: str

    @property
    def input_ids(self) -> torch.Tensor:
        """Deprecated name of :attr:`input_values` (which holds pixel values for image models)."""
        warnings.warn("Decomposition.input_ids is deprecated; use Decomposition.input_values (token ids, or "
                      "pixel values for image models)", DeprecationWarning, stacklevel=2)
        return self.input_values

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.input_values.shape))
        worst = f"{max(self.errors):.2e}" if self.layers else "n/a"
        return (f"Decomposition({len(self.layers)} layers, variant={self.variant!r}, input {shape}, "
                f"max reconstruction error {worst})")

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
        """``[layers, B, L, L]`` every layer's aggregated map stacked, on the device of :attr:`input_values`."""
        maps = []
        for layer in self.layers:
            with on_device(layer.device):
                maps.append(layer.aggregate(how).to(self.input_values.device))
        return torch.stack(maps)

    def save(self, path, *, layers: int | Sequence[int] | None = None, aggregates: Sequence[str] | None = None):
        """Save to the directory ``path``: ``meta.json`` (variant, each layer's index, name, variant, error,
        shape) and ``tensors.safetensors`` (input, mask, logits, each layer's tensors).

        ``layers``: positions in :attr:`layers` to keep (default all). ``aggregates``: ``None`` keeps the full
        per-channel matrices ``[B, C, L, L]``; e.g. ``("mean", "abs")`` keeps only those ``[B, L, L]`` maps
        (``C`` times smaller). See :mod:`implicit_attention.persistence`."""
        from .persistence import save_decomposition

        return save_decomposition(self, path, layers=layers, aggregates=aggregates)

    @classmethod
    def load(cls, path) -> Decomposition:
        """The decomposition saved at ``path`` by :meth:`save`. It holds no model and recomputes nothing:
        its layers serve what was saved (the matrices and everything read from them, or the saved
        aggregates only); the errors are those measured when it was built."""
        from .persistence import load_decomposition

        return load_decomposition(path)

    def to_bertviz(self, tokens=None, *, how: Sequence[str] | None = None, channels: Sequence[int] | None = None,
                   example: int | None = 0):
        """The layers as Hugging Face attentions for ``bertviz``: see :func:`implicit_attention.interop.to_bertviz`."""
        from .interop import to_bertviz

        return to_bertviz(self, tokens, how=how, channels=channels, example=example)


def compute_dtype_for(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """float64 for float64 models, float32 otherwise, unless ``dtype`` says."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


#: Name of the profiler range (``torch.profiler.record_function``) around the library's own work
#: after the forward pass: building the layers, and for ``explain`` combining their maps.
PHASE = "implicit_attention.decompose_layers"

#: Advice of a memory error.
_ADVICE = ("Pass fewer layers= (e.g. layers=[-1]), a smaller batch or a shorter input; smaller chunks "
           "(with implicit_attention.memory.block_bytes(n)) lower the working part.")


def estimate_memory(targets, batch: int, length: int, dtype: torch.dtype, *, method: str = "decompose",
                    home: torch.device | str | None = None) -> dict:
    """``{device: DeviceEstimate}``: what decomposing ``targets`` (and running ``method``) allocates.

    ``targets`` are ``(name, module, architecture)`` as :func:`~.hooks.select_layers` returns;
    each layer is counted on the device it computes on. See :func:`~.memory.estimate`.
    """
    layers = [(name, module, arch, execution_device(module)) for name, module, arch in targets]
    model_dtype_ = next((p.dtype for _, module, _ in targets for p in module.parameters()
                         if p.is_floating_point()), dtype)
    return estimate(layers, batch, length, dtype, model_dtype=model_dtype_, method=method, home=home)


def ensure_decomposition_fits(targets, inputs, dtype: torch.dtype, *, method: str = "decompose") -> None:
    """Raise :class:`~implicit_attention.errors.MemoryBudgetError` before running if a device would not hold it.

    ``inputs`` is the :class:`~.inputs.ModelInputs` (or anything with ``.shape`` ``(B, L)`` and
    ``.device``, the home device where maps are combined). Every device the selected layers
    compute on is checked against its own free memory (:func:`~.memory.budget_bytes`). Layers
    whose parameters were offloaded (``meta`` device) are refused first: their weights are needed.
    """
    check_parameters_present(targets)
    batch, length = inputs.shape
    per_device = estimate_memory(targets, batch, length, dtype, method=method, home=inputs.device)
    what = "decomposing" if method == "decompose" else f"the {method} explanation over"
    for device, entry in per_device.items():
        budget = budget_bytes(device)
        if entry.total > budget:
            raise MemoryBudgetError(
                f"{what} {len(targets)} layer(s) of a [B={batch}, L={length}] input in {dtype} "
                f"({entry.describe()})", entry.total, budget, _ADVICE)


def check_parameters_present(targets) -> None:
    """Refuse layers whose parameters are on the ``meta`` device (offloaded to CPU or disk by ``accelerate``).

    Their factors are recomputed from the parameters after the forward pass, when ``accelerate``
    has offloaded them again.
    """
    for name, module, _ in targets:
        missing = offloaded_parameters(module)
        if missing:
            raise OffloadedLayerError(
                f"layer {name!r} has its parameters offloaded ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''} are on the meta device): the decomposition reads the "
                "weights after the forward pass. Load the model without CPU/disk offloading (enough GPU memory "
                "or max_memory for the selected layers), select layers that stay on a GPU (layers=), or use a "
                "baseline method")


def layer_variant(arch, variant: str) -> str:
    """The variant a layer is built with: an attention layer of a hybrid (``Architecture.keeps_unified``)
    has none of the parts a recurrent variant drops (S6-only, no conv, ...), so it stays unified."""
    return variant if variant in arch.variants else "unified"


def check_variant(targets, variant: str) -> None:
    """Refuse a variant that a selected layer lacks, except attention layers of a hybrid whose
    recurrent layers offer it (they stay as they are: :func:`layer_variant`)."""
    offered = any(variant in arch.variants for _, _, arch in targets)
    for name, _, arch in targets:
        if variant not in arch.variants and not (offered and arch.keeps_unified):
            raise ValueError(f"variant {variant!r} is not offered for {arch.name} layers ({name}); "
                             f"choose one of {', '.join(arch.variants)}")


def offered_variants(targets) -> list[str]:
    """Every variant :func:`check_variant` accepts for ``targets`` (``(name, module, architecture)``
    triples), in the order the layers list them."""
    candidates = list(dict.fromkeys(v for _, _, arch in targets for v in arch.variants))
    accepted = []
    for variant in candidates:
        try:
            check_variant(targets, variant)
        except ValueError:
            continue
        accepted.append(variant)
    return accepted


def build_layers(captured: list[CapturedLayer], indices: list[int], *, variant: str, dtype: torch.dtype,
                 check: bool, tolerance: float, progress: bool | None,
                 default_tolerance: bool = False) -> list[LayerDecomposition]:
    """Decompose captured layers and measure each reconstruction error; raise if an exact one misses.

    ``default_tolerance``: ``tolerance`` is the model dtype's default, which a layer that rounds
    through float32 inside raises to :data:`FLOAT32_KERNEL_TOLERANCE` (a tolerance the caller
    gave is kept as given)."""
    layers = []
    for record, index in tqdm(list(zip(captured, indices)), desc="decomposing", unit="layer",
                              disable=(not progress) if progress is not None else True):
        if record.inputs is None or record.output is None:
            raise RuntimeError(f"layer {record.name!r} did not run during the forward pass")
        # a layer computes on its own device (several with device_map): its record goes there
        local = record_on_device(record)
        with on_device(local.inputs.device):
            layer = record.architecture.build(local, variant=layer_variant(record.architecture, variant), dtype=dtype,
                                              index=index)
            layer.measure_error()
        limit = (max(tolerance, FLOAT32_KERNEL_TOLERANCE)
                 if default_tolerance and record.architecture.rounds_in_float32 else tolerance)
        if check and layer.exact and not layer.error <= limit:
            raise ReconstructionError(layer.name, layer.error, limit)
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
            1e-2 float16, 5e-2 bfloat16), and 1e-5 for the float64 layers of modules that round
            through float32 inside (the delta-rule mixers, lightning attention).
        progress: show a progress bar over layers (default: off).

    Returns:
        A :class:`Decomposition`; ``result.layers[l].matrix`` is ``[B, C, L, L]`` and
        ``einsum("bcij,bjc->bic", matrix, values) + offset`` reproduces the layer's output before
        its output projection, to the relative error ``result.layers[l].error``.
    """
    model = as_module(model)
    inputs = prepare_model_inputs(model, input_ids, attention_mask)  # token ids or pixel_values
    ids, mask = inputs.values, inputs.attention_mask
    targets = select_layers(model, layers)
    check_variant(targets, variant)
    compute_dtype = compute_dtype_for(model, dtype)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(model_dtype(model), 1e-4)
    ensure_decomposition_fits(targets, inputs, compute_dtype)
    with torch.no_grad(), parallel_scans(model), capture(model, targets) as captured:
        outputs = inputs.call(model)
    with torch.profiler.record_function(PHASE):
        built = build_layers(captured, layer_indices(model, captured), variant=variant, dtype=compute_dtype,
                             check=check, tolerance=tol, progress=progress, default_tolerance=tolerance is None)
    return Decomposition(layers=built, input_values=ids, attention_mask=mask,
                         logits=getattr(outputs, "logits", None), variant=variant)
