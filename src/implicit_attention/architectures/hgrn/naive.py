"""Slow, obviously-correct HGRN implicit attention: the test oracle for :mod:`.operator`."""

from __future__ import annotations

import torch

from ..primitives import naive_conv_matrix
from .operator import HGRNFactors


def hgrn_naive(f: HGRNFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: matrices ``[B, E, L, L]`` and offset ``[B, L, E]``, one channel and entry at a time."""
    batch, length, channels = f.x.shape
    dtype = f.x.dtype
    matrices = torch.zeros(batch, channels, length, length, dtype=dtype)
    offset = torch.zeros(batch, length, channels, dtype=dtype)
    for b in range(batch):
        for e in range(channels):
            R = torch.zeros(length, length, dtype=dtype)
            for i in range(length):
                for j in range(i + 1):
                    decay = 1.0
                    for k in range(j + 1, i + 1):
                        decay *= float(f.forget[b, k, e])
                    R[i, j] = decay * float(1 - f.forget[b, j, e]) * float(f.mask[b, j])
            if variant == "recurrence":
                matrices[b, e] = R
                continue
            M = torch.eye(length, dtype=dtype) if f.conv_weight is None else naive_conv_matrix(f.conv_weight, e, length)
            act = torch.diag(torch.sigmoid(f.conv_out[b, :, e]) * f.mask[b])
            gate = torch.diag(f.norm_weight[e] * f.norm_scale[b] * f.out_gate[b, :, e])
            matrices[b, e] = gate @ R @ act @ M @ torch.diag(f.mask[b])
            if f.conv_bias is not None and f.conv_weight is not None:
                offset[b, :, e] = gate @ R @ act @ torch.full((length,), float(f.conv_bias[e]), dtype=dtype)
    return matrices, offset
