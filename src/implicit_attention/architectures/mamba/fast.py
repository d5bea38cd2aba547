"""Fast Mamba aggregates: the signed channel mean as factorised products, and single rows.

Every Mamba variant has the form, per channel ``d`` (see :mod:`.operator`)::

    A_d[i, j] = row_d[i] * sum_s taps_d[K-1-s] * T_d[i, j+s],   T_d = (S_d + D_d I) diag(col_d)

with ``row = silu(z)`` (or 1), ``col = sigmoid(c) * mask`` (or the mask, or 1), ``taps`` the conv
(or the single tap 1) and ``S_d[i, j] = sum_n C_i[n] B_j[n] dt_j[d] exp(A[d, n] (s_i[d] - s_j[d]))``
with ``s = cumsum(dt)``.

**Signed mean.** Far from the diagonal (``i - j >= K``) every conv tap is causal and the D term is
absent, so ``mean_d A_d[i, j] = (1/E) sum_{d, n} Q[i, (d, n)] Kc[j, (d, n)]`` with

    Q[i, (d, n)]  = row_d[i] C_i[n] exp(A[d, n] (s_i[d] - r[d]))
    Kc[j, (d, n)] = sum_s taps_d[K-1-s] col_d[j+s] dt_{j+s}[d] B_{j+s}[n] exp(A[d, n] (r[d] - s_{j+s}[d]))

a ``[L, E*N] x [E*N, T]`` product per block of ``T`` key columns. The reference ``r`` is re-chosen
per key block (the cumulative sum at the last token its keys touch, computed in float64) so that
both exponents are <= 0: nothing overflows at any length, and an exponential that underflows
belongs to an entry that is itself below the float range. The band near the diagonal (rows up to
``K - 1`` past each key block) is computed exactly from a window of the sequence, since an
operator entry ``A[i, j]`` only depends on the tokens ``j..i``.

**Rows.** ``A_d[i, :]`` for a few rows ``i`` costs ``O(L * E * N)`` each: the exponents
``s_i - s_j`` are all >= 0 and need no re-referencing.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .operator import MambaFactors, mamba_block

_DEFAULT_CHUNK_BYTES = 256 * 2**20


def variant_parts(f: MambaFactors, variant: str):
    """``(row [B, L, E] | None, col [B, L, E] | None, taps [E, K], use_D)`` of ``variant``."""
    row = f.out_gate if variant in ("unified", "no_conv", "no_act") else None
    if variant in ("unified", "no_conv", "no_gate"):
        col = f.act_gate
    elif variant == "no_act":
        col = f.mask[..., None].expand_as(f.x)
    else:
        col = None
    if variant in ("unified", "no_gate", "no_act"):
        taps = f.conv_weight
    else:
        taps = torch.ones(f.x.shape[-1], 1, dtype=f.x.dtype, device=f.x.device)
    return row, col, taps, variant != "s6"


def window(f: MambaFactors, start: int, stop: int) -> MambaFactors:
    """The factors of tokens ``[start, stop)``: the operator restricted to them is their operator."""
    sl = slice(start, stop)
    return replace(f, x=f.x[:, sl], z=f.z[:, sl], conv_out=f.conv_out[:, sl], mask=f.mask[:, sl],
                   dt=f.dt[:, sl], B=f.B[:, sl], C=f.C[:, sl])


def exact_channel_mean(f: MambaFactors, variant: str, chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``[B, L, L]`` signed channel mean by materialising channel blocks (the direct way)."""
    batch, length, channels = f.x.shape
    step = max(1, min(channels, chunk_bytes // max(1, 5 * batch * length * length * f.x.dtype.itemsize)))
    total = torch.zeros(batch, length, length, dtype=f.x.dtype, device=f.x.device)
    for start in range(0, channels, step):
        block, _ = mamba_block(f, slice(start, min(start + step, channels)), variant)
        total += block.sum(dim=1)
    return total / channels


def _windows(f: MambaFactors, block: int, width: int) -> tuple[MambaFactors, int]:
    """Factors of the windows ``[J*T, J*T + T + K - 1)`` of every key block, stacked on the batch.

    The sequence is zero-padded at the end (padding after a window's valid entries cannot change
    them: ``A[i, j]`` depends only on tokens ``j..i``). Returns the stacked factors
    ``[B * nb, W, .]`` and the number of blocks ``nb``.
    """
    length = f.x.shape[1]
    blocks = -(-length // block)
    size = block + width - 1
    pad = blocks * block + width - 1 - length

    def stack(t: torch.Tensor) -> torch.Tensor:           # [B, L, ...] -> [B * nb, W, ...]
        t = torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)
        w = t.unfold(1, size, block)                      # [B, nb, ..., W]
        w = w.movedim(-1, 2)                              # [B, nb, W, ...]
        return w.reshape(-1, *w.shape[2:])

    stacked = replace(f, x=stack(f.x), z=stack(f.z), conv_out=stack(f.conv_out), mask=stack(f.mask),
                      dt=stack(f.dt), B=stack(f.B), C=stack(f.C))
    return stacked, blocks


def default_block(length: int) -> int:
    """Key-block width balancing the exact band (``L T E N``) and the re-referencing (``L^2 E N / T``)."""
    return int(min(128, max(16, 1 << round(math.log2(math.sqrt(max(length, 1) / 2))))))


def signed_mean(f: MambaFactors, variant: str, block: int | None = None,
                chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``[B, L, L]`` the signed channel mean of ``variant``'s matrices, never holding ``[C, L, L]``.

    ``block`` is the key-block width ``T`` (default :func:`default_block`): the exact band costs
    ``O(L T E N)`` exponentials and the factorised part ``O(L^2 E N / T)`` exponentials plus
    ``O(L^2 E N)`` multiply-adds in matrix products. ``chunk_bytes`` bounds each temporary.
    """
    batch, length, channels = f.x.shape
    state = f.A.shape[1]
    dtype, device = f.x.dtype, f.x.device
    row, col, taps, _ = variant_parts(f, variant)
    width = taps.shape[1]
    block = block or default_block(length)
    blocks = -(-length // block)
    size = block + width - 1

    # 1. the band: exact channel means of every window, all windows at once
    stacked, _ = _windows(f, block, width)
    near = exact_channel_mean(stacked, variant, chunk_bytes).reshape(batch, blocks, size, size)
    padded = torch.zeros(batch, blocks * block + width - 1, blocks * block, dtype=dtype, device=device)
    for J in range(blocks):
        padded[:, J * block: J * block + size, J * block: (J + 1) * block] = near[:, J, :, :block]
    out = padded[:, :length, :length].contiguous()

    # 2. far from the diagonal: rows i >= far_J = (J+1) T + K - 1 for key block J, factorised
    far = [(J + 1) * block + width - 1 for J in range(blocks)]
    todo = [J for J in range(blocks) if far[J] < length]
    if not todo:
        return out
    cums = f.dt.to(torch.float64).cumsum(dim=1)                               # [B, L, E]
    # reference of every key token: the cumulative sum at the last token its block's keys touch
    ref_index = torch.tensor([min(far[j // block], length) - 1 for j in range(length)], device=device)
    ref = cums[:, ref_index]                                                  # [B, L, E]
    key_scale = f.dt if col is None else f.dt * col
    pad = width - 1
    cums_p = torch.cat([cums, cums[:, -1:].expand(batch, pad, channels)], dim=1)
    B_p = torch.cat([f.B, f.B.new_zeros(batch, pad, state)], dim=1)
    scale_p = torch.cat([key_scale, key_scale.new_zeros(batch, pad, channels)], dim=1)
    step = max(1, min(channels, chunk_bytes // max(1, 3 * batch * length * state * dtype.itemsize)))
    for c0 in range(0, channels, step):
        ch = slice(c0, min(c0 + step, channels))
        A = f.A[ch]                                                           # [c, N]
        keys = torch.zeros(batch, length, ch.stop - ch.start, state, dtype=dtype, device=device)
        for shift in range(width):
            tok = slice(shift, shift + length)
            k_exp = (ref[..., ch] - cums_p[:, tok, ch]).to(dtype)[..., None] * A  # <= 0 for valid keys
            keys += (torch.exp(k_exp) * B_p[:, tok, None, :]
                     * (scale_p[:, tok, ch] * taps[ch, width - 1 - shift])[..., None])
        keys = keys.flatten(2)                                                # [B, L, c*N]
        for J in todo:
            rows = slice(far[J], length)
            q_exp = (cums[:, rows, ch] - cums[:, far[J] - 1, None, ch]).to(dtype)[..., None] * A
            Q = torch.exp(q_exp) * f.C[:, rows, None, :]
            if row is not None:
                Q = Q * row[:, rows, ch, None]
            out[:, rows, J * block: (J + 1) * block] += (
                Q.flatten(2) @ keys[:, J * block: (J + 1) * block].transpose(1, 2)) / channels
    return out


def matrix_rows(f: MambaFactors, variant: str, rows: torch.Tensor) -> torch.Tensor:
    """``[B, R, E, L]`` rows ``rows`` (``[R]`` indices) of every channel's matrix, in ``O(R L E N)``."""
    batch, length, channels = f.x.shape
    row_scale, col, taps, use_D = variant_parts(f, variant)
    width = taps.shape[1]
    cums = f.dt.to(torch.float64).cumsum(dim=1)                              # [B, L, E]
    gap = (cums[:, rows, None, :] - cums[:, None, :, :]).to(f.x.dtype)        # [B, R, L, E]  s_i - s_j
    positions = torch.arange(length, device=f.x.device)
    causal = positions[None, :] <= rows[:, None]                             # [R, L]
    T = torch.zeros(batch, len(rows), length, channels, dtype=f.x.dtype, device=f.x.device)
    for n in range(f.A.shape[1]):
        T += torch.exp(gap.clamp(min=0) * f.A[:, n]) * (f.C[:, rows, None, None, n] * f.B[:, None, :, None, n])
    T *= f.dt[:, None]
    if use_D:
        T += (positions[None, :] == rows[:, None])[None, :, :, None] * f.D
    if col is not None:
        T *= col[:, None]
    T = T * causal[None, :, :, None]
    out = T * taps[:, width - 1]
    for shift in range(1, min(width, length)):
        out[:, :, : length - shift] += T[:, :, shift:] * taps[:, width - 1 - shift]
    if row_scale is not None:
        out = out * row_scale[:, rows, None, :]
    return out.permute(0, 1, 3, 2)
