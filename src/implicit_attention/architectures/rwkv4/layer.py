"""RWKV-4 time mixing as :class:`~..base.LayerDecomposition` (aggregates by :mod:`.fast`)."""

from __future__ import annotations

import torch

from ..base import LayerDecomposition
from .fast import wkv_attribution, wkv_channel_sum, wkv_rows
from .operator import EXACT_VARIANTS, RwkvFactors, rwkv_block, shift_left


class RwkvLayerDecomposition(LayerDecomposition):
    """An RWKV-4 time-mixing layer as per-channel implicit attention over its attention width ``C``.

    Every entry is ``>= 0`` (softmax weights times the sigmoid gate), so the ``mean``, ``abs`` and
    ``pos`` aggregates are one map: the factorised channel sum of :func:`wkv_channel_sum` (for
    ``unified``, the ``q`` stream's channels hold the same matrices shifted by one column).
    """

    block_temporaries = 4
    #: band block of the tiles (:func:`wkv_channel_sum`; 4 measured fastest on CPU at L = 256..1024)
    tile_block: int = 4

    def __init__(self, factors: RwkvFactors, *, variant: str, **kwargs):
        self.factors = factors
        values, fold = factors.value, None
        if variant == "unified":
            values = torch.cat([factors.value_now, factors.value_prev], dim=-1)
            fold = torch.arange(factors.value.shape[-1], device=values.device).repeat(2)
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=values,
                         offset=torch.zeros_like(values), mask=factors.mask, fold=fold, **kwargs)

    def _block(self, channels: slice):
        return rwkv_block(self.factors, channels, self.variant), None

    def _from_channel_sum(self, total: torch.Tensor) -> torch.Tensor:
        """The channel mean from ``sum_c A_c`` over the ``C`` single-stream channels (unified: the
        ``p`` stream's ``A_c`` and the ``q`` stream's ``A_c S``, ``2C`` channels)."""
        if self.variant == "unified":
            total = total + shift_left(total)
        return total / self.channels

    def _fast_aggregate(self, how: str) -> torch.Tensor:
        # one factorised map serves all three aggregates (every entry is >= 0)
        if "mean" not in self._aggregates:
            total = wkv_channel_sum(self.factors, self.variant != "wkv", self.tile_block, self.block_bytes)
            self._aggregates["mean"] = self._from_channel_sum(total)
        return self._aggregates["mean"]

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        # a few rows (raw / paper read the target row) cost O(R L C)
        return self._from_channel_sum(wkv_rows(self.factors, rows, self.variant != "wkv", self.block_bytes))

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        # every entry is >= 0: the clamp splits by the signs of the gradient and the values
        return wkv_attribution(self.factors, grad, self.variant, signed, self.tile_block,
                               self.block_bytes) / self.channels

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # out = r * (alpha v): the gate "wkv" leaves out multiplies the gradient reaching alpha.
        return grad * self.factors.receptance if self.variant == "wkv" else grad
