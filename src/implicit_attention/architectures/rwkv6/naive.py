"""Slow, obviously-correct RWKV-6 implicit attention: the test oracle for :mod:`.operator`.

Python loops over batch, heads, channels and matrix entries, written straight from the equations
(decays as explicit products of ``w_s``, not sums of logs); only for tiny inputs. The group-norm
and gate assembly (:func:`naive_heads_operator`) is shared with RWKV-7.
"""

from __future__ import annotations

import math

import torch

from .operator import Rwkv6Factors


def naive_rwkv6_attention(f: Rwkv6Factors) -> torch.Tensor:
    """``[B, H, L, L]``: ``A[i, j] = sum_n r_i[n] (prod_{s=j+1..i-1} w_s[n]) k_j[n]``, ``A[i, i] = sum_n r_i u k_i``."""
    batch, length, heads, size = f.r.shape
    A = torch.zeros(batch, heads, length, length, dtype=f.r.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                for j in range(i + 1):
                    total = 0.0
                    for n in range(size):
                        if j == i:
                            weight = float(f.u[h, n])
                        else:
                            weight = 1.0
                            for s in range(j + 1, i):
                                weight *= math.exp(float(f.log_w[b, s, h, n]))
                        total += float(f.r[b, i, h, n]) * weight * float(f.k[b, j, h, n])
                    A[b, h, i, j] = total
    return A


def naive_heads_operator(attention: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, gn_weight: torch.Tensor,
                         gn_bias: torch.Tensor, gn_eps: float, bonus: torch.Tensor | None, variant: str):
    """``(matrices [B, C, L, L], values [B, L, C], offset [B, L, C])`` of ``variant``, channel by channel.

    ``out_i[c] = g_i[c] (gamma_c (o_i[c] - mean_h o_i) / sigma_i + beta_c + bonus_i v_i[c])`` with
    ``o_i = sum_j A_h[i, j] v_j``, written as ``sum_j matrix[c, i, j] values_j[c] + offset_i[c]``.
    """
    batch, length, heads, size = v.shape
    channels = heads * size
    matrices = torch.zeros(batch, channels, length, length, dtype=v.dtype)
    values = torch.zeros(batch, length, channels, dtype=v.dtype)
    offset = torch.zeros(batch, length, channels, dtype=v.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                o = [sum(float(attention[b, h, i, j]) * float(v[b, j, h, n]) for j in range(length))
                     for n in range(size)]
                mean_o = sum(o) / size
                sigma = math.sqrt(sum((x - mean_o) ** 2 for x in o) / size + gn_eps)
                mean_v_i = sum(float(v[b, i, h, n]) for n in range(size)) / size
                for n in range(size):
                    c = h * size + n
                    g = float(gate[b, i, c])
                    if variant == "wkv":
                        values[b, i, c] = v[b, i, h, n]
                        for j in range(length):
                            matrices[b, c, i, j] = attention[b, h, i, j]
                        continue
                    values[b, i, c] = float(v[b, i, h, n]) - mean_v_i
                    extra = 0.0 if bonus is None else float(bonus[b, i, h])
                    for j in range(length):
                        matrices[b, c, i, j] = g * float(gn_weight[c]) / sigma * float(attention[b, h, i, j])
                    matrices[b, c, i, i] += g * extra
                    offset[b, i, c] = g * (float(gn_bias[c]) + extra * mean_v_i)
    return matrices, values, offset


def naive_rwkv6(f: Rwkv6Factors, variant: str):
    """``(matrices [B, C, L, L], values [B, L, C], offset [B, L, C])`` of ``variant`` from the loops above."""
    return naive_heads_operator(naive_rwkv6_attention(f), f.v, f.gate, f.gn_weight, f.gn_bias, f.gn_eps,
                                None, variant)
