"""Slow, obviously-correct Mamba implicit attention: the test oracle for :mod:`.operator`.

Python loops over batch, channel and matrix entries, written straight from the equations of the
formulation page; only for tiny inputs. Same inputs and outputs as the fast path.
"""

from __future__ import annotations

import math

import torch

from .operator import MambaFactors


def naive_s6_matrix(f: MambaFactors, b: int, d: int) -> torch.Tensor:
    """``[L, L]`` ``S_d[i, j] = sum_n C_i[n] exp(A[d, n] sum_{k=j+1..i} dt_k) dt_j B_j[n]``."""
    length = f.x.shape[1]
    S = torch.zeros(length, length, dtype=f.x.dtype)
    for i in range(length):
        for j in range(i + 1):
            decay_sum = float(f.dt[b, j + 1: i + 1, d].sum())
            total = 0.0
            for n in range(f.A.shape[1]):
                total += float(f.C[b, i, n]) * math.exp(float(f.A[d, n]) * decay_sum) * float(f.B[b, j, n])
            S[i, j] = total * float(f.dt[b, j, d])
    return S


def naive_conv_matrix(f, d: int) -> torch.Tensor:
    """``[L, L]`` the causal depthwise conv as a matrix: ``M[i, j] = w[K-1-(i-j)]``, ``0 <= i-j < K``.

    ``f`` is any factors object with ``x [B, L, E]`` and ``conv_weight [E, K]`` (Mamba, Mamba-2).
    """
    length, width = f.x.shape[1], f.conv_weight.shape[1]
    M = torch.zeros(length, length, dtype=f.x.dtype)
    for i in range(length):
        for j in range(length):
            if 0 <= i - j <= width - 1:
                M[i, j] = f.conv_weight[d, width - 1 - (i - j)]
    return M


def naive_mamba(f: MambaFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices ``[B, E, L, L]`` and offset ``[B, L, E]`` of ``variant``, one channel at a time."""
    batch, length, channels = f.x.shape
    matrices = torch.zeros(batch, channels, length, length, dtype=f.x.dtype)
    offset = torch.zeros(batch, length, channels, dtype=f.x.dtype)
    identity = torch.eye(length, dtype=f.x.dtype)
    ones = torch.ones(length, dtype=f.x.dtype)
    for b in range(batch):
        mask = f.mask[b]
        for d in range(channels):
            S = naive_s6_matrix(f, b, d)
            if variant == "s6":
                matrices[b, d] = S
                continue
            gate = torch.diag(torch.nn.functional.silu(f.z[b, :, d]))
            act = torch.diag(torch.sigmoid(f.conv_out[b, :, d]) * mask)
            M = naive_conv_matrix(f, d)
            if variant == "no_gate":
                gate = identity
            if variant == "no_act":
                act = torch.diag(mask)
            if variant == "no_conv":
                M = identity
            core = gate @ (S + f.D[d] * identity) @ act
            matrices[b, d] = core @ M
            if variant != "no_conv" and f.conv_bias is not None:
                offset[b, :, d] = core @ (f.conv_bias[d] * ones)
    return matrices, offset
