"""Memory estimates: check that a computation fits before allocating anything.

Two levels:

- :func:`ensure_fits` guards one allocation (``LayerDecomposition.matrix`` checks its
  ``[B, C, L, L]`` tensor with it).
- :func:`estimate` bounds what a whole :func:`~implicit_attention.decompose` or
  :func:`~implicit_attention.explain` call allocates on each device, from the selected layers
  and the input's shape alone (before the forward pass); ``decomposition.ensure_decomposition_fits``
  raises :class:`~implicit_attention.errors.MemoryBudgetError` with advice when a device would
  not hold it.

What :func:`estimate` counts, per device (``B`` batch, ``L`` tokens, ``C`` a layer's operator
channels, ``s`` the bytes of the compute dtype; a *vector* is ``B * L * C * s`` bytes, a *map*
``B * L * L * s``):

1. **captured**, per layer: what the forward hooks keep until the layer is built (its input and
   output, in the model's dtype; the attention weights an eager attention module returns), plus
   one map for the padding mask the layers receive. Gradient methods add each layer's gradient.
2. **kept**, per layer: the decomposition itself (:attr:`LayerFootprint.vectors` vectors of
   factors, values, offset and output; :attr:`LayerFootprint.maps` maps for architectures that keep
   per-head matrices).
3. **working**, the largest over the device's layers, since layers are built and read one at a
   time: building a layer (its factors, :attr:`LayerFootprint.build_vectors` vectors and
   :attr:`LayerFootprint.build_maps` maps, and the exactness check), then the path the method
   takes: channel blocks (aggregates without a fast path, attribution, the reconstruction;
   chunked to at most :func:`default_block_bytes` per temporary), the fast paths (factorised
   aggregates, rows for ``raw`` and ``paper``; :attr:`LayerFootprint.path_vectors` vectors and
   :attr:`LayerFootprint.path_maps` maps), and attention layers' per-head recomputation (chunks of
   heads within the same block bytes). Chunked temporaries are counted at twice the bytes they
   were sized for, since a step holds a few temporaries beside its block. The estimate does not
   depend on the channel aggregation: the exactness check builds channel blocks in any case.
4. **combining**, on the home device (the inputs' device) only: the maps being combined (one at a
   time, see :func:`~implicit_attention.explanations.layer_maps`) and the rule's accumulators.

Not counted: the model's parameters and the activations of its own forward pass (and, for the
gradient methods ``attribution`` and ``paper``, its backward pass), which running the model at
all takes; they are freed before the layers are built. The budget is :data:`USABLE_FRACTION` of
the memory available, leaving room for them. ``tests/test_memory.py`` measures the peak
allocations of each path on the CPU and checks that the estimate bounds them.

An architecture whose layers keep more than the generic :class:`LayerFootprint` declares its own
in its registration (``Architecture(..., footprint=...)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import MemoryBudgetError, format_bytes

#: Share of the available memory an estimate may use; the rest is head-room for the model itself,
#: autograd and the allocator.
USABLE_FRACTION = 0.6
# Per-channel blocks are computed in chunks of at most this many bytes (per temporary).
DEFAULT_BLOCK_BYTES = 256 * 2**20
#: Temporaries of a chunked step relative to the bytes its chunk was sized for (see the module doc).
CHUNK_SAFETY = 2
#: Above this many matrix entries (``B * C * L * L``) the exactness check samples channels: checking every
#: channel builds every per-channel block, which costs more than the explanation itself on long inputs.
FULL_CHECK_ENTRIES = 2 ** 22
#: How many channels a sampled exactness check covers, in :data:`SAMPLED_GROUPS` contiguous groups
#: spread over the width.
SAMPLED_CHANNELS = 32
SAMPLED_GROUPS = 4
#: Where an architecture reads rows of every channel's matrix cheaply (``O(R L C N)``, Mamba), the sampled
#: check covers every channel on this many rows spread over the input instead (the last row, the one an
#: explanation of the next token reads, always among them).
SAMPLED_ROWS = 8
#: What one entry of such a row costs against one entry of a channel's block (exponentials against matrix
#: products; measured on a CPU for Mamba): the rows are checked where they cost less than the channels,
#: ``ROW_ENTRY_COST * SAMPLED_ROWS * C <= SAMPLED_CHANNELS * L``.
ROW_ENTRY_COST = 4
#: Above this many bytes ``LayerDecomposition.matrix`` refuses to allocate ``[B, C, L, L]``
#: (``full_matrix()`` allocates whatever fits; the aggregates and ``blocks()`` never need it).
MATRIX_PROPERTY_BYTES = 2**30

# The size set by :func:`block_bytes` in this context (a context variable: concurrent calls in
# other threads or tasks keep their own).
_block_bytes_override: contextvars.ContextVar[int | None] = contextvars.ContextVar("block_bytes", default=None)


#: Block bytes on a CPU: blocks that stay near the caches are several times faster there than
#: blocks sized from the free memory (attribution of a 4-layer RetNet at L = 256: 0.5 s vs 2.5 s;
#: 32 MiB was the fastest or near it for every architecture measured).
CPU_BLOCK_BYTES = 32 * 2**20


def default_block_bytes(device: torch.device | str) -> int:
    """Bytes per block-sized temporary: on a GPU 5% of the free memory, between 64 MiB and 2 GiB;
    on a CPU :data:`CPU_BLOCK_BYTES`.

    Inside :func:`block_bytes` the given size instead.
    """
    override = _block_bytes_override.get()
    if override is not None:
        return override
    if torch.device(device).type == "cpu":
        return int(min(CPU_BLOCK_BYTES, max(2**20, 0.05 * available_bytes(device))))
    return int(min(2 * 2**30, max(64 * 2**20, 0.05 * available_bytes(device))))


@contextlib.contextmanager
def block_bytes(size: int) -> Iterator[None]:
    """Size the chunks of layers decomposed inside the context for ``size`` bytes per temporary.

    Smaller chunks lower the working memory (and make the computation slower); layers keep the
    size they were built with. The setting is a context variable: other threads and asyncio tasks
    are not affected.
    """
    if size < 1:
        raise ValueError(f"block bytes must be positive, got {size}")
    token = _block_bytes_override.set(int(size))
    try:
        yield
    finally:
        _block_bytes_override.reset(token)


def available_bytes(device: torch.device | str) -> int:
    """Bytes that can still be allocated on ``device``: on a GPU the driver's free memory plus what
    PyTorch's caching allocator holds unused (reserved but not allocated: it reuses those blocks, and
    frees them to retry an allocation that fails), else the available host RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def budget_bytes(device: torch.device | str) -> int:
    """What an estimate may use on ``device``: :data:`USABLE_FRACTION` of :func:`available_bytes`."""
    return int(available_bytes(device) * USABLE_FRACTION)


