"""Slow, obviously-correct Griffin implicit attention: the test oracle for :mod:`.griffin`.

Python loops over batch, channel and matrix entries straight from the equations of the module
docstring of :mod:`.griffin`; only for tiny inputs. Same inputs and outputs as the fast path.
"""

from __future__ import annotations

import math

import torch

from .griffin import AttentionFactors, GriffinFactors


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


def naive_conv_matrix(f: GriffinFactors, d: int) -> torch.Tensor:
    """``[L, L]`` the causal depthwise conv: ``M[i, j] = w[K-1-(i-j)]`` for ``0 <= i-j < K``."""
    length, width = f.x.shape[1], f.conv_weight.shape[1]
    M = torch.zeros(length, length, dtype=f.x.dtype)
    for i in range(length):
        for j in range(max(0, i - width + 1), i + 1):
            M[i, j] = f.conv_weight[d, width - 1 - (i - j)]
    return M


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
            M = identity if variant == "no_conv" else naive_conv_matrix(f, d)
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


def naive_attention(f: AttentionFactors) -> torch.Tensor:
    """``[B, C, L, L]`` channel ``c`` gets the probabilities of head ``c // head_dim``."""
    batch, heads, length, _ = f.probs.shape
    channels = f.values.shape[-1]
    out = torch.zeros(batch, channels, length, length, dtype=f.probs.dtype)
    for b in range(batch):
        for c in range(channels):
            out[b, c] = f.probs[b, c // f.head_dim]
    return out
