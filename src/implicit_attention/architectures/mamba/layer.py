"""Mamba mixers as :class:`~..base.LayerDecomposition`: the operator of :mod:`.operator` with the fast
aggregates of :mod:`.fast` (Mamba, FalconMamba, Jamba) and Zamba's heads side by side."""

from __future__ import annotations

import torch

from ..base import LayerDecomposition, channel_transform
from .fast import ChannelReduction, channel_reduced, matrix_and_offset_rows, matrix_rows, row_outputs, signed_mean
from .operator import EXACT_VARIANTS, MambaFactors, mamba_block


def _gated_gradient(grad: torch.Tensor, variant: str, out_gate: torch.Tensor) -> torch.Tensor:
    """``out = silu(z) * (S u + D u)`` for ``s6``, ``silu(z) * (A x + offset)`` for ``no_gate``: the gate
    the variant leaves out multiplies the gradient reaching its matrix."""
    return grad * out_gate if variant in ("s6", "no_gate") else grad


class MambaLayerDecomposition(LayerDecomposition):
    """A Mamba mixer as per-channel implicit attention over its inner width ``E``."""

    block_temporaries = 5

    def __init__(self, factors: MambaFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return mamba_block(self.factors, channels, self.variant)

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        # the signed mean factorises; |A| and relu(A) are formed tile by tile: neither builds
        # per-channel L x L blocks (see fast.py)
        if how == "mean":
            return signed_mean(self.factors, self.variant, chunk_bytes=self.block_bytes)
        return channel_reduced(self.factors, self.variant, ChannelReduction(how), chunk_bytes=self.block_bytes)

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        reduction = ChannelReduction(grad=grad, values=self.values, signed=signed)
        return channel_reduced(self.factors, self.variant, reduction, chunk_bytes=self.block_bytes)

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        return channel_transform(matrix_rows(self.factors, self.variant, rows), how).mean(dim=2)

    def _matrix_rows(self, rows: torch.Tensor):
        return matrix_and_offset_rows(self.factors, self.variant, rows)

    def _row_outputs(self, rows: torch.Tensor) -> torch.Tensor:
        return row_outputs(self.factors, self.variant, rows, self.values, chunk_bytes=self.block_bytes)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return _gated_gradient(grad, self.variant, self.factors.out_gate)


class ZambaLayerDecomposition(LayerDecomposition):
    """A Zamba mixer as per-channel implicit attention: the Mamba operator of each head, side by side."""

    block_temporaries = 5

    def __init__(self, heads: list[MambaFactors], *, variant: str, **kwargs):
        self.heads = heads
        self.head_dim = heads[0].x.shape[-1]
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS,
                         values=torch.cat([f.values(variant) for f in heads], dim=-1),
                         offset=None, mask=heads[0].mask, **kwargs)

    def _block(self, channels: slice):
        matrices, offsets = [], []
        for k, f in enumerate(self.heads):  # only the heads this block of channels touches
            start = max(channels.start, k * self.head_dim)
            stop = min(channels.stop, (k + 1) * self.head_dim)
            if start >= stop:
                continue
            matrix, offset = mamba_block(f, slice(start - k * self.head_dim, stop - k * self.head_dim), self.variant)
            matrices.append(matrix)
            offsets.append(offset)
        if all(offset is None for offset in offsets):
            return torch.cat(matrices, dim=1), None
        offsets = [o if o is not None else torch.zeros_like(m[..., 0]).transpose(1, 2)
                   for o, m in zip(offsets, matrices)]
        return torch.cat(matrices, dim=1), torch.cat(offsets, dim=-1)

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        # heads are equally wide: the channel mean is the mean of the heads' channel means
        if how == "mean":
            maps = [signed_mean(f, self.variant, chunk_bytes=self.block_bytes) for f in self.heads]
        else:
            maps = [channel_reduced(f, self.variant, ChannelReduction(how), chunk_bytes=self.block_bytes)
                    for f in self.heads]
        return torch.stack(maps).mean(0)

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        maps = []
        for k, f in enumerate(self.heads):
            part = slice(k * self.head_dim, (k + 1) * self.head_dim)
            reduction = ChannelReduction(grad=grad[..., part], values=self.values[..., part], signed=signed)
            maps.append(channel_reduced(f, self.variant, reduction, chunk_bytes=self.block_bytes))
        return torch.stack(maps).mean(0)

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        per_channel = torch.cat([matrix_rows(f, self.variant, rows) for f in self.heads], dim=2)  # [B, R, E, L]
        return channel_transform(per_channel, how).mean(dim=2)

    def _row_outputs(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([row_outputs(f, self.variant, rows, self.values[..., k * self.head_dim:(k + 1) * self.head_dim],
                                      chunk_bytes=self.block_bytes)
                          for k, f in enumerate(self.heads)], dim=-1)

    def _matrix_rows(self, rows: torch.Tensor):
        parts = [matrix_and_offset_rows(f, self.variant, rows) for f in self.heads]
        matrices = torch.cat([m for m, _ in parts], dim=2)
        if all(o is None for _, o in parts):
            return matrices, None
        offsets = [o if o is not None else m.new_zeros(m.shape[:3]) for m, o in parts]
        return matrices, torch.cat(offsets, dim=-1)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return _gated_gradient(grad, self.variant, torch.cat([f.out_gate for f in self.heads], dim=-1))
