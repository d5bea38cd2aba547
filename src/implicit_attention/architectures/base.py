"""The object every architecture returns: one token-mixing layer as an implicit attention operator.

Glossary of dimension letters used in shapes throughout the package:

- ``B`` batch, ``L`` sequence length (tokens), ``C`` channels of the operator (the inner width
  ``E`` for Mamba), ``N`` state size, ``K`` conv kernel width.

A :class:`LayerDecomposition` states the identity

    ``out[b, i, c] = sum_j matrix[b, c, i, j] * values[b, j, c] + offset[b, i, c]``

where ``out`` is the layer's token-mixing output before its output projection, as computed by the
real module during the forward pass. The per-channel matrices ``[B, C, L, L]`` are computed on
demand, in blocks of channels, so that aggregates, reconstructions and attributions never hold
the whole ``[B, C, L, L]`` tensor unless the caller asks for :attr:`LayerDecomposition.matrix`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Literal

import torch

from .. import memory
from ..catalog import AGGREGATES
from ..errors import MemoryBudgetError, format_bytes
from ..memory import (
    FULL_CHECK_ENTRIES,
    ROW_ENTRY_COST,
    SAMPLED_CHANNELS,
    SAMPLED_GROUPS,
    SAMPLED_ROWS,
    channels_per_block,
    default_block_bytes,
    ensure_fits,
)

Aggregate = Literal["mean", "abs", "pos"]


class LayerDecomposition(ABC):
    """One token-mixing layer written as per-channel implicit attention.

    Attributes:
        index: position of the layer among the model's token-mixing layers (model order).
        name: module path of the layer inside the model (``"backbone.layers.3.mixer"``).
        variant: which formulation built :attr:`matrix` (``"unified"``, ``"s6"``, ...).
        exact: whether this variant is an exact identity of the layer. Ablation variants leave a
            factor out on purpose; their :attr:`error` measures how much of the layer they miss.
        values: ``[B, L, C]`` the value stream multiplied by the matrices.
        offset: ``[B, L, C]`` the part of the output that multiplies no value (biases).
        output: ``[B, L, C]`` the real module's output before its output projection.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
        error: relative error ``||reconstruct() - output|| / ||output||`` (Frobenius norm over
            the whole layer), measured when the decomposition is built.
        fold: ``[C]`` or ``None``. A layer whose token mixing needs two value streams per output
            channel (RWKV-4's value-path token shift) has more operator channels than output
            channels; operator channel ``k`` adds into output channel ``fold[k]``, so the identity
            is ``out[..., c] = sum_{k: fold[k] = c} (einsum(matrix, values) + offset)[..., k]``.
        projection: ``[C_out, C]`` or ``None``. A module that applies its output projection inside a
            fused kernel (fla's HGRN2: norm and projection in one call, no submodule whose input is
            the operator's output) is captured at its own output ``[B, L, C_out]``; the identity is
            then ``output = (einsum(matrix, values) + offset) @ projection^T``, and the gradient at
            that output reaches the matrices through the projection (:meth:`attribution`).
    """

    #: how many block-sized temporaries :meth:`_block` holds at its peak (for chunk sizing).
    block_temporaries: int = 4

    def __init__(self, *, index: int, name: str, variant: str, exact: bool,
                 values: torch.Tensor, offset: torch.Tensor | None, output: torch.Tensor,
                 mask: torch.Tensor, block_bytes: int | None = None, fold: torch.Tensor | None = None,
                 projection: torch.Tensor | None = None):
        self.index = index
        self.name = name
        self.variant = variant
        self.exact = exact
        self.values = values
        self.output = output
        self.mask = mask
        # operator channel k feeds output channel fold[k] (None: one to one); see the class docstring
        self.fold = fold
        # the module's output is the operator's output times projection^T (None: the operator's output)
        self.projection = projection
        # chunk sizes follow the memory free on the device unless the caller fixes them
        self.block_bytes = block_bytes if block_bytes is not None else default_block_bytes(values.device)
        self._offset = offset
        self._matrix: torch.Tensor | None = None
        self._aggregates: dict[str, torch.Tensor] = {}
        self.error: float = float("nan")
        self.error_channels: int = 0
        # rows the exactness check covered (None: every row)
        self.error_rows: int | None = None

    # ------------------------------------------------------------------ shapes
    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def length(self) -> int:
        return self.values.shape[1]

    @property
    def channels(self) -> int:
        return self.values.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(index={self.index}, name={self.name!r}, variant={self.variant!r}, "
                f"shape=[{self.batch_size}, {self.channels}, {self.length}, {self.length}], "
                f"error={self.error:.2e})")

    # ------------------------------------------------------------ the operator
    @abstractmethod
    def _block(self, channels: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) for a slice of channels."""

    def blocks(self, channels_per_chunk: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(channel_slice, matrix_block [B, c, L, L])`` covering every channel once.

        Memory stays at one block at a time; the block width is chosen from
        :attr:`block_bytes` unless ``channels_per_chunk`` is given.
        """
        for sl, block, _ in self._blocks_with_offset(channels_per_chunk):
            yield sl, block

    def _blocks_with_offset(self, channels_per_chunk: int | None = None):
        step = channels_per_chunk or channels_per_block(
            self.batch_size, self.length, self.channels, self.dtype.itemsize,
            self.block_temporaries, self.block_bytes)
        for start in range(0, self.channels, step):
            sl = slice(start, min(start + step, self.channels))
            block, offset = self._block(sl)
            yield sl, block, offset

    @property
    def matrix(self) -> torch.Tensor:
        """``[B, C, L, L]`` the per-channel implicit attention matrices, allocated on first access (cached).

        A convenience for small inputs: above :data:`~implicit_attention.memory.MATRIX_PROPERTY_BYTES`
        (1 GiB) it refuses with :class:`~implicit_attention.errors.MemoryBudgetError` instead of
        allocating. :meth:`aggregate` and :meth:`blocks` never hold more than a block of channels;
        :meth:`full_matrix` allocates whatever fits in memory.
        """
        if self._matrix is None:
            needed = self._matrix_bytes()
            if needed > memory.MATRIX_PROPERTY_BYTES:  # read at call time: users may raise the limit
                raise MemoryBudgetError(
                    f"layer {self.name!r}: .matrix would allocate {self._matrix_shape()}", needed,
                    memory.MATRIX_PROPERTY_BYTES,
                    "The property refuses above implicit_attention.memory.MATRIX_PROPERTY_BYTES. Use "
                    ".aggregate('mean'|'abs'|'pos') or .blocks() (they never hold all channels), or call "
                    ".full_matrix() to allocate it anyway.")
            self._matrix = self.full_matrix()
        return self._matrix

    def full_matrix(self) -> torch.Tensor:
        """``[B, C, L, L]`` every channel's matrix in one tensor (not cached: :attr:`matrix` caches).

        Raises :class:`~implicit_attention.errors.MemoryBudgetError` before allocating if the tensor
        would not fit in the memory free on the layer's device.
        """
        ensure_fits(f"layer {self.name!r}: the per-channel matrices {self._matrix_shape()}", self._matrix_bytes(),
                    self.device, "Use .aggregate('mean'|'abs'|'pos') or .blocks() instead (they never hold all "
                    "channels), pass fewer layers= or a shorter input.")
        return torch.cat([block for _, block in self.blocks()], dim=1)

    def _matrix_bytes(self) -> int:
        return self.batch_size * self.channels * self.length ** 2 * self.dtype.itemsize

    def _matrix_shape(self) -> str:
        return f"[B={self.batch_size}, C={self.channels}, L={self.length}, L={self.length}]"

    @property
    def offset(self) -> torch.Tensor:
        """``[B, L, C]`` the part of the output that multiplies no value."""
        if self._offset is None:
            parts = [off if off is not None else torch.zeros_like(self.values[..., sl])
                     for sl, _, off in self._blocks_with_offset()]
            self._offset = torch.cat(parts, dim=-1)
        return self._offset

    # --------------------------------------------------------------- analysis
    def reconstruct(self) -> torch.Tensor:
        """``[B, L, C_out]``: ``einsum("bcij,bjc->bic", matrix, values) + offset``, block by block
        (summed into the output channels by :attr:`fold` where there is one)."""
        parts, offsets = [], []
        for sl, block, off in self._blocks_with_offset():
            parts.append(torch.einsum("bcij,bjc->bic", block, self.values[..., sl]))
            offsets.append(off if off is not None else torch.zeros_like(self.values[..., sl]))
        if self._offset is None:
            self._offset = torch.cat(offsets, dim=-1)
        out = torch.cat(parts, dim=-1) + self._offset
        if self.fold is not None:
            outputs = self.output.shape[-1] if self.projection is None else self.projection.shape[1]
            out = out.new_zeros(*out.shape[:-1], outputs).index_add_(-1, self.fold, out)
        if self.projection is not None:
            out = out @ self.projection.T
        return out

    def measure_error(self, max_entries: int | None = FULL_CHECK_ENTRIES) -> float:
        """Relative Frobenius error of the reconstruction against the real output; stores it.

        Every channel is checked while ``B * C * L * L <= max_entries`` (``None``: always);
        above that, where the architecture reads rows of its matrices cheaply (:meth:`_matrix_rows`),
        every channel on :data:`SAMPLED_ROWS` rows spread over the input (the last one included), else
        :data:`SAMPLED_CHANNELS` channels in groups spread over the width (with a :attr:`fold`, output
        channels, each rebuilt from every operator channel folded into it), so that the check stays
        cheap on long inputs. :attr:`error_channels` and :attr:`error_rows` record what was checked.
        """
        self.error_rows = None
        if max_entries is None or self.projection is not None \
                or self.batch_size * self.channels * self.length ** 2 <= max_entries:
            rec, ref = self.reconstruct(), self.output
            self.error_channels = self.channels
        elif self.fold is None and (sampled := self._sampled_rows_check()) is not None:
            rec, ref = sampled
            self.error_channels = self.channels
        else:
            outputs = self.channels if self.fold is None else self.output.shape[-1]
            recs, refs = [], []
            for sl in _sample_groups(outputs, SAMPLED_CHANNELS, SAMPLED_GROUPS):
                recs.append(self._reconstruct_outputs(sl))
                refs.append(self.output[..., sl])
            rec, ref = torch.cat(recs, dim=-1), torch.cat(refs, dim=-1)
            self.error_channels = ref.shape[-1]
        denom = ref.norm().clamp_min(torch.finfo(self.dtype).tiny)
        self.error = float((rec - ref).norm() / denom)
        return self.error

    def _sampled_rows_check(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(reconstruction, output)`` ``[B, R, C]`` on :data:`SAMPLED_ROWS` rows, or ``None`` where the
        architecture has no fast rows (:meth:`_matrix_rows`) or they would cost more than sampled channels
        (wide layers on short inputs, see :data:`ROW_ENTRY_COST`)."""
        if ROW_ENTRY_COST * SAMPLED_ROWS * self.channels > SAMPLED_CHANNELS * self.length:
            return None
        rows = torch.linspace(0, self.length - 1, min(SAMPLED_ROWS, self.length)).round().long().unique()
        rec = self._row_outputs(rows.to(self.values.device))
        if rec is None:
            return None
        self.error_rows = len(rows) if len(rows) < self.length else None      # every row: nothing sampled
        return rec, self.output[:, rows]

    def _row_outputs(self, rows: torch.Tensor) -> torch.Tensor | None:
        """``[B, R, C]`` the reconstruction on rows ``rows`` (``[R]``, ascending), from :meth:`_matrix_rows`
        one row at a time (memory ``[B, C, L]``, not ``[B, R, C, L]``); ``None`` without fast rows. An
        architecture that contracts rows with the values more cheaply overrides it."""
        recs = []
        for row in rows.split(1):
            read = self._matrix_rows(row)
            if read is None:
                return None
            matrix_rows, offset_rows = read
            rec = torch.einsum("brcl,blc->brc", matrix_rows, self.values)
            recs.append(rec if offset_rows is None else rec + offset_rows)
        return torch.cat(recs, dim=1)

    def _matrix_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Rows ``rows`` (``[R]``) of every channel's matrix ``[B, R, C, L]`` and of the offset ``[B, R, C]`` (or
        ``None``), where the architecture reads them without per-channel blocks; else ``None``."""
        return None

    def _reconstruct_outputs(self, outputs: slice) -> torch.Tensor:
        """``[B, L, c]`` the reconstruction of a slice of output channels only (of operator channels
        where there is no :attr:`fold`; else from the operator channels folded into them)."""
        if self.fold is None:
            runs = [outputs]
        else:
            members = ((self.fold >= outputs.start) & (self.fold < outputs.stop)).nonzero().flatten().tolist()
            runs = _contiguous_runs(members)
        out = self.values.new_zeros(*self.values.shape[:-1], outputs.stop - outputs.start)
        for run in runs:
            block, off = self._block(run)
            part = torch.einsum("bcij,bjc->bic", block, self.values[..., run])
            part = part if off is None else part + off
            targets = (torch.arange(run.start, run.stop, device=out.device) if self.fold is None
                       else self.fold[run]) - outputs.start
            out.index_add_(-1, targets.to(out.device), part)
        return out

    def aggregate(self, how: Aggregate = "mean", channel: int | None = None) -> torch.Tensor:
        """``[B, L, L]`` one map per example from the per-channel matrices (computed once, cached).

        Args:
            how: ``"mean"`` the signed channel mean of ``A``, ``"abs"`` the mean of ``|A|``,
                ``"pos"`` the mean of ``clamp(A, min=0)``.
            channel: return that single channel's matrix instead (``how`` is then ignored).

        An architecture's fast path (:meth:`_fast_aggregate`) serves it where there is one, else
        :meth:`aggregate_by_blocks`.
        """
        if channel is not None:
            if not -self.channels <= channel < self.channels:
                raise IndexError(f"channel {channel} out of range for {self.channels} channels")
            return self.channel_matrix(channel % self.channels)
        check_aggregate(how)
        if how not in self._aggregates:
            fast = self._fast_aggregate(how)
            self._aggregates[how] = fast if fast is not None else self.aggregate_by_blocks(how)
        return self._aggregates[how]

    def aggregate_rows(self, rows, how: Aggregate = "mean") -> torch.Tensor:
        """``[B, R, L]`` rows ``rows`` (``[R]`` indices, negatives count from the end) of :meth:`aggregate`.

        Read off a cached aggregate when there is one, or off the whole map for architectures whose
        map is cheap (:attr:`rows_from_map`); else from the architecture's fast rows
        (:meth:`_fast_rows`, ``O(L * C * N)`` per row for Mamba), or from the channel blocks.
        """
        rows = self._row_index(rows)
        check_aggregate(how)
        if how in self._aggregates or self.rows_from_map:
            return self.aggregate(how)[:, rows]
        fast = self._fast_rows(rows, how)
        return fast if fast is not None else self.rows_by_blocks(rows, how)

    def attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        """``[B, L, L]`` gradient-weighted map ``mean_c clamp(grad_i * A[i, j] * v_j, min=0)``.

        ``grad`` is ``[B, L, C]``, the gradient of the explained score with respect to this
        layer's output (before the output projection; with a fused :attr:`projection`, at the
        module's own output ``[B, L, C_out]``). Since ``out_i = sum_j A[i, j] v_j``, the
        gradient with respect to ``A[i, j]`` is ``grad_i * v_j``: this is Chefer et al.'s
        ``grad ⊙ A`` with the exact gradient, computed without any extra autograd graph. Each
        channel is a head of this rule (softmax attention clamps per head instead).
        ``signed=True`` keeps the sign (no clamp), so that negative evidence shows.
        """
        if grad.shape != self.output.shape:
            raise ValueError(f"grad must have shape {tuple(self.output.shape)}, got {tuple(grad.shape)}")
        grad = grad.to(self.dtype)
        if self.projection is not None:      # back through the module's fused output projection
            grad = grad @ self.projection
        grad = self.matrix_gradient(grad)
        fast = self._fast_attribution(grad, signed)
        return fast if fast is not None else self.attribution_by_blocks(grad, signed)

    # ------------------------------------------- the generic per-channel-block computations
    def channel_matrix(self, channel: int) -> torch.Tensor:
        """``[B, L, L]`` the matrix of one channel (``0 <= channel < C``)."""
        block, _ = self._block(slice(channel, channel + 1))
        return block[:, 0]

    def aggregate_by_blocks(self, how: Aggregate = "mean") -> torch.Tensor:
        """``[B, L, L]`` :meth:`aggregate` computed from the channel blocks, one block at a time.

        The generic computation every fast path is tested against; nothing is cached.
        """
        check_aggregate(how)
        total = torch.zeros(self.batch_size, self.length, self.length, dtype=self.dtype, device=self.device)
        for _, block in self.blocks():
            total += channel_transform(block, how).sum(dim=1)
        return total / self.channels

    def rows_by_blocks(self, rows, how: Aggregate = "mean") -> torch.Tensor:
        """``[B, R, L]`` :meth:`aggregate_rows` read off the channel blocks (generic; nothing cached)."""
        rows = self._row_index(rows)
        check_aggregate(how)
        total = torch.zeros(self.batch_size, len(rows), self.length, dtype=self.dtype, device=self.device)
        for _, block in self.blocks():
            total += channel_transform(block[:, :, rows], how).sum(dim=1)
        return total / self.channels

    def attribution_by_blocks(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        """``[B, L, L]`` :meth:`attribution` from the channel blocks, for ``grad`` already at the
        matrix output (:meth:`matrix_gradient` applied)."""
        if self.fold is not None:
            grad = grad[..., self.fold]                         # each stream gets its output's gradient
        total = torch.zeros(self.batch_size, self.length, self.length, dtype=self.dtype, device=self.device)
        for sl, block in self.blocks():
            g = grad[..., sl].transpose(1, 2).unsqueeze(-1)        # [B, c, L, 1]
            v = self.values[..., sl].transpose(1, 2).unsqueeze(-2)  # [B, c, 1, L]
            cam = g * block * v
            total += (cam if signed else cam.clamp_(min=0)).sum(dim=1)
        return total / self.channels

    # ----------------------------------------------------- what architectures may provide
    #: :meth:`aggregate_rows` reads rows off the whole aggregated map (architectures whose map is
    #: a few per-head products, cheaper than any per-channel rows).
    rows_from_map: bool = False

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        """``[B, L, L]`` aggregate ``how`` without per-channel blocks, or ``None`` where there is no fast path."""
        return None

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor | None:
        """``[B, R, L]`` rows ``rows`` (``[R]`` in ``[0, L)``) of aggregate ``how`` without per-channel
        blocks, or ``None`` where there is no fast path."""
        return None

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor | None:
        """:meth:`attribution` without per-channel blocks (``grad`` at the matrix output), or ``None``."""
        return None

    def _row_index(self, rows) -> torch.Tensor:
        rows = torch.as_tensor(rows, device=self.device).long().reshape(-1)
        if ((rows < -self.length) | (rows >= self.length)).any():
            raise IndexError(f"rows {rows.tolist()} out of range for {self.length} tokens")
        return rows % self.length

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """Turn the gradient at the layer output into the gradient at the output of :attr:`matrix`.

        The identity for exact variants; an ablation that leaves out an output-side factor (a
        gate) multiplies it back in here, so that ``grad_i * v_j`` is the exact derivative of the
        score with respect to that variant's matrix entries.
        """
        return grad

    def release(self) -> None:
        """Drop the cached :attr:`matrix` and aggregates (``[B, L, L]`` each) to free their memory.

        They are recomputed if asked for again; :func:`~implicit_attention.explain` releases each
        layer once its map has been combined.
        """
        self._matrix = None
        self._aggregates.clear()

    def memory_estimate(self) -> str:
        """A one-line estimate of what :attr:`matrix` would take."""
        return format_bytes(self._matrix_bytes())


def check_aggregate(how: str) -> None:
    """Raise ``ValueError`` unless ``how`` is one of :data:`AGGREGATES`."""
    if how not in AGGREGATES:
        raise ValueError(f"how must be one of {AGGREGATES}, got {how!r}")


def channel_transform(block: torch.Tensor, how: str) -> torch.Tensor:
    """The per-channel transform whose channel mean is aggregate ``how`` (identity, ``|.|`` or ``relu``)."""
    return block if how == "mean" else block.abs() if how == "abs" else block.clamp(min=0)


def scaled_head_sum(A: torch.Tensor, row: torch.Tensor, how: str, equation: str) -> torch.Tensor:
    """``sum_{h, c in h} f(row[c] A_h)`` for channels that share one matrix per head, ``f`` the
    transform of aggregate ``how``: ``|r A| = |r| |A|`` and ``relu(r A) = relu(r) relu(A) + relu(-r) relu(-A)``.

    ``equation`` contracts ``A`` with the per-head sum of ``row`` (e.g. ``"bhij,bhi->bij"``).
    """
    if how == "mean":
        return torch.einsum(equation, A, row.sum(-1))
    if how == "abs":
        return torch.einsum(equation, A.abs(), row.abs().sum(-1))
    return (torch.einsum(equation, A.clamp(min=0), row.clamp(min=0).sum(-1))
            + torch.einsum(equation, (-A).clamp(min=0), (-row).clamp(min=0).sum(-1)))


def _contiguous_runs(indices: list[int]) -> list[slice]:
    """Sorted channel indices as the fewest slices: ``[0, 1, 2, 7, 8]`` -> ``[0:3, 7:9]``."""
    runs: list[slice] = []
    for index in indices:
        if runs and runs[-1].stop == index:
            runs[-1] = slice(runs[-1].start, index + 1)
        else:
            runs.append(slice(index, index + 1))
    return runs


def _sample_groups(channels: int, count: int, groups: int = SAMPLED_GROUPS) -> list[slice]:
    """``groups`` contiguous channel slices of ``count // groups`` channels, evenly spread."""
    size = max(1, min(channels, count) // groups)
    starts = sorted({round(k * (channels - size) / max(groups - 1, 1)) for k in range(groups)})
    return [slice(start, start + size) for start in starts]
