"""Slow, obviously-correct Mamba implicit attention: the test oracle for :mod:`.operator`.

Python loops over batch, channel and matrix entries, written straight from the equations in the
module docstring of :mod:`.operator`; only for tiny inputs. Same inputs and outputs as the fast path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..primitives import naive_conv_matrix
from .operator import MambaFactors, ScanFactors


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


def naive_gated_conv(f: ScanFactors, variant: str, scan_matrix: Callable[[int, int], torch.Tensor],
                     skip: Callable[[int], float], row_scale: torch.Tensor | None = None):
    """Matrices ``[B, E, L, L]`` and offset ``[B, L, E]`` of ``variant``, one channel at a time, from
    ``scan_matrix(b, d) [L, L]`` and ``skip(d)``: ``diag(row silu z) (S + D I) diag(sigmoid(c) mask) M``
    (shared by Mamba and Mamba-2; ``row_scale [B, L, E]`` is Mamba-2's gated-norm scale)."""
    batch, length, channels = f.x.shape
    matrices = torch.zeros(batch, channels, length, length, dtype=f.x.dtype)
    offset = torch.zeros(batch, length, channels, dtype=f.x.dtype)
    identity = torch.eye(length, dtype=f.x.dtype)
    ones = torch.ones(length, dtype=f.x.dtype)
    for b in range(batch):
        mask = f.mask[b]
        for d in range(channels):
            S = scan_matrix(b, d)
            if variant == f.scan_variant:
                matrices[b, d] = S
                continue
            gate = torch.diag(torch.nn.functional.silu(f.z[b, :, d]))
            scale = identity if row_scale is None else torch.diag(row_scale[b, :, d])
            act = torch.diag(torch.sigmoid(f.conv_out[b, :, d]) * mask)
            M = naive_conv_matrix(f.conv_weight, d, length)
            if variant == "no_gate":
                gate = identity
            if variant == "no_act":
                act = torch.diag(mask)
            if variant == "no_conv":
                M = identity
            core = scale @ gate @ (S + skip(d) * identity) @ act
            matrices[b, d] = core @ M
            if variant != "no_conv" and f.conv_bias is not None:
                offset[b, :, d] = core @ (f.conv_bias[d] * ones)
    return matrices, offset


def naive_mamba(f: MambaFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices ``[B, E, L, L]`` and offset ``[B, L, E]`` of ``variant``, one channel at a time."""
    return naive_gated_conv(f, variant, lambda b, d: naive_s6_matrix(f, b, d), lambda d: float(f.D[d]))
