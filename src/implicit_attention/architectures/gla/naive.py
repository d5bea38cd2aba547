"""Slow, obviously-correct GLA implicit attention: the test oracle for :mod:`.operator` and :mod:`.fast`."""

from __future__ import annotations

import torch

from .operator import GLAFactors


def gla_naive(f: GLAFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: matrices ``[B, C, L, L]`` and offset ``[B, L, C]``, entry by entry from the equations."""
    batch, length, H, V = f.v.shape
    alpha = f.log_alpha.exp()
    matrices = torch.zeros(batch, H * V, length, length, dtype=f.v.dtype)
    offset = torch.zeros(batch, length, H * V, dtype=f.v.dtype)
    for b in range(batch):
        for c in range(H * V):
            h = c // V
            for i in range(length):
                row = 1.0
                if variant == "unified":
                    row = float(f.gate[b, i, c]) * float(f.norm_weight[c]) * float(f.norm_scale[b, i, h])
                    offset[b, i, c] = f.gate[b, i, c] * f.norm_bias[c]
                for j in range(i + 1):
                    total = 0.0
                    for n in range(f.q.shape[-1]):
                        decay = 1.0
                        for s in range(j + 1, i + 1):
                            decay *= float(alpha[b, s, h, n])
                        total += float(f.q[b, i, h, n]) * float(f.k[b, j, h, n]) * decay
                    matrices[b, c, i, j] = row * total
    return matrices, offset
