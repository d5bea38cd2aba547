"""Slow, obviously-correct Griffin implicit attention: the test oracle for :mod:`.operator`.

Python loops over batch, channel and matrix entries straight from the equations of the module
docstring of :mod:`.operator`; only for tiny inputs. Same inputs and outputs as the fast path.
"""

from __future__ import annotations

import math

import torch

from ..primitives import naive_conv_matrix
from .operator import GriffinFactors


def naive_rglru_matrix(f: GriffinFactors, b: int, d: int) -> torch.Tensor:
    """``[L, L]`` ``alpha[t, j] = (prod_{s=j+1..t} a_s) m_j i_j`` with ``a_s = 0`` where the state resets."""
    length = f.x.shape[1]
    alpha = torch.zeros(length, length, dtype=f.x.dtype)
    for t in range(length):
        for j in range(t + 1):
            product = 1.0
            for s in range(j + 1, t + 1):
                product *= 0.0 if bool(f.reset[b, s]) else math.exp(float(f.log_a[b, s, d]))
            alpha[t, j] = product * float(f.multiplier[b, j, d]) * float(f.input_gate[b, j, d])
    return alpha


def naive_griffin(f: GriffinFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices ``[B, E, L, L]`` and offset ``[B, L, E]`` of ``variant``, one channel at a time."""
    batch, length, channels = f.x.shape
    matrices = torch.zeros(batch, channels, length, length, dtype=f.x.dtype)
    offset = torch.zeros(batch, length, channels, dtype=f.x.dtype)
    identity = torch.eye(length, dtype=f.x.dtype)
    for b in range(batch):
        for d in range(channels):
            alpha = naive_rglru_matrix(f, b, d)
            if variant == "rglru":
                matrices[b, d] = alpha
                continue
            gate = identity if variant == "no_gate" else torch.diag(f.gate[b, :, d])
            M = identity if variant == "no_conv" else naive_conv_matrix(f.conv_weight, d, length)
            matrices[b, d] = gate @ alpha @ M
            if variant != "no_conv" and f.conv_bias is not None:
                offset[b, :, d] = gate @ alpha @ torch.full((length,), float(f.conv_bias[d]), dtype=f.x.dtype)
    return matrices, offset


def naive_rglru_scan(f: GriffinFactors) -> torch.Tensor:
    """``[B, L, E]`` the RG-LRU by its recurrence ``s_t = a_t s_{t-1} + m_t i_t c_t`` (``a_t = 0`` at resets)."""
    batch, length, channels = f.x.shape
    out = torch.zeros(batch, length, channels, dtype=f.x.dtype)
    for b in range(batch):
        state = torch.zeros(channels, dtype=f.x.dtype)
        for t in range(length):
            a = torch.zeros(channels, dtype=f.x.dtype) if bool(f.reset[b, t]) else torch.exp(f.log_a[b, t])
            state = a * state + f.multiplier[b, t] * f.input_gate[b, t] * f.conv_out[b, t]
            out[b, t] = state
    return out
