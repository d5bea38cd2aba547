"""Slow, obviously-correct mLSTM implicit attention: the test oracle for :mod:`.operator`.

Python loops over batch, head, channel and matrix entries straight from the equations of the
module docstring of :mod:`.operator` (the stabiliser by its own recurrence ``m_t = max(log f_t +
m_{t-1}, i~_t)``, ``m_{-1} = 0``); only for tiny inputs. Same outputs as the fast path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .factors import projections


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive_mlstm_matrix(q: torch.Tensor, k: torch.Tensor, igate: torch.Tensor, fgate: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """``[L, L]`` one head's ``A`` from ``q, k [L, d]`` and gate pre-activations ``[L]``."""
    length, width = q.shape
    log_f = [_logsigmoid(float(x)) for x in fgate]
    A = torch.zeros(length, length, dtype=q.dtype)
    m = 0.0
    for t in range(length):
        m = max(log_f[t] + m, float(igate[t]))
        row = []
        for j in range(t + 1):
            decay = sum(log_f[j + 1: t + 1])
            row.append(float(q[t] @ k[j]) / math.sqrt(width) * math.exp(decay + float(igate[j]) - m))
        denominator = max(abs(sum(row)), math.exp(-m)) + eps
        for j, x in enumerate(row):
            A[t, j] = x / denominator
    return A


def naive_xlstm(layer: nn.Module, hidden: torch.Tensor, variant: str, dtype=torch.float64):
    """Matrices ``[B, C, L, L]``, offset ``[B, L, C]`` and values ``[B, L, C]`` of ``variant``."""
    x = hidden.detach().to(dtype)
    q, k, v, o, i, f = projections(layer, x, dtype)
    batch, length, channels = v.shape
    heads = layer.config.num_heads
    dqk, dv = q.shape[-1] // heads, channels // heads
    norm = layer.multihead_norm
    matrices = torch.zeros(batch, channels, length, length, dtype=dtype)
    offset = torch.zeros(batch, length, channels, dtype=dtype)
    values = torch.zeros(batch, length, channels, dtype=dtype)
    for b in range(batch):
        for h in range(heads):
            qs, ks = slice(h * dqk, (h + 1) * dqk), slice(h * dv, (h + 1) * dv)
            A = naive_mlstm_matrix(q[b, :, qs], k[b, :, qs], i[b, :, h], f[b, :, h], layer.config.eps)
            cell = A @ v[b, :, ks]                                          # [L, dv] h = A v
            for c in range(h * dv, (h + 1) * dv):
                if variant == "mlstm":
                    matrices[b, c], values[b, :, c] = A, v[b, :, c]
                    continue
                for t in range(length):
                    mean = float(cell[t].mean())
                    variance = sum((float(e) - mean) ** 2 for e in cell[t]) / dv
                    scale = 1.0 / math.sqrt(variance + norm.eps)
                    weight = 1.0 if norm.weight is None else float(norm.weight.detach()[c])
                    gate = float(torch.sigmoid(o[b, t, c])) if variant == "unified" else 1.0
                    matrices[b, c, t] = gate * weight * scale * A[t]
                    if norm.bias is not None:
                        offset[b, t, c] = gate * float(norm.bias.detach()[c])
                    values[b, t, c] = v[b, t, c] - v[b, t, ks].mean()
    return matrices, offset, values
