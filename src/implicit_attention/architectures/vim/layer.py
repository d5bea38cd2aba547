"""Vision Mamba mixers as :class:`~..base.LayerDecomposition`: the two scans' Mamba operators combined
(:mod:`.operator`), with Mamba's fast signed mean and rows (:mod:`..mamba.fast`) run on each scan."""

from __future__ import annotations

import torch

from ..base import LayerDecomposition, channel_transform
from ..mamba.fast import matrix_rows, signed_mean
from .factors import VimFactors
from .operator import EXACT_VARIANTS, FOLDED_VARIANTS, flip_matrix, vim_block, vim_fold, vim_values


class VimLayerDecomposition(LayerDecomposition):
    """A bidirectional Mamba mixer as per-channel implicit attention ``s (A_f + J A_b J)`` over ``E`` channels
    (``2E`` folded into ``E`` for ``no_conv`` and ``s6``)."""

    #: one scan's block (Mamba's 5) held while the other's is built
    block_temporaries = 7

    def __init__(self, factors: VimFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=vim_values(factors, variant),
                         offset=None, mask=factors.mask, fold=vim_fold(factors, variant), **kwargs)

    def _block(self, channels: slice):
        return vim_block(self.factors, channels, self.variant)

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        # the signed mean of each scan factorises (Mamba's tiles); the channel mean of s (A_f + J A_b J)
        # is s (mean A_f + J mean A_b J), for the folded variants too (their 2E channels hold 2 s A)
        if how != "mean":
            return None
        f = self.factors
        forward = signed_mean(f.forward, self.variant, chunk_bytes=self.block_bytes)
        backward = signed_mean(f.backward, self.variant, chunk_bytes=self.block_bytes)
        return forward.add_(flip_matrix(backward)).mul_(f.scale)

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        # row i of J A_b J is row L-1-i of A_b, reversed
        f = self.factors
        forward = matrix_rows(f.forward, self.variant, rows)                               # [B, R, E, L]
        backward = matrix_rows(f.backward, self.variant, self.length - 1 - rows).flip(-1)
        if self.variant in FOLDED_VARIANTS:
            per_channel = torch.cat([forward, backward], dim=2) * (2 * f.scale)
        else:
            per_channel = (forward + backward) * f.scale
        return channel_transform(per_channel, how).mean(dim=2)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # s6 and no_gate leave the gate silu(z) out of both scans' matrices: it multiplies the gradient
        return grad * self.factors.out_gate if self.variant in ("s6", "no_gate") else grad
