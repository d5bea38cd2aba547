"""Fused GPU kernels for the Mamba signed channel mean (Triton): the plan of :mod:`.fast`, fused.

Three kernels, in the row coordinate ``i' = i - (K - 1)`` (``K`` the conv width):

- ``_factors_kernel`` writes, once per level and channel chunk, the row factors ``Q`` and key
  factors ``Kc`` (``[B, L, c, N]``, float32) of every block, each block referenced at its own
  boundary: the token before row block ``I`` (``r``) and the last token key block ``J``'s conv taps
  touch (``e``)::

      Q[i, (d, n)]  = row_d[i] C_i[n] exp(A[d, n] (s_i[d] - s_r[d]))
      Kc[j, (d, n)] = sum_s taps_d[K-1-s] key_d[j+s] B_{j+s}[n] exp(A[d, n] (s_e[d] - s_{j+s}[d]))

- ``_tiles_kernel`` computes each tile (``i'`` block after ``j`` block, so ``e <= r``) as
  ``sum_k Q[i, k] exp(A_k (s_r - s_e)) Kc[j, k]``, a matrix product with the decay between the two
  blocks applied on the fly. Every exponent is ``<= 0`` whatever the length. Tiles of 64 cover
  every pair of 64-blocks, tiles of 16 the pairs of 16-blocks inside one 64-block.
- ``_band_kernel`` computes the band left over (``i' < 16 (j // 16 + 1)``, at most ``16 + K - 1``
  diagonals) exactly, one exponential per ``(i, k, d, n)``, so no reference is needed there.

Cumulative steps ``s`` are float64 (their differences lose no digits at 16k tokens); everything
else is float32. ``tl.dot`` runs in TF32x3 (three TF32 products per float32 product) unless the
caller asks for ``"ieee"``.
"""

from __future__ import annotations

import math
import os

import torch

from .tiling import band_entries, tile_pairs

try:  # Triton is optional: the eager path in .fast serves every other case
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

#: Tile sizes of the hierarchy, largest first; the band covers what the smallest leaves.
TILE_SIZES: tuple[int, ...] = (64, 16)


