"""Fast Mamba aggregates: the signed channel mean as factorised products, and single rows.

Every Mamba variant has the form, per channel ``d`` (see :mod:`.operator`)::

    A_d[i, j] = row_d[i] * sum_s taps_d[K-1-s] * T_d[i, j+s],   T_d = (S_d + D_d I) diag(col_d)

with ``row = silu(z)`` (or 1), ``col = sigmoid(c) * mask`` (or the mask, or 1), ``taps`` the conv
(or the single tap 1) and ``S_d[i, j] = sum_n C_i[n] B_j[n] dt_j[d] exp(A[d, n] (s_i[d] - s_j[d]))``
with ``s = cumsum(dt)``.

**Signed mean.** Far from the diagonal (``i - j >= K``) every conv tap is causal and the D term is
absent, so on a tile of rows ``I`` and key columns ``J`` with a reference ``r``

    mean_d A_d[i, j] = (1/E) sum_{d, n} Q[i, (d, n)] Kc[j, (d, n)]
    Q[i, (d, n)]  = row_d[i] C_i[n] exp(A[d, n] (s_i[d] - r[d]))
    Kc[j, (d, n)] = sum_s taps_d[K-1-s] col_d[j+s] dt_{j+s}[d] B_{j+s}[n] exp(A[d, n] (r[d] - s_{j+s}[d]))

a ``[|I|, E*N] x [E*N, |J|]`` matrix product. The lower triangle is tiled hierarchically (sibling
blocks of a binary tree, one batched product per level) with ``r`` at the boundary of each tile,
so both exponents are <= 0 and nothing overflows at any length (an exponential that underflows
belongs to an entry that is itself below the float range). The band near the diagonal is computed
from short windows of the sequence, since an entry ``A[i, j]`` only depends on the tokens ``j..i``:
factorised around each window's midpoint when that is safe for the dtype, exactly otherwise.

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


#: Largest exponent magnitude a factorised window may hold (exp stays far from overflow).
_SAFE_EXPONENT = {torch.float32: 60.0, torch.float64: 600.0}


def _subset(f: MambaFactors, index: torch.Tensor) -> MambaFactors:
    """The stacked windows ``index`` (on the batch dimension)."""
    return replace(f, x=f.x[index], z=f.z[index], conv_out=f.conv_out[index], mask=f.mask[index],
                   dt=f.dt[index], B=f.B[index], C=f.C[index])


def window_means(f: MambaFactors, variant: str, chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``[Bw, W, W]`` signed channel means of short windows, factorised around each window's midpoint.

    Within a window ``exp(A (s_i - s_j)) = exp(A (s_i - r)) exp(A (r - s_j))`` with ``r`` the
    midpoint of the window's cumulative steps, so each factor's exponent is at most
    ``|A| * span / 2``; the band then costs matrix products instead of ``W^2 E N`` exponentials.
    Windows where that bound is too large for the dtype are computed exactly instead.
    """
    batch, size, channels = f.x.shape
    state, width = f.A.shape[1], f.conv_weight.shape[1]
    dtype, device = f.x.dtype, f.x.device
    row, col, taps, use_D = variant_parts(f, variant)
    width = taps.shape[1]
    cums = f.dt.to(torch.float64).cumsum(dim=1)                               # [Bw, W, E]
    mid = (cums[:, :1] + cums[:, -1:]) / 2
    rel = (cums - mid).to(dtype)                                              # [Bw, W, E], |rel| <= span / 2
    bound = rel.abs().amax(dim=1) * f.A.abs().amax(dim=1)                     # [Bw, E]
    unsafe = bound.amax(dim=1) > _SAFE_EXPONENT.get(dtype, 60.0)             # [Bw]
    limit = _SAFE_EXPONENT.get(dtype, 60.0)
    key_scale = f.dt if col is None else f.dt * col
    causal = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    out = torch.zeros(batch, size, size, dtype=dtype, device=device)
    step = max(1, min(channels, chunk_bytes // max(1, 3 * batch * size * state * dtype.itemsize)))
    for c0 in range(0, channels, step):
        ch = slice(c0, min(c0 + step, channels))
        expo = (rel[..., ch, None] * f.A[ch]).clamp(-limit, limit)            # [Bw, W, c, N]
        Q = torch.exp(expo) * f.C[:, :, None, :]
        if row is not None:
            Q = Q * row[..., ch, None]
        keys = torch.exp(-expo) * f.B[:, :, None, :] * key_scale[..., ch, None]
        Q = Q.flatten(2)
        for shift in range(width):
            P = (Q @ (keys * taps[ch, width - 1 - shift, None]).flatten(2).transpose(1, 2)).masked_fill_(~causal, 0)
            out[:, :, : size - shift] += P[:, :, shift:]                     # out[i, j] += S-part[i, j + s]
    if use_D:
        diag = f.D if row is None else f.D * row                              # [Bw, W, E]
        if col is not None:
            diag = diag * col
        for shift in range(min(width, size)):
            band = (diag * taps[:, width - 1 - shift]).sum(dim=-1)            # [Bw, W]: entry (i, i - s)
            out.diagonal(offset=-shift, dim1=-2, dim2=-1).add_(band[:, shift:])
    out /= channels
    if unsafe.any():
        index = unsafe.nonzero().reshape(-1)
        out[index] = exact_channel_mean(_subset(f, index), variant, chunk_bytes)
    return out


def default_block(f: MambaFactors, width: int, largest: int = 32, smallest: int = 4,
                  unsafe_fraction: float = 0.1) -> int:
    """Band width ``T``: the largest power of two (<= ``largest``) whose windows mostly factorise.

    A window of ``T + K - 1`` tokens factorises around its midpoint when ``max|A| * span / 2``
    stays below the dtype's limit; the others are computed exactly, which costs more. Large
    steps ``dt`` therefore call for narrower windows: take the widest ``T`` with at most
    ``unsafe_fraction`` of its windows unsafe.
    """
    batch, length, _ = f.x.shape
    cums = torch.cat([f.dt.new_zeros(batch, 1, f.dt.shape[2]), f.dt.to(torch.float64).cumsum(dim=1)], dim=1)
    max_rate = f.A.abs().amax(dim=1).to(torch.float64)                          # [E]
    limit = _SAFE_EXPONENT.get(f.x.dtype, 60.0)
    block = largest
    while block > smallest:
        starts = torch.arange(0, length, block, device=cums.device)
        stops = (starts + block + width - 1).clamp(max=length)
        span = cums[:, stops] - cums[:, starts]                                  # [B, nb, E]
        unsafe = ((span * max_rate / 2).amax(dim=-1) > limit).double().mean()
        if float(unsafe) <= unsafe_fraction:
            return block
        block //= 2
    return block


def _scatter_tiles(out: torch.Tensor, tiles: torch.Tensor, row_starts: torch.Tensor,
                   col_starts: torch.Tensor) -> None:
    """Write ``tiles [B, P, R, S]`` at ``out[:, r_k + a, c_k + b]`` in one indexed copy, cropping at ``L``."""
    length = out.shape[-1]
    rows = row_starts[:, None, None] + torch.arange(tiles.shape[2], device=out.device)[None, :, None]
    cols = col_starts[:, None, None] + torch.arange(tiles.shape[3], device=out.device)[None, None, :]
    rows, cols = torch.broadcast_tensors(rows, cols)
    inside = (rows < length) & (cols < length)
    linear = (rows * length + cols)[inside]
    out.view(out.shape[0], -1)[:, linear] = tiles[:, inside]


def signed_mean(f: MambaFactors, variant: str, block: int | None = None,
                chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``[B, L, L]`` the signed channel mean of ``variant``'s matrices, never holding ``[C, L, L]``.

    Hierarchical tiling of the lower triangle, in the row coordinate ``i' = i - (K - 1)``:

    - the band (rows up to ``K - 1`` past each key block of width ``T = block``) comes from short
      windows (:func:`window_means`);
    - the rest is tiled by sibling pairs of a binary hierarchy: at level ``l`` (size
      ``S = T 2^l``) the key block ``[p, p + S)`` meets the rows ``[p + S + K - 1, p + 2S + K - 1)``.
      With the reference ``r`` at the last token the keys touch, both exponentials of a pair are
      ``<= 1`` whatever the length, and every pair of a level is one batched matrix product.

    Costs ``O(L^2 E N)`` multiply-adds in matrix products, ``O(L log(L) E N)`` exponentials and
    ``O(L T E N)`` for the band. ``chunk_bytes`` bounds each temporary.
    """
    batch, length, channels = f.x.shape
    state = f.A.shape[1]
    dtype, device = f.x.dtype, f.x.device
    row, col, taps, _ = variant_parts(f, variant)
    width = taps.shape[1]
    block = block or default_block(f, width)
    blocks = -(-length // block)
    size = block + width - 1

    # 1. the band: channel means of every window, all windows at once
    stacked, _ = _windows(f, block, width)
    near = window_means(stacked, variant, chunk_bytes).reshape(batch, blocks, size, size)
    out = torch.zeros(batch, length, length, dtype=dtype, device=device)
    starts = torch.arange(blocks, device=device) * block
    _scatter_tiles(out, near[..., :block], starts, starts)

    # 2. sibling pairs of the hierarchy, one level at a time
    levels = []
    span = block
    while span + width - 1 < length:            # a pair needs at least one row inside the sequence
        levels.append(span)
        span *= 2
    if not levels:
        return out
    pad = levels[-1] + width          # rows of the last pair may run past the end (cropped below)

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)

    cums = padded(f.dt.to(torch.float64)).cumsum(dim=1)                      # [B, Lp, E]
    key_scale = padded(f.dt if col is None else f.dt * col)
    row_scale = None if row is None else padded(row)
    B_p, C_p = padded(f.B), padded(f.C)
    for S in levels:
        starts = torch.arange(0, length - S - width + 1, 2 * S, device=device)   # pairs with rows in range
        pairs = len(starts)
        if pairs == 0:
            continue
        offsets = torch.arange(S, device=device)
        key_tok = starts[:, None] + offsets                                  # [P, S]
        key_tok_ext = starts[:, None] + torch.arange(S + width - 1, device=device)
        row_tok = key_tok + S + width - 1                                    # [P, S]
        ref = cums[:, starts + S + width - 2]                                # [B, P, E]
        result = torch.zeros(batch, pairs, S, S, dtype=dtype, device=device)
        step = max(1, min(channels, chunk_bytes // max(1, 3 * batch * pairs * S * state * dtype.itemsize)))
        for c0 in range(0, channels, step):
            ch = slice(c0, min(c0 + step, channels))
            A = f.A[ch]
            q_exp = (cums[:, row_tok, ch] - ref[:, :, None, ch]).to(dtype)[..., None] * A   # [B, P, S, c, N] >= 0 * A
            Q = torch.exp(q_exp) * C_p[:, row_tok, None, :]
            if row_scale is not None:
                Q = Q * row_scale[:, row_tok, ch, None]
            # every key token the pair's conv taps touch, once: [B, P, S + K - 1, c, N]
            tok = key_tok_ext
            k_exp = (ref[:, :, None, ch] - cums[:, tok, ch]).to(dtype)[..., None] * A
            touched = torch.exp(k_exp) * B_p[:, tok, None, :] * key_scale[:, tok, ch, None]
            keys = touched[:, :, : S] * taps[ch, width - 1, None]
            for shift in range(1, width):
                keys += touched[:, :, shift: shift + S] * taps[ch, width - 1 - shift, None]
            result += Q.flatten(3) @ keys.flatten(3).transpose(-1, -2)
        result /= channels
        _scatter_tiles(out, result, starts + S + width - 1, starts)
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
