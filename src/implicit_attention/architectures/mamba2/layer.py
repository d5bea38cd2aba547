"""Mamba-2 mixers as :class:`~..base.LayerDecomposition` (the operator of :mod:`.operator`, with its
factorised signed mean and rows)."""

from __future__ import annotations

import torch

from ...memory import channels_per_block
from ..base import LayerDecomposition, channel_transform
from .operator import EXACT_VARIANTS, Mamba2Factors, mamba2_block, matrix_rows, signed_mean


class Mamba2LayerDecomposition(LayerDecomposition):
    """A Mamba-2 mixer as per-channel implicit attention over its inner width ``E``."""

    block_temporaries = 5

    def __init__(self, factors: Mamba2Factors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS,
                         values=factors.values(variant), offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return mamba2_block(self.factors, channels, self.variant)

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        # the signed mean factorises over the heads (see operator.signed_mean)
        if how != "mean":
            return None
        heads = channels_per_block(self.batch_size, self.length, self.factors.num_heads, self.dtype.itemsize, 4,
                                   self.block_bytes)
        return signed_mean(self.factors, self.variant, heads)

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        # a few rows (raw / paper read the target row) cost O(R L E), never the [B, C, L, L] blocks
        return channel_transform(matrix_rows(self.factors, self.variant, rows), how).mean(dim=2)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # "ssd": out = (w r silu z) * (S u + D u); "no_gate": out = silu(z) * (A x + offset).
        if self.variant == "ssd":
            return grad * self.factors.out_gate
        if self.variant == "no_gate":
            return grad * self.factors.gate
        return grad
