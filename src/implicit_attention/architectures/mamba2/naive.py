"""Slow, obviously-correct Mamba-2 implicit attention: the test oracle for :mod:`.operator`.

Python loops over batch, channel and matrix entries, written straight from the equations in the
module docstring of :mod:`.operator`; only for tiny inputs. Same inputs and outputs as the fast path.
"""

from __future__ import annotations

import math

import torch

from ..mamba.naive import naive_gated_conv
from .operator import Mamba2Factors


def naive_ssd_matrix(f: Mamba2Factors, b: int, h: int) -> torch.Tensor:
    """``[L, L]`` ``S_h[i, j] = (C_i . B_j) exp(A_h sum_{k=j+1..i} dt_k[h]) dt_j[h]`` for head ``h``."""
    length = f.x.shape[1]
    group = h // (f.num_heads // f.B.shape[2])
    S = torch.zeros(length, length, dtype=f.x.dtype)
    for i in range(length):
        for j in range(i + 1):
            decay_sum = float(f.dt[b, j + 1: i + 1, h].sum())
            cb = sum(float(f.C[b, i, group, n]) * float(f.B[b, j, group, n]) for n in range(f.B.shape[3]))
            S[i, j] = cb * math.exp(float(f.A[h]) * decay_sum) * float(f.dt[b, j, h])
    return S


def naive_mamba2(f: Mamba2Factors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices ``[B, E, L, L]`` and offset ``[B, L, E]`` of ``variant``, one channel at a time."""
    norm = f.norm_scale if f.norm_scale is not None else torch.ones_like(f.x)
    return naive_gated_conv(f, variant, lambda b, d: naive_ssd_matrix(f, b, d // f.head_dim),
                            lambda d: float(f.D[d // f.head_dim]), norm)


def naive_scan(f: Mamba2Factors) -> torch.Tensor:
    """``[B, L, E]`` the recurrence token by token.

    ``h_t = e^{A dt_t} h_{t-1} + dt_t B_t u_t``, ``y_t = C_t h_t + D u_t`` (per channel, head and group).
    """
    batch, length, channels = f.x.shape
    u = f.ssm_input
    per_group = f.num_heads // f.B.shape[2]
    y = torch.zeros_like(u)
    for b in range(batch):
        state = torch.zeros(channels, f.B.shape[3], dtype=u.dtype)
        for t in range(length):
            for d in range(channels):
                h = d // f.head_dim
                g = h // per_group
                dt = f.dt[b, t, h]
                state[d] = torch.exp(f.A[h] * dt) * state[d] + dt * f.B[b, t, g] * u[b, t, d]
                y[b, t, d] = state[d] @ f.C[b, t, g] + f.D[h] * u[b, t, d]
    return y
