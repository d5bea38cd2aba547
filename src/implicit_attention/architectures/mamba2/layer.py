"""Mamba-2 mixers as :class:`~..base.LayerDecomposition` (the operator of :mod:`.operator`, with its
factorised signed mean and rows)."""

from __future__ import annotations

import torch

from ...memory import channels_per_block
from ..base import LayerDecomposition, channel_transform
from ..heads import head_conv_reduce
from .operator import EXACT_VARIANTS, Mamba2Factors, mamba2_block, matrix_rows, signed_mean, ssd_matrices


class Mamba2LayerDecomposition(LayerDecomposition):
    """A Mamba-2 mixer as per-channel implicit attention over its inner width ``E``."""

    block_temporaries = 5

    def __init__(self, factors: Mamba2Factors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS,
                         values=factors.values(variant), offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return mamba2_block(self.factors, channels, self.variant)

    def _per_head(self, how: str, grad: torch.Tensor | None = None, signed: bool = False) -> torch.Tensor:
        """``[B, L, L]`` the channel mean of ``f(A_d)`` (``how``: ``abs`` or ``pos``), or with ``grad`` the
        attribution, each head's ``S'_h`` built once (:func:`~..heads.head_conv_reduce`)."""
        f, variant = self.factors, self.variant
        ones = torch.ones_like(f.x)
        if variant == "ssd":
            row, col, taps, use_D = ones, ones, torch.ones_like(f.conv_weight[:, :1]), False
        else:
            row = f.out_gate if variant != "no_gate" else (f.norm_scale if f.norm_scale is not None else ones)
            col = f.act_gate if variant != "no_act" else f.mask[..., None].expand_as(f.x)
            taps = f.conv_weight if variant != "no_conv" else torch.ones_like(f.conv_weight[:, :1])
            use_D = True

        def head_matrix(head: int) -> torch.Tensor:
            S = ssd_matrices(f, slice(head, head + 1))                                   # [B, 1, L, L]
            if use_D:
                S.diagonal(dim1=-2, dim2=-1).add_(f.D[head])
            return S

        return head_conv_reduce(head_matrix, row, col, taps, f.head_dim, how=how, grad=grad, values=self.values,
                                signed=signed, block_bytes=self.block_bytes)

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        return self._per_head("attribution", grad, signed)

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        # the signed mean factorises over the heads (see operator.signed_mean); |A| and relu(A) per head
        if how != "mean":
            return self._per_head(how)
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
