"""Slow, obviously-correct RWKV-4 implicit attention: the test oracle for :mod:`.operator`.

Python loops over batch, channel and matrix entries straight from the equations of the module
docstring of :mod:`.operator`; only for tiny inputs. Same inputs and outputs as the fast path.
"""

from __future__ import annotations

import math

import torch

from .operator import RwkvFactors


def naive_wkv_matrix(f: RwkvFactors, b: int, c: int) -> torch.Tensor:
    """``[L, L]`` ``alpha[t, j] = exp(l[t, j]) / sum_{j' <= t} exp(l[t, j'])``, by log-sum-exp."""
    length = f.key.shape[1]
    alpha = torch.zeros(length, length, dtype=f.key.dtype)
    w, u = float(f.decay[c]), float(f.first[c])
    for t in range(length):
        logits = [(t - 1 - j) * w + float(f.key[b, j, c]) for j in range(t)] + [u + float(f.key[b, t, c])]
        top = max(logits)
        total = sum(math.exp(x - top) for x in logits)
        for j, x in enumerate(logits):
            alpha[t, j] = math.exp(x - top) / total
    return alpha


def naive_shift_matrix(length: int, dtype: torch.dtype) -> torch.Tensor:
    """``[L, L]`` the token shift ``S`` with ``(S q)_t = q_{t-1}`` (``S[t, t - 1] = 1``)."""
    S = torch.zeros(length, length, dtype=dtype)
    for t in range(1, length):
        S[t, t - 1] = 1.0
    return S


def naive_rwkv(f: RwkvFactors, variant: str) -> torch.Tensor:
    """Matrices ``[B, C, L, L]`` of ``variant`` (``[B, 2C, L, L]`` for ``unified``), one channel at a time."""
    batch, length, channels = f.key.shape
    streams = 2 if variant == "unified" else 1
    out = torch.zeros(batch, streams * channels, length, length, dtype=f.key.dtype)
    S = naive_shift_matrix(length, f.key.dtype)
    for b in range(batch):
        for c in range(channels):
            alpha = naive_wkv_matrix(f, b, c)
            gated = alpha if variant == "wkv" else torch.diag(f.receptance[b, :, c]) @ alpha
            out[b, c] = gated
            if variant == "unified":          # v = p + S q: the q stream goes through alpha S
                out[b, channels + c] = gated @ S
    return out


def naive_wkv_recurrence(f: RwkvFactors) -> torch.Tensor:
    """``[B, L, C]`` the WKV output by the module's own stabilised recurrence (numerator, denominator, max)."""
    batch, length, channels = f.key.shape
    out = torch.zeros(batch, length, channels, dtype=f.key.dtype)
    for b in range(batch):
        for c in range(channels):
            num, den, top = 0.0, 0.0, -1e38
            w, u = float(f.decay[c]), float(f.first[c])
            for t in range(length):
                k, v = float(f.key[b, t, c]), float(f.value[b, t, c])
                m = max(top, u + k)
                e1, e2 = math.exp(top - m), math.exp(u + k - m)
                out[b, t, c] = (e1 * num + e2 * v) / (e1 * den + e2)
                m = max(top + w, k)
                e1, e2 = math.exp(top + w - m), math.exp(k - m)
                num, den, top = e1 * num + e2 * v, e1 * den + e2, m
    return out
