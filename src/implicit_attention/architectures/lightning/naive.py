"""Slow, obviously-correct lightning attention: the test oracle for :mod:`.operator`."""

from __future__ import annotations

import math

import torch

from .operator import LightningFactors


def lightning_naive(f: LightningFactors, variant: str) -> torch.Tensor:
    """Matrices ``[B, C, L, L]`` entry by entry: ``row_c[i] exp(-s_h (i - j)) (q_i . k_j)`` (the offset is zero)."""
    batch, length, H, D = f.v.shape
    matrices = torch.zeros(batch, H * D, length, length, dtype=f.v.dtype)
    for b in range(batch):
        for c in range(H * D):
            h = c // D
            for i in range(length):
                row = 1.0
                if variant != "recurrence":
                    row = float(f.norm_weight[c]) * float(f.norm_scale[b, i])
                    if variant == "unified":
                        row *= float(f.gate[b, i, c])
                for j in range(i + 1):
                    qk = sum(float(f.q[b, i, h, n]) * float(f.k[b, j, h, n]) for n in range(D))
                    matrices[b, c, i, j] = row * math.exp(-float(f.slope[h]) * (i - j)) * qk
    return matrices
