"""GLA layers as :class:`~..base.LayerDecomposition`: per-head aggregates (:mod:`..heads`) from tiles."""

from __future__ import annotations

import torch

from ..base import scaled_head_sum
from ..heads import HeadSharedDecomposition
from ..tiled import diagonal_rows, diagonal_sum
from .fast import gla_heads_tiled, key_dim_operator
from .operator import GLAFactors, gla_block


class GLALayerDecomposition(HeadSharedDecomposition):
    """A GLA layer as per-channel implicit attention over its value width ``C = H V``.

    Aggregates never build per-channel blocks. The signed mean folds each head's channel sum of
    row scales ``rsum_h[i] = sum_{c in h} r_i[c]`` into its queries, which makes it one factorised
    channel sum over all ``H K`` key dims (:func:`~..tiled.diagonal_sum`); ``abs`` and ``pos`` need
    each head's ``A_h`` (from tiles, :func:`gla_heads_tiled`); single rows cost ``O(R L H K)``.
    The per-channel blocks (:attr:`matrix`, attribution) keep the direct :func:`gla_heads`.
    """

    def __init__(self, factors: GLAFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant == "unified", values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return gla_block(self.factors, channels, self.variant)

    def _head_matrices(self, heads: slice) -> torch.Tensor:
        return gla_heads_tiled(self.factors, heads, self.block_bytes)

    rows_from_map = False

    def _fast_aggregate(self, how: str) -> torch.Tensor:
        if how != "mean":
            return super()._fast_aggregate(how)
        # mean_c r_i[c] A_h(c)[i, j] = (1/C) sum_h rsum_h[i] A_h[i, j]: one sum over all H K key dims
        op = key_dim_operator(self.factors, slice(None), row=self._head_rows().sum(-1), heads_on_batch=False)
        return diagonal_sum(op, chunk_bytes=self.block_bytes) / self.channels

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        r = self._head_rows()[:, rows].transpose(1, 2)                          # [B, H, R, V]
        A = diagonal_rows(key_dim_operator(self.factors, slice(None)), rows, "mean", self.block_bytes)
        A = A.view(self.batch_size, -1, len(rows), self.length)                  # [B, H, R, L] the heads' rows
        return scaled_head_sum(A, r, how, "bhrj,bhr->brj") / self.channels
