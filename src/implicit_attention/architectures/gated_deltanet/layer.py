"""Delta-rule mixers as :class:`~..base.LayerDecomposition`: per-channel blocks from the per-head ``A_h``,
with the factorised signed mean and single rows of :mod:`.operator`."""

from __future__ import annotations

import torch

from ..base import LayerDecomposition, channel_transform
from ..heads import head_conv_reduce
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

    def _per_head(self, how: str, grad: torch.Tensor | None = None, signed: bool = False) -> torch.Tensor:
        """``[B, L, L]`` the channel mean of ``f(A_c)`` (``abs``, ``pos``) or with ``grad`` the attribution from
        each head's ``A_h`` with its channels' column gate, conv taps and row scale accumulated in place
        (:func:`~..heads.head_conv_reduce`)."""
        f, variant = self.factors, self.variant
        ones = torch.ones_like(f.x)
        identity = torch.ones(f.x.shape[-1], 1, dtype=f.x.dtype, device=f.x.device)
        if variant == "delta":
            row, col, taps = ones, ones, identity
        else:
            row = f.row(variant)
            col = f.act_gate if variant != "no_act" else ones
            taps = f.conv_weight if variant != "no_conv" and f.conv_weight is not None else identity
        return head_conv_reduce(lambda head: f.attention[:, head:head + 1], row, col, taps, f.head_v, how=how,
                                grad=grad, values=self.values, signed=signed, block_bytes=self.block_bytes)

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        return self._per_head("attribution", grad, signed)

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        if self.variant == "delta":          # mean_c f(A_h(c)) = mean_h f(A_h): heads have Dv channels each
            return channel_transform(self.factors.attention, how).mean(dim=1)
        if how != "mean":
            return self._per_head(how)
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
