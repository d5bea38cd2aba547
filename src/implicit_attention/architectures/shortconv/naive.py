"""Slow, obviously-correct short-conv implicit attention: the test oracle for :mod:`.operator`."""

from __future__ import annotations

import torch

from ..primitives import naive_conv_matrix
from .operator import ShortConvFactors


def shortconv_naive(f: ShortConvFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices ``[B, E, L, L]`` and offset ``[B, L, E]``: ``diag(C~_c) M_c diag(B~_c)`` one channel at a time."""
    batch, length, channels = f.x.shape
    matrices = torch.zeros(batch, channels, length, length, dtype=f.x.dtype)
    offset = torch.zeros(batch, length, channels, dtype=f.x.dtype)
    for b in range(batch):
        for c in range(channels):
            M = naive_conv_matrix(f.weight, c, length)
            if variant == "no_gate":
                matrices[b, c] = M
                continue
            matrices[b, c] = torch.diag(f.c[b, :, c]) @ M @ torch.diag(f.b[b, :, c])
            if f.bias is not None:
                for i in range(length):
                    offset[b, i, c] = f.c[b, i, c] * f.bias[c]
    return matrices, offset
