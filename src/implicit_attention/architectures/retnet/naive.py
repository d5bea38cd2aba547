"""Slow, obviously-correct RetNet implicit attention: the test oracle for :mod:`.operator`."""

from __future__ import annotations

import torch

from .operator import RetNetFactors


def retnet_naive(f: RetNetFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: matrices ``[B, C, L, L]`` and offset ``[B, L, C]``, entry by entry from the equations."""
    batch, length, H, V = f.v.shape
    matrices = torch.zeros(batch, H * V, length, length, dtype=f.v.dtype)
    offset = torch.zeros(batch, length, H * V, dtype=f.v.dtype)
    for b in range(batch):
        for c in range(H * V):
            h = c // V
            gamma = 1 - 2.0 ** (-5 - h)
            for i in range(length):
                row = 1.0
                if variant == "unified":
                    row = float(f.gate[b, i, c]) * float(f.norm_weight[c]) * float(f.norm_scale[b, i, h])
                    offset[b, i, c] = f.gate[b, i, c] * f.norm_bias[c]
                for j in range(i + 1):
                    qk = sum(float(f.q[b, i, h, n]) * float(f.k[b, j, h, n]) for n in range(f.q.shape[-1]))
                    matrices[b, c, i, j] = row * gamma ** (i - j) * qk
    return matrices, offset