def ensure_fits(what: str, needed_bytes: int, device: torch.device | str, advice: str) -> None:
    """Raise :class:`MemoryBudgetError` if ``needed_bytes`` exceeds the usable memory of ``device``."""
    budget = budget_bytes(device)
    if needed_bytes > budget:
        raise MemoryBudgetError(what, needed_bytes, budget, advice)


def channels_per_block(batch: int, length: int, channels: int, itemsize: int,
                       temporaries: int = 4, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """How many channels of ``[batch, c, L, L]`` blocks to compute at once within ``block_bytes``.

    ``temporaries`` is how many block-sized tensors the computation holds at its peak.
    """
    per_channel = batch * length * length * itemsize * temporaries
    return max(1, min(channels, block_bytes // max(per_channel, 1)))


# ------------------------------------------------------------------------------ footprints
def heads(module) -> int:
    """Number of (query) heads of an attention-like module, read from its attributes or config."""
    for owner in (module, getattr(module, "config", None)):
        for name in ("num_heads", "num_attention_heads", "n_head", "n_heads", "n_mamba_heads"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return 1


def _input_width(module, channels: int) -> int:
    """Width of a layer's input hidden states (the model's ``hidden_size``), at least ``channels``."""
    for owner in (getattr(module, "config", None), module):
        value = getattr(owner, "hidden_size", None)
        if isinstance(value, int) and value > 0:
            return max(value, channels)
    return channels


def _eager(module) -> bool:
    """Whether an attention module runs the eager path (which returns its ``[B, H, L, L]`` weights)."""
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", "eager") in (None, "eager")


@dataclass(frozen=True)
class LayerFootprint:
    """The memory one decomposed layer of an architecture takes, in units :func:`estimate` scales.

    A vector is ``[B, L, C]`` (``C`` the layer's operator channels), a map ``[B, L, L]``, both in
    the compute dtype. Each count is a number or a function of the layer module.

    Attributes:
        vectors: vectors the decomposition keeps (values, offset, output, its factors).
        maps: maps it keeps (per-head probabilities or decays: ``H`` for RWKV-6, xLSTM, ...).
        build_vectors: vector-sized temporaries while its factors are computed (a chunked scan of
            chunk ``T`` takes ``T`` vectors per temporary).
        build_maps: map-sized temporaries while it is built (per-head matrices and their steps).
        units: how many pieces its chunked loops split into (channels, or heads where the
            channels of a head share one matrix); ``None``: the channels.
        path_vectors: vector-sized temporaries of its fast paths (rows for ``raw`` and ``paper``,
            the factorised signed mean).
        path_maps: map-sized temporaries of its aggregates and attribution beyond the chunked
            loops (accumulators, per-head sums).
        captured_maps: maps (in the model's dtype) the forward hooks capture from the module's
            return value (an eager attention module's weights).
        cuda_path_bytes: fixed bytes of a fast path that runs on CUDA only (fused kernels).
        fast_rows: whether the decomposition reads rows of every channel's matrix cheaply (its exactness
            check on long inputs then checks rows, ``[B, C, L]`` at a time, instead of groups of
            channels' blocks).
    """

    vectors: int | Callable = 12
    maps: int | Callable = 0
    build_vectors: int | Callable = 24
    build_maps: int | Callable = 2
    units: int | Callable | None = None
    path_vectors: int | Callable = 24
    path_maps: int | Callable = 4
    captured_maps: int | Callable = 0
    cuda_path_bytes: int = 0
    fast_rows: bool = False

    def count(self, name: str, module) -> int:
        value = getattr(self, name)
        return int(value(module) if callable(value) else value)


#: Used for an architecture that declares no footprint.
GENERIC_FOOTPRINT = LayerFootprint()


def per_head(extra: int = 0, factor: int = 1) -> Callable:
    """A footprint count of ``factor`` per (query) head of the module plus ``extra``."""
    return lambda module: factor * heads(module) + extra


def eager_weights(module) -> int:
    """Maps an attention module returns (its ``[B, H, L, L]`` weights) when it runs the eager path."""
    return heads(module) if _eager(module) else 0


# -------------------------------------------------------------------------------- estimate
@dataclass
class DeviceEstimate:
    """Bytes an estimated call allocates on one device, by part (see the module doc)."""

    device: torch.device
    captured: int = 0
    kept: int = 0
    working: int = 0
    combining: int = 0
    layers: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.captured + self.kept + self.working + self.combining

    def describe(self) -> str:
        return (f"{format_bytes(self.total)} on {self.device} ({len(self.layers)} layer(s): "
                f"{format_bytes(self.captured)} captured, {format_bytes(self.kept)} kept, "
                f"{format_bytes(self.working)} working, {format_bytes(self.combining)} combining maps)")


#: Map-sized accumulators each method's combination holds on the home device (the map being
#: combined, the product, normalisation temporaries).
_COMBINING_MAPS = {"decompose": 0, "raw": 1, "rollout": 6, "attribution": 5, "paper": 6}


def estimate(layers: Sequence[tuple[str, object, object, torch.device]], batch: int, length: int,
             dtype: torch.dtype, *, model_dtype: torch.dtype | None = None, method: str = "decompose",
             home: torch.device | str | None = None) -> dict[torch.device, DeviceEstimate]:
    """Bytes a call allocates on each device, from the selected layers and the input shape alone.

    Args:
        layers: ``(name, module, architecture, device)`` of each selected layer, ``device`` the one
            it computes on (:func:`~implicit_attention.devices.execution_device`).
        batch, length: ``B`` and ``L`` of the input.
        dtype: the compute dtype; ``model_dtype`` the model's (default: the same).
        method: ``"decompose"`` or a matrix method of :func:`~implicit_attention.explain`.
        home: where the maps are combined (the inputs' device; default the first layer's).

    Returns:
        ``{device: DeviceEstimate}`` for every device involved.
    """
    if method not in _COMBINING_MAPS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(_COMBINING_MAPS)}")
    s = dtype.itemsize
    sm = (model_dtype or dtype).itemsize
    home = torch.device(home) if home is not None else (layers[0][3] if layers else torch.device("cpu"))
    per_device: dict[torch.device, DeviceEstimate] = {}
    square = batch * length * length
    for name, module, arch, device in layers:
        entry = per_device.setdefault(torch.device(device), DeviceEstimate(torch.device(device)))
        if not entry.layers:
            entry.captured += square * max(sm, 4)            # the padding mask the layers receive
        entry.layers.append(name)
        fp = arch.footprint or GENERIC_FOOTPRINT
        channels = arch.channels(module)
        vector, grid = batch * length * channels, square
        width = _input_width(module, channels)
        entry.captured += (batch * length * width + vector) * sm + fp.count("captured_maps", module) * grid * sm
        if method in ("attribution", "paper"):
            entry.captured += vector * sm                    # the gradient at the layer
        entry.kept += fp.count("vectors", module) * vector * s + fp.count("maps", module) * grid * s
        entry.working = max(entry.working, _working(fp, module, channels, batch, length, s, device, method))
    entry = per_device.setdefault(home, DeviceEstimate(home))
    entry.combining += _COMBINING_MAPS[method] * square * s
    return per_device


def _chunked(units: int, per_unit: int, block: int) -> int:
    """Bytes of a loop over ``units`` in chunks of whole units within ``block`` bytes (one unit at least)."""
    return max(per_unit, min(block, units * per_unit))


#: Block-sized temporaries a chunk is sized for (the largest ``block_temporaries`` of the layers).
_BLOCK_TEMPORARIES = 5


def _working(fp: LayerFootprint, module, channels: int, batch: int, length: int, s: int, device,
             method: str) -> int:
    """Transient bytes of building one layer and running ``method``'s path on it (see the module doc)."""
    vector, grid = batch * length * channels * s, batch * length * length * s
    units = channels if fp.units is None else fp.count("units", module)
    block = default_block_bytes(device)
    # chunked loops (blocks of channels, chunks of heads): sized for ``block`` with the declared
    # temporaries; the steps around them hold up to as many again (CHUNK_SAFETY)
    chunks = CHUNK_SAFETY * _chunked(units, _BLOCK_TEMPORARIES * grid, block)
    rows_checked = fp.fast_rows and ROW_ENTRY_COST * SAMPLED_ROWS * channels <= SAMPLED_CHANNELS * length
    if fp.units is None and batch * channels * length * length > FULL_CHECK_ENTRIES and not rows_checked:
        # the sampled exactness check builds groups of channels whatever the block size (the rows check,
        # where it serves, holds one row of every channel at a time: within the vectors below)
        chunks = max(chunks, CHUNK_SAFETY * (SAMPLED_CHANNELS // SAMPLED_GROUPS) * _BLOCK_TEMPORARIES * grid)
    build = fp.count("build_vectors", module) * vector + fp.count("build_maps", module) * grid + chunks
    if method == "decompose":
        return build
    path = chunks + fp.count("path_maps", module) * grid + fp.count("path_vectors", module) * vector
    if torch.device(device).type == "cuda":
        path += fp.cuda_path_bytes
    return max(build, path)
