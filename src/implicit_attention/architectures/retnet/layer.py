"""RetNet retention layers as :class:`~..base.LayerDecomposition` (aggregates per head, :mod:`..heads`)."""

from __future__ import annotations

import torch

from ..heads import HeadSharedDecomposition
from .operator import RetNetFactors, retention_heads, retnet_block


class RetNetLayerDecomposition(HeadSharedDecomposition):
    """A RetNet retention layer as per-channel implicit attention over its value width ``C = H V``."""

    def __init__(self, factors: RetNetFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant == "unified", values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return retnet_block(self.factors, channels, self.variant)

    def _head_matrices(self, heads: slice) -> torch.Tensor:
        return retention_heads(self.factors, heads)
