"""Lightning-attention layers as :class:`~..base.LayerDecomposition`: one decayed matrix per head, its channels'
row scales (norm, gate) factored out, so the aggregates cost ``[B, H, L, L]`` (:mod:`..heads`)."""

from __future__ import annotations

import torch

from ..heads import HeadSharedDecomposition
from .operator import LightningFactors, lightning_block, lightning_heads


class LightningLayerDecomposition(HeadSharedDecomposition):
    """A MiniMax lightning-attention layer as per-channel implicit attention over its value width ``C = H D``."""

    def __init__(self, factors: LightningFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant == "unified", values=factors.values(), offset=None,
                         mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return lightning_block(self.factors, channels, self.variant)

    def _head_matrices(self, heads: slice) -> torch.Tensor:
        return lightning_heads(self.factors, heads)

    def _head_rows(self) -> torch.Tensor:
        f = self.factors
        row = f.row_scale(self.variant)
        row = torch.ones_like(f.gate) if row is None else row
        return row.unflatten(-1, (f.v.shape[2], f.head_v))

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # what the variant leaves out of its matrix (gate; norm and gate) multiplies the gradient reaching it
        f = self.factors
        if self.variant == "no_gate":
            return grad * f.gate
        if self.variant == "recurrence":
            return grad * f.row_scale("unified")
        return grad
