"""xLSTM's mLSTM layers as :class:`~..base.LayerDecomposition` (aggregates per head)."""

from __future__ import annotations

import torch

from ..base import LayerDecomposition, scaled_head_sum
from ..heads import head_shared_attribution
from .operator import EXACT_VARIANTS, XlstmFactors, row_scale, xlstm_block


class XlstmLayerDecomposition(LayerDecomposition):
    """An mLSTM layer as per-channel implicit attention over its value width ``C``."""

    block_temporaries = 3

    def __init__(self, factors: XlstmFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return xlstm_block(self.factors, channels, self.variant)

    rows_from_map = True

    def _fast_aggregate(self, how: str) -> torch.Tensor:
        # A_c = diag(scale_c) A_head: every aggregate is a per-head weighted sum, no [C, L, L] tensor
        f = self.factors
        scale = row_scale(f, self.variant)
        if scale is None:
            scale = torch.ones_like(f.value)
        total = scaled_head_sum(f.attention, scale.unflatten(-1, (f.heads, -1)), how, "bhij,bih->bij")
        return total / self.channels

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        # A_c = diag(scale_c) A_head: the clamped channel sum splits by sign per head (head_shared_attribution)
        f = self.factors
        scale = row_scale(f, self.variant)
        rows = grad if scale is None else grad * scale
        a = rows.unflatten(-1, (f.heads, -1)).transpose(1, 2)                     # [B, H, L, V]
        b = self.values.unflatten(-1, (f.heads, -1)).transpose(1, 2)
        return head_shared_attribution(f.attention, a, b, signed) / self.channels

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        f = self.factors
        if self.variant == "no_gate":
            return grad * f.out_gate
        if self.variant == "mlstm":
            # out = gate * (w s (h - mean_head h) + b) with s held fixed: d out / d h, centred per head
            g = grad * f.out_gate * f.norm_scale
            return g - f.head_mean(g)
        return grad