def available(tensor: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``tensor``'s device and dtype (float32, CUDA)."""
    if triton is None or tensor.dtype != torch.float32:
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _factors_kernel(q_ptr, k_ptr, cums_ptr, key_ptr, row_ptr, b_ptr, c_ptr, a_ptr, taps_ptr,
                        length, channels, first, count,
                        STATE: tl.constexpr, NP: tl.constexpr, WIDTH: tl.constexpr, BT: tl.constexpr,
                        BL: tl.constexpr, BD: tl.constexpr, HAS_ROW: tl.constexpr):
        """Row and key factors of tokens ``[BL * pid, BL * (pid + 1))``, channels ``first + [0, count)``.

        ``Q[i, d, n] = row_d[i] C_i[n] 2^(a (s_i - s_r))`` with ``r = I BT + K - 2`` the token before
        row block ``I`` (``i' = i - K + 1`` in it); ``Kc[j, d, n] = sum_s tap key B 2^(a (s_e - s_{j+s}))``
        with ``e = J BT + BT + K - 2`` the last token key block ``J`` touches. Both ``[B, L, count, N]``.
        """
        block, batch, dblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tok = block * BL + tl.arange(0, BL)
        local = dblock * BD + tl.arange(0, BD)
        d = first + local
        n = tl.arange(0, NP)
        tok_ok = tok < length
        d_ok = local < count
        n_ok = n < STATE
        seq = batch.to(tl.int64) * length
        ok = tok_ok[:, None] & d_ok[None, :]
        a = tl.load(a_ptr + d[:, None] * STATE + n[None, :], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s_tok = tl.load(cums_ptr + (seq + tok)[:, None] * channels + d[None, :], mask=ok, other=0.0)
        # rows: reference just before the token's row block
        ref = tl.maximum(((tok - (WIDTH - 1)) // BT) * BT + WIDTH - 2, 0)
        ref = tl.where(tok >= WIDTH - 1, ref, 0)
        s_ref = tl.load(cums_ptr + (seq + ref)[:, None] * channels + d[None, :], mask=ok, other=0.0)
        gap = tl.where(ok, tl.maximum(s_tok - s_ref, 0.0).to(tl.float32), 0.0)
        scale = tl.where(ok, 1.0, 0.0)
        if HAS_ROW:
            scale = tl.load(row_ptr + (seq + tok)[:, None] * channels + d[None, :], mask=ok, other=0.0)
        c = tl.load(c_ptr + (seq + tok)[:, None] * STATE + n[None, :], mask=tok_ok[:, None] & n_ok[None, :],
                    other=0.0)
        q = tl.exp2(gap[:, :, None] * a[None, :, :]) * (scale[:, :, None] * c[:, None, :])
        out = ((seq + tok)[:, None, None] * count + local[None, :, None]) * STATE + n[None, None, :]
        mask = ok[:, :, None] & n_ok[None, None, :]
        tl.store(q_ptr + out, q, mask=mask)
        # keys: reference at the last token the key block touches (clamped for unused blocks)
        end = tl.minimum((tok // BT) * BT + BT + WIDTH - 2, length - 1)
        s_end = tl.load(cums_ptr + (seq + end)[:, None] * channels + d[None, :], mask=ok, other=0.0)
        kc = tl.zeros([BL, BD, NP], dtype=tl.float32)
        for s in tl.static_range(WIDTH):
            src = tok + s
            sk = ok & (src <= end)[:, None]
            s_src = tl.load(cums_ptr + (seq + src)[:, None] * channels + d[None, :], mask=sk, other=0.0)
            g = tl.where(sk, (s_end - s_src).to(tl.float32), 0.0)                     # >= 0
            w = tl.load(key_ptr + (seq + src)[:, None] * channels + d[None, :], mask=sk, other=0.0)
            tap = tl.load(taps_ptr + d * WIDTH + (WIDTH - 1 - s), mask=d_ok, other=0.0)
            b = tl.load(b_ptr + (seq + src)[:, None] * STATE + n[None, :],
                        mask=(tok_ok & (src < length))[:, None] & n_ok[None, :], other=0.0)
            kc += tl.exp2(g[:, :, None] * a[None, :, :]) * ((w * tap[None, :])[:, :, None] * b[:, None, :])
        tl.store(k_ptr + out, kc, mask=mask)

    @triton.jit
    def _tile_tokens(row_blocks_ptr, col_blocks_ptr, tile, WIDTH: tl.constexpr, BT: tl.constexpr):
        """Tile ``tile``'s row and key tokens (``[BT]`` each, rows in the coordinate ``i' = i - (K - 1)``) and its
        references: ``r`` the token before the row block, ``e`` the last token the key block's taps touch."""
        rb = tl.load(row_blocks_ptr + tile)
        cb = tl.load(col_blocks_ptr + tile)
        offs = tl.arange(0, BT)
        return rb * BT + offs + (WIDTH - 1), cb * BT + offs, rb * BT + WIDTH - 2, cb * BT + BT + WIDTH - 2

    @triton.jit
    def _tiles_kernel(out_ptr, q_ptr, k_ptr, cums_ptr, a_ptr, row_blocks_ptr, col_blocks_ptr,
                      length, channels, first, count, per_split,
                      STATE: tl.constexpr, WIDTH: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr):
        """``out[tile] (+)= sum_k Q[rows, k] 2^(a_k (s_r - s_e)) Kc[cols, k]`` over one split of ``k``.

        ``k = d N + n`` runs over the chunk's channels and states; ``2^(a (s_r - s_e)) <= 1`` carries the
        decay between the key block's reference ``e`` and the row block's ``r >= e``.
        """
        tile, batch, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows, cols, r_tok, e_tok = _tile_tokens(row_blocks_ptr, col_blocks_ptr, tile, WIDTH, BT)
        row_ok = rows < length
        seq = batch.to(tl.int64) * length
        width = count * STATE
        acc = tl.zeros([BT, BT], dtype=tl.float32)
        k_first = split * per_split
        k_stop = tl.minimum(k_first + per_split, width)
        for k0 in range(k_first, k_stop, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < k_stop
            d = first + k // STATE
            s_r = tl.load(cums_ptr + (seq + r_tok) * channels + d, mask=k_ok, other=0.0)
            s_e = tl.load(cums_ptr + (seq + e_tok) * channels + d, mask=k_ok, other=0.0)
            a = tl.load(a_ptr + d * STATE + k % STATE, mask=k_ok, other=0.0)
            decay = tl.exp2(a * (s_r - s_e).to(tl.float32))
            q = tl.load(q_ptr + (seq + rows)[:, None] * width + k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            kc = tl.load(k_ptr + (seq + cols)[:, None] * width + k[None, :], mask=k_ok[None, :], other=0.0)
            acc += tl.dot(q * decay[None, :], tl.trans(kc), input_precision=PRECISION)
        plane = (split * tl.num_programs(1) + batch).to(tl.int64) * length
        where = out_ptr + (plane + rows)[:, None] * length + cols[None, :]
        mask = row_ok[:, None] & (cols < length)[None, :]
        if ACCUMULATE:
            acc += tl.load(where, mask=mask, other=0.0)
        tl.store(where, acc, mask=mask)

    @triton.jit
    def _tiles_reduce_kernel(out_ptr, q_ptr, k_ptr, cums_ptr, a_ptr, row_blocks_ptr, col_blocks_ptr,
                             length, channels, first, count, per_split,
                             STATE: tl.constexpr, NP: tl.constexpr, WIDTH: tl.constexpr, BT: tl.constexpr,
                             HOW: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr):
        """``out[tile] (+)= sum_d f(Q_d[rows] 2^(a_d (s_r - s_e)) Kc_d[cols]^T)`` over one split of the channels.

        Each channel's tile is its own product over the state (``[BT, N] @ [N, BT]``), transformed by
        ``f`` (``HOW``: 0 identity, 1 ``|.|``, 2 ``relu``) in registers before the channel sum.
        """
        tile, batch, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows, cols, r_tok, e_tok = _tile_tokens(row_blocks_ptr, col_blocks_ptr, tile, WIDTH, BT)
        row_ok = rows < length
        col_ok = cols < length
        n = tl.arange(0, NP)
        n_ok = n < STATE
        seq = batch.to(tl.int64) * length
        acc = tl.zeros([BT, BT], dtype=tl.float32)
        d_first = split * per_split
        d_stop = tl.minimum(d_first + per_split, count)
        for local in range(d_first, d_stop):
            d = first + local
            s_r = tl.load(cums_ptr + (seq + r_tok) * channels + d)
            s_e = tl.load(cums_ptr + (seq + e_tok) * channels + d)
            a = tl.load(a_ptr + d * STATE + n, mask=n_ok, other=0.0)
            decay = tl.exp2(a * (s_r - s_e).to(tl.float32))                       # [NP], <= 1
            q = tl.load(q_ptr + ((seq + rows)[:, None] * count + local) * STATE + n[None, :],
                        mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            kc = tl.load(k_ptr + ((seq + cols)[:, None] * count + local) * STATE + n[None, :],
                         mask=col_ok[:, None] & n_ok[None, :], other=0.0)
            t = tl.dot(q * decay[None, :], tl.trans(kc), input_precision=PRECISION)
            if HOW == 1:
                t = tl.abs(t)
            elif HOW == 2:
                t = tl.maximum(t, 0.0)
            acc += t
        plane = (split * tl.num_programs(1) + batch).to(tl.int64) * length
        where = out_ptr + (plane + rows)[:, None] * length + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        if ACCUMULATE:
            acc += tl.load(where, mask=mask, other=0.0)
        tl.store(where, acc, mask=mask)

    @triton.jit
    def _band_kernel(out_ptr, cums_ptr, key_ptr, col_ptr, d_ptr, row_ptr, b_ptr, c_ptr, a_ptr, taps_ptr,
                     length, channels, channels_per_split,
                     STATE: tl.constexpr, WIDTH: tl.constexpr, OFFSETS: tl.constexpr, PAD: tl.constexpr,
                     BI: tl.constexpr, BD: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
                     USE_D: tl.constexpr):
        """Diagonals ``0 .. OFFSETS - 1`` of rows ``[BI * pid, BI * (pid + 1))``: ``out[i, i - o]``."""
        block, batch, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = block * BI + tl.arange(0, BI)
        row_ok = rows < length
        seq = batch.to(tl.int64) * length
        slots = tl.arange(0, PAD)
        acc = tl.zeros([BI, PAD], dtype=tl.float32)
        d_first = split * channels_per_split
        d_stop = tl.minimum(d_first + channels_per_split, channels)
        for d0 in range(d_first, d_stop, BD):
            d = d0 + tl.arange(0, BD)
            d_ok = d < d_stop
            ok = row_ok[:, None] & d_ok[None, :]
            s_row = tl.load(cums_ptr + (seq + rows)[:, None] * channels + d[None, :], mask=ok, other=0.0)
            scale = tl.where(ok, 1.0, 0.0)
            if HAS_ROW:
                scale = tl.load(row_ptr + (seq + rows)[:, None] * channels + d[None, :], mask=ok, other=0.0)
            for offset in range(OFFSETS):
                keys = rows - offset
                kd = ok & (keys >= 0)[:, None]
                s_key = tl.load(cums_ptr + (seq + keys)[:, None] * channels + d[None, :], mask=kd, other=0.0)
                gap = tl.where(kd, (s_row - s_key).to(tl.float32), 0.0)                   # >= 0
                t = tl.zeros([BI, BD], dtype=tl.float32)
                for n in range(STATE):
                    a_n = tl.load(a_ptr + d * STATE + n, mask=d_ok, other=0.0)
                    c_n = tl.load(c_ptr + (seq + rows) * STATE + n, mask=row_ok, other=0.0)
                    b_n = tl.load(b_ptr + (seq + keys) * STATE + n, mask=row_ok & (keys >= 0), other=0.0)
                    t += tl.exp2(gap * a_n[None, :]) * (c_n * b_n)[:, None]
                t = t * tl.load(key_ptr + (seq + keys)[:, None] * channels + d[None, :], mask=kd, other=0.0)
                if USE_D:
                    skip = tl.where(kd, tl.load(d_ptr + d, mask=d_ok, other=0.0)[None, :], 0.0)
                    if HAS_COL:
                        skip = skip * tl.load(col_ptr + (seq + keys)[:, None] * channels + d[None, :],
                                              mask=kd, other=0.0)
                    t += tl.where(offset == 0, skip, 0.0)
                t = t * scale
                for s in tl.static_range(WIDTH):
                    # token k = i - offset feeds entry j = k - s through tap K-1-s
                    tap = tl.load(taps_ptr + d * WIDTH + (WIDTH - 1 - s), mask=d_ok, other=0.0)
                    v = tl.sum(t * tap[None, :], axis=1)
                    v = tl.where(keys - s >= 0, v, 0.0)
                    acc += tl.where(slots[None, :] == offset + s, v[:, None], 0.0)
        plane = (split * tl.num_programs(1) + batch).to(tl.int64) * length
        tl.store(out_ptr + (plane + rows)[:, None] * PAD + slots[None, :], acc, mask=row_ok[:, None])


def _kernel_inputs(dt: torch.Tensor, col: torch.Tensor | None, A: torch.Tensor, *tensors: torch.Tensor | None):
    """``(cums, key, A, tensors)`` as the kernels read them: float64 cumulative steps ``[Bt, L, E]``, the key
    scale ``dt * col``, ``A`` in base 2 (the kernels use exp2) and every other tensor float32 and contiguous
    (``None`` stays ``None``)."""
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    # a scan along the last dimension is much faster than along the middle one
    cums = dt.to(torch.float64).transpose(1, 2).cumsum(dim=-1).transpose(1, 2).contiguous()
    key = f32(dt if col is None else dt * col)
    return cums, key, f32(A.to(torch.float64) * math.log2(math.e)), tuple(f32(t) for t in tensors)


def _level_factors(cums, key, row, B, C, A, taps, chunk_bytes: int, tile_sizes: tuple[int, ...]):
    """Yield ``(size, row blocks, key blocks, first channel, count, Q, Kc)`` for every level of the hierarchy
    and chunk of channels: the factors ``[Bt, L, count, N]`` of ``_factors_kernel``, referenced at the
    level's block boundaries (float32 inputs as prepared by the callers; ``A`` already in base 2)."""
    batch, length, channels = key.shape
    state, width = A.shape[1], taps.shape[1]
    per_chunk = max(1, min(channels, chunk_bytes // max(1, 2 * batch * length * state * 4)))
    factor_tokens, factor_channels = 32, max(1, 64 // triton.next_power_of_2(state))
    parent = None
    for size in tile_sizes:
        rb, cb = (t.to(device=key.device, dtype=torch.int32) for t in tile_pairs(length, width, size, parent))
        parent = size
        if len(rb) == 0:
            continue
        for first in range(0, channels, per_chunk):
            count = min(per_chunk, channels - first)
            q = torch.empty(batch, length, count, state, dtype=torch.float32, device=key.device)
            k = torch.empty_like(q)
            grid = (-(-length // factor_tokens), batch, -(-count // factor_channels))
            _factors_kernel[grid](q, k, cums, key, row if row is not None else key, B, C, A, taps,
                                  length, channels, first, count, STATE=state,
                                  NP=triton.next_power_of_2(state), WIDTH=width, BT=size, BL=factor_tokens,
                                  BD=factor_channels, HAS_ROW=row is not None, num_warps=4)
            yield size, rb, cb, first, count, q, k
            del q, k


def _split_count(programs: int, work: int, block: int) -> int:
    """Split a reduction of ``work`` over more programs when the tiles alone leave the GPU idle."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
        if torch.cuda.is_available() else 1
    splits = 1
    while programs * splits < 2 * sms and work // (splits * 2) >= 4 * block:
        splits *= 2
    return splits


#: ``tl.dot`` precision of the tiles: three TF32 products per float32 product (error ~1e-6 of the
#: map's largest entry, measured against float64), several times faster than ``"ieee"``.
DOT_PRECISION = "tf32x3"


def signed_mean_fused(row: torch.Tensor | None, col: torch.Tensor | None, taps: torch.Tensor, use_D: bool,
                      dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                      chunk_bytes: int = 2**30, precision: str = DOT_PRECISION,
                      tile_sizes: tuple[int, ...] = TILE_SIZES, contraction_block: int = 64,
                      warps: int = 4, band_rows: int = 64, band_channels: int = 32,
                      band_warps: int = 4) -> torch.Tensor:
    """``[Bt, L, L]`` signed channel mean ``mean_d A_d`` with the fused kernels.

    Args:
        row: ``[Bt, L, E]`` output-side scale (``silu(z)``) or None.
        col: ``[Bt, L, E]`` key-side scale (``sigmoid(c)`` times the mask) or None.
        taps: ``[E, K]`` conv taps (``[E, 1]`` of ones without the conv).
        use_D: whether the skip ``D`` is part of the matrix.
        dt: ``[Bt, L, E]``; B, C: ``[Bt, L, N]``; A: ``[E, N]``; D: ``[E]``.
        chunk_bytes: bound on the two factor tensors ``[Bt, L, c, N]`` of a channel chunk.
        precision: ``tl.dot``'s ``input_precision``: ``"tf32x3"`` or ``"ieee"`` (plain float32).
        tile_sizes: the hierarchy's tile sizes, largest first, each a multiple of the next (>= 16).
        contraction_block: ``(channel, state)`` pairs a tile program reduces per step.
        warps: warps per tile program of the largest tiles.
        band_rows, band_channels, band_warps: the band kernel's rows, channels per step and warps.
    """
    if dt.is_cuda:
        with torch.cuda.device(dt.device):          # Triton launches on the current GPU
            return _signed_mean_fused(row, col, taps, use_D, dt, B, C, A, D, chunk_bytes, precision, tile_sizes,
                                      contraction_block, warps, band_rows, band_channels, band_warps)
    return _signed_mean_fused(row, col, taps, use_D, dt, B, C, A, D, chunk_bytes, precision, tile_sizes,
                              contraction_block, warps, band_rows, band_channels, band_warps)


def _signed_mean_fused(row, col, taps, use_D, dt, B, C, A, D, chunk_bytes, precision, tile_sizes,
                       contraction_block, warps, band_rows, band_channels, band_warps) -> torch.Tensor:
    batch, length, channels = dt.shape
    state, width = A.shape[1], taps.shape[1]
    cums, key, A, (row, col, B, C, D, taps) = _kernel_inputs(dt, col, A, row, col, B, C, D, taps)
    dummy = key                                                 # never read when its flag is off
    out = torch.zeros(batch, length, length, dtype=torch.float32, device=dt.device)
    for size, rb, cb, first, count, q, k in _level_factors(cums, key, row, B, C, A, taps, chunk_bytes, tile_sizes):
        splits = _split_count(len(rb) * batch, count * state, contraction_block)
        per_split = -(-count * state // (splits * contraction_block)) * contraction_block
        target = out if splits == 1 else torch.zeros(splits, batch, length, length, dtype=torch.float32,
                                                    device=dt.device)
        _tiles_kernel[(len(rb), batch, splits)](
            target, q, k, cums, A, rb, cb, length, channels, first, count, per_split,
            STATE=state, WIDTH=width, BT=size, BK=contraction_block, ACCUMULATE=splits == 1,
            PRECISION=precision, num_warps=warps if size >= 64 else 4, num_stages=3)
        if splits > 1:
            out += target.sum(dim=0)        # a split buffer's planes hold only these tiles
        del q, k

    band_width = tile_sizes[-1]
    offsets = band_width + width - 1
    pad = triton.next_power_of_2(offsets)
    rows_per_program = band_rows
    programs = -(-length // rows_per_program)
    splits = _split_count(programs * batch, channels, band_channels)
    per_split = -(-channels // (splits * band_channels)) * band_channels
    band = torch.zeros(splits, batch, length, pad, dtype=torch.float32, device=dt.device)
    _band_kernel[(programs, batch, splits)](
        band, cums, key, col if col is not None else dummy, D, row if row is not None else dummy,
        B, C, A, taps, length, channels, per_split, STATE=state, WIDTH=width, OFFSETS=offsets, PAD=pad,
        BI=rows_per_program, BD=band_channels, HAS_ROW=row is not None, HAS_COL=col is not None, USE_D=use_D,
        num_warps=band_warps)
    band = band.sum(dim=0)
    rows, slots = (t.to(dt.device) for t in band_entries(length, width, band_width))
    out[:, rows, rows - slots] += band[:, rows, slots]
    return out / channels


#: Tile sizes of the fused per-channel reductions (``tl.dot`` needs sides of 16 or more).
REDUCE_TILE_SIZES: tuple[int, ...] = (64, 16)
#: ``HOW`` of :func:`_tiles_reduce_kernel` for each transform.
_HOW = {"mean": 0, "abs": 1, "pos": 2}


def reduced_tiles_fused(row: torch.Tensor | None, col: torch.Tensor | None, taps: torch.Tensor, dt: torch.Tensor,
                        B: torch.Tensor, C: torch.Tensor, A: torch.Tensor, how: str, *,
                        values: torch.Tensor | None = None, chunk_bytes: int = 2**30,
                        precision: str = DOT_PRECISION, tile_sizes: tuple[int, ...] = REDUCE_TILE_SIZES,
                        warps: int = 4) -> torch.Tensor:
    """``[Bt, L, L]`` the channel *sum* of ``f(A_d[i, j])`` over every tile of the hierarchy (the band left
    by the smallest tile is not included: :func:`.fast._band` adds it), each channel's tile formed and
    transformed by ``f`` in registers: ``how`` ``"abs"`` or ``"pos"``, or ``"mean"`` (no transform).

    For the attribution pass ``row`` already multiplied by the gradient, ``values`` ``[Bt, L, E]`` (folded
    into the key factors) and ``how="pos"`` (``"mean"``: signed). Other arguments as
    :func:`signed_mean_fused`.
    """
    if dt.is_cuda:
        with torch.cuda.device(dt.device):
            return _reduced_tiles(row, col, taps, dt, B, C, A, how, values, chunk_bytes, precision, tile_sizes, warps)
    return _reduced_tiles(row, col, taps, dt, B, C, A, how, values, chunk_bytes, precision, tile_sizes, warps)


def _reduced_tiles(row, col, taps, dt, B, C, A, how, values, chunk_bytes, precision, tile_sizes, warps):
    batch, length, channels = dt.shape
    state, width = A.shape[1], taps.shape[1]
    cums, key, A, (row, values, B, C, taps) = _kernel_inputs(dt, col, A, row, values, B, C, taps)
    out = torch.zeros(batch, length, length, dtype=torch.float32, device=dt.device)
    state_pad = max(16, triton.next_power_of_2(state))          # tl.dot's inner side is at least 16
    for size, rb, cb, first, count, q, k in _level_factors(cums, key, row, B, C, A, taps, chunk_bytes, tile_sizes):
        if values is not None:                                 # g_i A_d[i, j] v_j: v into the keys
            k.mul_(values[:, :, first:first + count, None])
        splits = _split_count(len(rb) * batch, count, 8)
        per_split = -(-count // splits)
        target = out if splits == 1 else torch.zeros(splits, batch, length, length, dtype=torch.float32,
                                                    device=dt.device)
        _tiles_reduce_kernel[(len(rb), batch, splits)](
            target, q, k, cums, A, rb, cb, length, channels, first, count, per_split,
            STATE=state, NP=state_pad, WIDTH=width, BT=size, HOW=_HOW[how], ACCUMULATE=splits == 1,
            PRECISION=precision, num_warps=warps)
        if splits > 1:
            out += target.sum(dim=0)
        del q, k
    return out
