"""Short-conv layers as :class:`~..base.LayerDecomposition`: a band of ``K`` diagonals per channel, so every
aggregate, row and attribution is ``K`` diagonals of ``[B, L, E]`` products (:mod:`.operator`)."""

from __future__ import annotations

import torch

from ..base import LayerDecomposition
from .operator import ShortConvFactors, band_aggregate, band_attribution, shortconv_block


class ShortConvLayerDecomposition(LayerDecomposition):
    """A short gated convolution as per-channel implicit attention over its width ``E``."""

    #: the whole map is ``K`` diagonals: rows are read off it
    rows_from_map = True

    def __init__(self, factors: ShortConvFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant == "unified", values=factors.x, offset=None,
                         mask=factors.mask, **kwargs)

    def _chunk(self) -> int:
        per_channel = self.batch_size * self.length * self.dtype.itemsize * 4
        return max(1, min(self.channels, self.block_bytes // max(per_channel, 1)))

    def _block(self, channels: slice):
        return shortconv_block(self.factors, channels, self.variant)

    def _fast_aggregate(self, how: str) -> torch.Tensor:
        return band_aggregate(self.factors, self.variant, how, self._chunk())

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        return band_attribution(self.factors, self.variant, grad, self.values, signed, self._chunk())

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # no_gate leaves the output gate C~ out of its matrix: it multiplies the gradient reaching it
        return grad if self.variant == "unified" else grad * self.factors.c
