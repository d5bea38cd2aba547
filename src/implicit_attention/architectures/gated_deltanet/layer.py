"""Delta-rule mixers as :class:`~..base.LayerDecomposition`: per-channel blocks from the per-head ``A_h``,
with the factorised signed mean and single rows of :mod:`.operator`."""

from __future__ import annotations

import torch

from ..base import LayerDecomposition, channel_transform
from .operator import EXACT_VARIANTS, DeltaFactors, delta_block, matrix_rows, signed_mean


class DeltaLayerDecomposition(LayerDecomposition):
    """A Gated DeltaNet or KDA mixer as per-channel implicit attention over its value width ``C = H Dv``.

    The per-head matrices ``A_h`` are built once with the factors (``[B, H, L, L]``); channel
    blocks scale and convolve copies of them. Aggregates: the signed mean per head and conv tap
    (:func:`~.operator.signed_mean`), any aggregate of ``delta`` from ``A_h`` directly (every channel
    of a head has ``A_h``), single rows from rows of ``A_h`` (:func:`~.operator.matrix_rows`).
    """

    block_temporaries = 5

    def __init__(self, factors: DeltaFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return delta_block(self.factors, channels, self.variant)

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        if self.variant == "delta":          # mean_c f(A_h(c)) = mean_h f(A_h): heads have Dv channels each
            return channel_transform(self.factors.attention, how).mean(dim=1)
        if how != "mean":
            return None
        heads = max(1, self.block_bytes // max(1, 4 * self.batch_size * self.length ** 2 * self.dtype.itemsize))
        return signed_mean(self.factors, self.variant, min(heads, self.factors.num_heads))

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        # a few rows (raw / paper read the target row) cost O(R L C K), never the [B, C, L, L] blocks
        return channel_transform(matrix_rows(self.factors, self.variant, rows), how).mean(dim=2)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # delta: out = (w r act z) * (A_h u); no_gate: out = act(z) * (matrix x + offset)
        if self.variant == "delta":
            return grad * self.factors.row("unified")
        if self.variant == "no_gate":
            return grad * self.factors.gate
        return grad
