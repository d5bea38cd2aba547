"""Slow, obviously-correct RWKV-7 implicit attention: the test oracle for :mod:`.operator`.

``A_h[i, j] = k_j^T (G_{j+1} ... G_i) r_i`` with every transition ``G_s = diag(w_s) + alpha_s^T beta_s``
built as an explicit ``N x N`` matrix and multiplied out in a loop; only for tiny inputs.
"""

from __future__ import annotations

import torch

from ..rwkv6.naive import naive_heads_operator
from .operator import Rwkv7Factors


def naive_transition(f: Rwkv7Factors, b: int, s: int, h: int) -> torch.Tensor:
    """``[N, N]`` ``G_s = diag(w_s) + alpha_s^T beta_s`` (acting on the state from the right)."""
    return torch.diag(torch.exp(f.log_w[b, s, h])) + torch.outer(f.alpha[b, s, h], f.beta[b, s, h])


def naive_rwkv7_attention(f: Rwkv7Factors) -> torch.Tensor:
    """``[B, H, L, L]`` by explicit products of the transitions, one entry at a time."""
    batch, length, heads, size = f.r.shape
    A = torch.zeros(batch, heads, length, length, dtype=f.r.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                for j in range(i + 1):
                    product = torch.eye(size, dtype=f.r.dtype)
                    for s in range(j + 1, i + 1):
                        product = product @ naive_transition(f, b, s, h)
                    A[b, h, i, j] = f.k[b, j, h] @ product @ f.r[b, i, h]
    return A


def naive_rwkv7(f: Rwkv7Factors, variant: str):
    """``(matrices [B, C, L, L], values [B, L, C], offset [B, L, C])`` of ``variant`` from the loops above."""
    return naive_heads_operator(naive_rwkv7_attention(f), f.v, f.gate, f.gn_weight, f.gn_bias, f.gn_eps,
                                f.bonus, variant)
