"""Slow, obviously-correct delta-rule implicit attention: the test oracle for :mod:`.operator`.

``A_h[i, j] = beta_j k_j^T F_{j+1}^T ... F_i^T q_i`` with every transition ``F_t^T = Diag(alpha_t)
(I - beta_t k_t k_t^T)`` built as an explicit ``Dk x Dk`` matrix and multiplied out in a loop; the
recurrence token by token; the per-channel operators as products of explicit ``L x L`` matrices.
Only for tiny inputs.
"""

from __future__ import annotations

import torch

from ..primitives import naive_conv_matrix
from .operator import DeltaFactors


def naive_transition(f: DeltaFactors, b: int, t: int, h: int) -> torch.Tensor:
    """``[Dk, Dk]`` ``F_t^T = Diag(alpha_t) (I - beta_t k_t k_t^T)``."""
    k = f.k[b, t, h]
    alpha = torch.exp(f.log_decay[b, t, h]).expand_as(k)
    return torch.diag(alpha) @ (torch.eye(k.shape[0], dtype=k.dtype) - f.beta[b, t, h] * torch.outer(k, k))


def naive_delta_attention(f: DeltaFactors) -> torch.Tensor:
    """``[B, H, L, L]`` by explicit products of the transitions, one entry at a time."""
    batch, length, heads, size = f.k.shape
    A = torch.zeros(batch, heads, length, length, dtype=f.k.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                for j in range(i + 1):
                    product = torch.eye(size, dtype=f.k.dtype)
                    for t in range(j + 1, i + 1):
                        product = product @ naive_transition(f, b, t, h)
                    A[b, h, i, j] = f.beta[b, j, h] * (f.k[b, j, h] @ product @ f.q[b, i, h])
    return A


def naive_recurrence(f: DeltaFactors, values: torch.Tensor) -> torch.Tensor:
    """``[B, L, H, Dv]`` the recurrence token by token on ``values [B, L, H, Dv]``, as the module's
    ``torch_recurrent_gated_delta_rule`` writes it: decay, correct along ``k``, read with ``q``."""
    batch, length, heads, size = f.k.shape
    out = torch.zeros_like(values)
    for b in range(batch):
        for h in range(heads):
            S = torch.zeros(size, values.shape[-1], dtype=values.dtype)
            for t in range(length):
                S = torch.exp(f.log_decay[b, t, h])[:, None] * S
                k = f.k[b, t, h]
                S = S + torch.outer(k, f.beta[b, t, h] * (values[b, t, h] - S.T @ k))
                out[b, t, h] = S.T @ f.q[b, t, h]
    return out


def naive_delta(f: DeltaFactors, variant: str, attention: torch.Tensor | None = None):
    """Matrices ``[B, C, L, L]`` and offset ``[B, L, C]`` of ``variant``, one channel at a time:
    ``diag(row) A_h diag(sigmoid m) M`` and its conv-bias offset, from explicit matrices."""
    A = naive_delta_attention(f) if attention is None else attention
    batch, length, channels = f.x.shape
    matrices = torch.zeros(batch, channels, length, length, dtype=f.x.dtype)
    offset = torch.zeros(batch, length, channels, dtype=f.x.dtype)
    for b in range(batch):
        for c in range(channels):
            h = c // f.head_v
            core = A[b, h]
            if variant == "delta":
                matrices[b, c] = core
                continue
            row = f.norm_weight[c] * f.norm_scale[b, :, h] * (1.0 if variant == "no_gate" else f.gate[b, :, c])
            column = torch.ones(length, dtype=f.x.dtype) if variant == "no_act" else torch.sigmoid(f.conv_out[b, :, c])
            left = torch.diag(row) @ core @ torch.diag(column)
            conv = torch.eye(length, dtype=f.x.dtype) if variant == "no_conv" else \
                naive_conv_matrix(f.conv_weight, c, length)
            matrices[b, c] = left @ conv
            if variant != "no_conv" and f.conv_bias is not None:
                offset[b, :, c] = left @ (f.conv_bias[c] * torch.ones(length, dtype=f.x.dtype))
    return matrices, offset
