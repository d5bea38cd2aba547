"""Fast Mamba aggregates: the signed channel mean as factorised products, the per-channel
reductions (mean of ``|A|`` and ``relu(A)``, the attribution) tile by tile, and single rows.

Every Mamba variant has the form, per channel ``d`` (see :mod:`.operator`)::

    A_d[i, j] = row_d[i] * sum_s taps_d[K-1-s] * T_d[i, j+s],   T_d = (S_d + D_d I) diag(col_d)

with ``row = silu(z)`` (or 1), ``col = sigmoid(c) * mask`` (or the mask, or 1), ``taps`` the conv
(or the single tap 1) and ``S_d[i, j] = sum_n C_i[n] B_j[n] dt_j[d] exp(A[d, n] (s_i[d] - s_j[d]))``
with ``s = cumsum(dt)``.

**Signed mean.** Away from the diagonal (``i - j >= K``) every conv tap is causal and the D term
is absent, so on a tile of rows ``I`` and key columns ``J`` with references ``r`` (the token
before the rows) and ``e <= r`` (the last token the keys' taps touch)

    mean_d A_d[i, j] = (1/E) sum_{d, n} Q[i, (d, n)] exp(A[d, n] (s_r - s_e)) Kc[j, (d, n)]
    Q[i, (d, n)]  = row_d[i] C_i[n] exp(A[d, n] (s_i[d] - s_r[d]))
    Kc[j, (d, n)] = sum_s taps_d[K-1-s] col_d[j+s] dt_{j+s}[d] B_{j+s}[n] exp(A[d, n] (s_e[d] - s_{j+s}[d]))

a ``[|I|, E*N] x [E*N, |J|]`` matrix product in which every exponent is ``<= 0`` at any length
(an exponential that underflows belongs to an entry that is itself below the float range). ``Q``
and ``Kc`` depend on their own block only, so each level costs ``O(L E N)`` exponentials. Tiles of
32 cover every pair of 32-blocks, tiles of 4 the pairs inside one 32-block; the band of
``4 + K - 1`` diagonals left over is computed exactly, one exponential per entry and state. The
fused GPU kernels of :mod:`.triton` follow the same plan with tiles of 64 and 16.

**Rows.** ``A_d[i, :]`` for a few rows ``i`` costs ``O(L * E * N)`` each: the exponents
``s_i - s_j`` are all >= 0 and need no re-referencing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ...memory import default_block_bytes
from ..primitives import causal_conv
from . import triton
from .operator import MambaFactors, mamba_block
from .tiling import band_entries, tile_pairs


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


def exact_channel_mean(f: MambaFactors, variant: str, chunk_bytes: int | None = None) -> torch.Tensor:
    """``[B, L, L]`` signed channel mean by materialising channel blocks (the direct way); ``chunk_bytes``
    bounds each block (default :func:`~implicit_attention.memory.default_block_bytes`)."""
    batch, length, channels = f.x.shape
    chunk_bytes = chunk_bytes or default_block_bytes(f.x.device)
    step = max(1, min(channels, chunk_bytes // max(1, 5 * batch * length * length * f.x.dtype.itemsize)))
    total = torch.zeros(batch, length, length, dtype=f.x.dtype, device=f.x.device)
    for start in range(0, channels, step):
        block, _ = mamba_block(f, slice(start, min(start + step, channels)), variant)
        total += block.sum(dim=1)
    return total / channels


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


#: Tile sizes of the eager hierarchy, largest first; the exact band covers what the smallest leaves.
TILE_SIZES: tuple[int, ...] = (32, 4)
#: Tile sizes of the per-channel reductions (:func:`channel_reduced`), fastest on a CPU at L = 512-1024.
CHANNEL_TILE_SIZES: tuple[int, ...] = (64, 8)


@dataclass
class ChannelReduction:
    """How per-channel entries become one map: ``sum_d f(A_d[i, j])`` with ``f`` the transform of
    aggregate ``how`` (``|.|``, ``relu``, identity), or, given ``grad`` and ``values`` (``[B, L, E]``),
    the attribution ``sum_d clamp(grad[i, d] A_d[i, j] values[j, d], min=0)`` (no clamp if ``signed``)."""

    how: str = "mean"
    grad: torch.Tensor | None = None
    values: torch.Tensor | None = None
    signed: bool = False

    def combine(self, entries: torch.Tensor, dim: int) -> torch.Tensor:
        """``entries`` (a temporary: transformed in place) summed over the channel axis ``dim``. For the
        attribution they are already ``g_i A_d[i, j] v_j``: the gradient and the value are folded into
        the factors of each tile, ``[size, N]`` rather than ``[size, size]`` multiplications."""
        if self.grad is not None:
            return (entries if self.signed else entries.clamp_(min=0)).sum(dim)
        if self.how == "abs":
            return entries.abs_().sum(dim)
        return (entries.clamp_(min=0) if self.how == "pos" else entries).sum(dim)

    def blocked(self, span: int, rows: slice, size: int, blocks: int):
        """``(grad, values)`` ``[B, blocks, size, E]`` by row block and by key block (``None`` without grad)."""
        if self.grad is None:
            return None, None
        g = _padded(self.grad, span, 0.0)[:, rows].unflatten(1, (blocks, size))
        v = _padded(self.values, span, 0.0)[:, : blocks * size].unflatten(1, (blocks, size))
        return g, v

    def banded(self, offsets: int):
        """``(grad [B, L, 1, E], values [B, L, offsets, E])``: the gradient of row ``i`` and the value of
        column ``i - o`` (zero before the first token); ``None`` without grad."""
        if self.grad is None:
            return None, None
        length = self.values.shape[1]
        ahead = torch.cat([self.values.new_zeros(self.values.shape[0], offsets, self.values.shape[2]), self.values], 1)
        # window w of the padded values holds tokens w - offsets .. w - 1; row i needs i - o, o < offsets
        shifted = ahead.unfold(1, offsets, 1)[:, 1: length + 1].flip(-1).transpose(2, 3)   # [B, L, offsets, E]
        return self.grad[:, :, None], shifted


def _padded(t: torch.Tensor, length: int, value: float | None = None) -> torch.Tensor:
    """``t [B, L, ...]`` padded on the token axis to ``length`` (zeros, or repeating the last token)."""
    extra = length - t.shape[1]
    if extra <= 0:
        return t[:, :length]
    tail = t[:, -1:].expand(-1, extra, *t.shape[2:]) if value is None else t.new_full((t.shape[0], extra, *t.shape[2:]), value)
    return torch.cat([t, tail], dim=1)


def _level_tiles(f: MambaFactors, variant: str, cums: torch.Tensor, size: int, parent: int | None,
                 chunk_bytes: int, out: torch.Tensor, reduction: ChannelReduction | None = None) -> None:
    """Add one level's tiles (summed over channels) to ``out [B, L, L]``.

    Row block ``I`` is referenced at the token before its rows, ``r = I size + K - 2``; key block
    ``J`` at the last token its conv taps touch, ``e = J size + size + K - 2 <= r`` when ``I > J``::

        tile = (Q_I * exp(A (s_r - s_e))) @ Kc_J^T,   Q_I = row C exp(A (s_i - s_r)),
        Kc_J = sum_s tap key B exp(A (s_e - s_{j+s}))

    with every exponent ``<= 0``. Tiles ``I = J + delta`` are one batched product per ``delta``
    over consecutive blocks (views, no gathered copies); inside a ``parent`` block only the pairs
    that share it are kept. With a ``reduction`` each channel's tile is formed on its own (a product
    over the state only, ``[B, P, c, size, size]`` for a chunk of channels) and combined by it.
    """
    batch, length, channels = f.x.shape
    state, dtype, device = f.A.shape[1], f.x.dtype, f.x.device
    row, col, taps, _ = variant_parts(f, variant)
    width = taps.shape[1]
    rb, _ = tile_pairs(length, width, size, parent)
    if len(rb) == 0:
        return
    blocks = int(rb.max()) + 1
    ratio = blocks if parent is None else parent // size
    span = blocks * size + width - 1                       # tokens of every row and key block, padded
    cum0 = torch.cat([cums.new_zeros(batch, 1, channels), _padded(cums, span)], dim=1)   # token t at t + 1
    key = _padded(f.dt if col is None else f.dt * col, span, 0.0)
    B, C = _padded(f.B, span, 0.0), _padded(f.C, span, 0.0)
    rows = slice(width - 1, width - 1 + blocks * size)       # row tokens of blocks 0 .. nb-1, in order
    by_block = lambda t: t[:, rows].unflatten(1, (blocks, size))          # noqa: E731  [B, nb, size, ...]
    windows = lambda t: t[:, : span].unfold(1, size + width - 1, size).movedim(-1, 2)  # noqa: E731
    ref_row = cum0[:, width - 1:: size][:, :blocks]          # s at r = I size + K - 2   [B, nb, E]
    ref_key = cum0[:, size + width - 1:: size][:, :blocks]   # s at e = J size + size + K - 2 (clamped)
    ref_key = torch.cat([ref_key, cum0[:, -1:].expand(-1, blocks - ref_key.shape[1], -1)], dim=1)
    row_scale = None if row is None else by_block(_padded(row, span, 0.0))
    deltas = range(1, min(ratio, blocks))
    sums = {delta: torch.zeros(batch, blocks - delta, size, size, dtype=dtype, device=device) for delta in deltas}
    per_chunk = max(1, min(channels, chunk_bytes // max(1, 6 * batch * span * state * dtype.itemsize)))
    if reduction is not None:
        # each channel's tiles of one delta at once: [B, blocks, c, size, size], about three of them
        per_chunk = max(1, min(per_chunk, chunk_bytes // max(1, 3 * batch * blocks * size * size * dtype.itemsize)))
        g_rows, v_keys = reduction.blocked(span, rows, size, blocks)
    for c0 in range(0, channels, per_chunk):
        ch = slice(c0, min(c0 + per_chunk, channels))
        A = f.A[ch]                                                              # [c, N]
        s_rows = (by_block(cum0[:, 1:, ch]) - ref_row[:, :, None, ch]).to(dtype)   # [B, nb, size, c] >= 0
        Q = torch.exp(s_rows[..., None] * A).mul_(by_block(C)[:, :, :, None, :])
        if row_scale is not None:
            Q.mul_(row_scale[..., ch, None])
        # every token a key block's taps touch, once (neighbouring blocks overlap by K - 1 tokens)
        gap = (ref_key[:, :, None, ch] - windows(cum0[:, 1:, ch])).to(dtype)      # [B, nb, S+K-1, c] >= 0
        E = torch.exp(gap[..., None] * A).mul_(windows(B)[:, :, :, None, :]).mul_(windows(key[..., ch])[..., None])
        Kc = E[:, :, :size] * taps[ch, width - 1, None]
        for shift in range(1, width):
            Kc.add_(E[:, :, shift: shift + size] * taps[ch, width - 1 - shift, None])
        if reduction is not None:
            if g_rows is not None:                      # g_i A_d[i, j] v_j: g joins the rows, v the keys, once
                Q.mul_(g_rows[..., ch, None])
                Kc = Kc * v_keys[..., ch, None]
            # channel-major [B, nb, c, size, N] once, so that no delta's product copies its operands
            Q, Kc = Q.transpose(2, 3).contiguous(), Kc.transpose(2, 3).contiguous()
            for delta in deltas:
                decay = torch.exp((ref_row[:, delta:, ch] - ref_key[:, : blocks - delta, ch]).to(dtype)[..., None] * A)
                # [B, P, c, size, N] @ [B, P, c, N, size]: each channel's tile, a product over the state
                tiles = (Q[:, delta:] * decay[:, :, :, None]) @ Kc[:, : blocks - delta].transpose(-1, -2)
                sums[delta] += reduction.combine(tiles, dim=2)
            continue
        Q, Kc = Q.flatten(3), Kc.flatten(3)
        for delta in deltas:
            decay = torch.exp((ref_row[:, delta:, ch] - ref_key[:, : blocks - delta, ch]).to(dtype)[..., None] * A)
            sums[delta] += (Q[:, delta:] * decay.flatten(2)[:, :, None]) @ Kc[:, : blocks - delta].transpose(-1, -2)
    for delta, tiles in sums.items():
        keys = torch.arange(blocks - delta, device=device)
        keep = keys // ratio == (keys + delta) // ratio                          # same parent block
        keys = keys[keep]
        _scatter_tiles(out, tiles[:, keep], (keys + delta) * size + width - 1, keys * size)


def _band(f: MambaFactors, variant: str, cums: torch.Tensor, band: int, chunk_bytes: int,
          reduction: ChannelReduction | None = None) -> torch.Tensor:
    """``[B, L, band + K - 1]`` ``sum_d`` of the entries ``(i, i - o)`` for offsets ``o < band + K - 1``, exactly.

    ``A_d[i, j] = row_d[i] sum_s tap_d[K-1-s] T_d[i, j + s]`` with ``T_d[i, k]`` for ``i - k < band + K - 1``
    computed for every offset at once with its own exponentials (``exp(A (s_i - s_k)) <= 1``). With a
    ``reduction`` each channel's entries are formed (``[B, L, offsets, c]``) and combined by it.
    """
    if reduction is not None:
        return _band_reduced(f, variant, cums, band, chunk_bytes, reduction)
    batch, length, channels = f.x.shape
    dtype = f.x.dtype
    row, col, taps, use_D = variant_parts(f, variant)
    width = taps.shape[1]
    offsets = band + width - 1
    key = f.dt if col is None else f.dt * col
    out = torch.zeros(batch, length, offsets + width - 1, dtype=dtype, device=f.x.device)
    # the exponentials [B, L, offsets, c, N] of _band_entries are the largest temporary
    per_chunk = max(1, min(channels, chunk_bytes // max(1, 3 * batch * length * offsets * f.A.shape[1]
                                                             * dtype.itemsize)))
    rows_by_keys = f.C[:, :, None] * _back_windows(f.B, offsets)                      # C_i B_{i-o}  [B, L, O, N]
    reversed_taps = taps.flip(1)                                      # [E, K]: column s is tap K-1-s
    for c0 in range(0, channels, per_chunk):
        ch = slice(c0, min(c0 + per_chunk, channels))
        T = _band_entries(f, cums, ch, offsets, rows_by_keys, key, col, use_D)       # [B, L, O, c]
        if row is not None:
            T = T * row[:, :, None, ch]
        # key token i - o reaches entry j = i - o - s through tap K-1-s: slot o + s of row i
        through_taps = T @ reversed_taps[ch]                                          # [B, L, O, K]
        for shift in range(width):
            out[:, :, shift: shift + offsets] += through_taps[..., shift]
    return out[..., :offsets]


def _band_offset(f: MambaFactors, cums: torch.Tensor, ch: slice, offset: int, key: torch.Tensor,
                 col: torch.Tensor | None, use_D: bool) -> torch.Tensor:
    """``[B, L - o, c]`` ``T_d[i, i - o]`` (before the row scale and the conv) for ``i >= o``: one offset, the
    plain reference of :func:`_band_entries` (which the band uses; tests compare them)."""
    length = f.x.shape[1]
    rows, keys = slice(offset, length), slice(0, length - offset)
    gap = (cums[:, rows, ch] - cums[:, keys, ch]).to(f.x.dtype)       # [B, L - o, c] >= 0
    # sum over the state as a batched product: [B, L-o, c, N] @ [B, L-o, N, 1]
    T = (torch.exp(gap[..., None] * f.A[ch]) @ (f.C[:, rows] * f.B[:, keys])[..., None])[..., 0]
    T = T * key[:, keys, ch]
    if use_D and offset == 0:
        T = T + f.D[ch] * (1 if col is None else col[:, keys, ch])
    return T


def _back_windows(t: torch.Tensor, offsets: int) -> torch.Tensor:
    """``[B, L, offsets, ...]`` of ``t [B, L, ...]``: entry ``(i, o)`` is token ``i - o`` (zero before the first)."""
    length = t.shape[1]
    ahead = torch.cat([t.new_zeros(t.shape[0], offsets, *t.shape[2:]), t], dim=1)
    # window w of the padded tokens holds tokens w - offsets .. w - 1; row i is window i + 1
    return ahead.unfold(1, offsets, 1)[:, 1: length + 1].flip(-1).movedim(-1, 2)


def _band_entries(f: MambaFactors, cums: torch.Tensor, ch: slice, offsets: int, rows_by_keys: torch.Tensor,
                  key: torch.Tensor, col: torch.Tensor | None, use_D: bool) -> torch.Tensor:
    """``[B, L, offsets, c]`` ``T_d[i, i - o]`` for every offset ``o`` at once (what :func:`_band_offset` gives one
    offset at a time; zero where ``i < o``): fewer, larger operations, which a GPU needs."""
    cum_keys = _back_windows(cums[:, :, ch], offsets)                      # s_{i-o}; 0 before the first token
    gap = (cums[:, :, None, ch] - cum_keys).to(f.x.dtype)                 # [B, L, O, c] >= 0
    T = torch.einsum("blocn,blon->bloc", torch.exp(gap[..., None] * f.A[ch]), rows_by_keys)
    T = T * _back_windows(key[:, :, ch], offsets)                          # zero keys before the first token
    if use_D:
        T[:, :, 0] += f.D[ch] * (1 if col is None else col[:, :, ch])
    return T


def _band_reduced(f: MambaFactors, variant: str, cums: torch.Tensor, band: int, chunk_bytes: int,
                  reduction: ChannelReduction) -> torch.Tensor:
    """:func:`_band` with every channel's entries ``A_d[i, i - o]`` formed and combined by ``reduction``."""
    batch, length, channels = f.x.shape
    dtype = f.x.dtype
    row, col, taps, use_D = variant_parts(f, variant)
    width = taps.shape[1]
    offsets = band + width - 1
    key = f.dt if col is None else f.dt * col
    out = torch.zeros(batch, length, offsets, dtype=dtype, device=f.x.device)
    # every offset at once: the exponentials [B, L, offsets, c, N] are the largest temporary
    per_chunk = max(1, min(channels, chunk_bytes // max(1, 3 * batch * length * offsets * f.A.shape[1]
                                                             * dtype.itemsize)))
    g_rows, v_shifted = reduction.banded(offsets)
    rows_by_keys = f.C[:, :, None] * _back_windows(f.B, offsets)                      # C_i B_{i-o}  [B, L, O, N]
    for c0 in range(0, channels, per_chunk):
        ch = slice(c0, min(c0 + per_chunk, channels))
        T = _band_entries(f, cums, ch, offsets, rows_by_keys, key, col, use_D)       # [B, L, O, c]
        entries = T * taps[ch, width - 1]                               # A_d[i, i - o] = sum_s tap K-1-s T[i, o - s]
        for shift in range(1, width):
            entries[:, :, shift:] += T[:, :, : offsets - shift] * taps[ch, width - 1 - shift]
        if row is not None:
            entries *= row[:, :, None, ch]
        if g_rows is not None:
            entries *= g_rows[..., ch] * v_shifted[..., ch]
        out += reduction.combine(entries, dim=-1)
    return out


def signed_mean(f: MambaFactors, variant: str, tile_sizes: tuple[int, ...] | None = None,
                chunk_bytes: int | None = None, fused: bool | None = None) -> torch.Tensor:
    """``[B, L, L]`` the signed channel mean of ``variant``'s matrices, never holding ``[C, L, L]``.

    On a CUDA device in float32 with Triton installed this runs the fused kernels of
    :mod:`.triton` (``fused=None`` picks them when they can run, ``False`` forces the eager
    path, ``True`` requires them); the eager path below serves every other case. Both split the
    lower triangle the same way, in the row coordinate ``i' = i - (K - 1)``:

    - tiles of ``tile_sizes[0]`` for every pair of blocks ``i'`` block > ``j`` block, then tiles of
      each next size for the pairs inside one block of the previous size (:func:`_level_tiles`);
    - the band ``j <= i < T (j // T + 1) + K - 1`` left by the smallest size ``T``, exactly
      (:func:`_band`).

    Costs ``O(L^2 E N)`` multiply-adds in matrix products and ``O(L E N (K levels + T + K))``
    exponentials. ``chunk_bytes`` bounds each temporary (default
    :func:`~implicit_attention.memory.default_block_bytes`: cache-sized on a CPU).
    """
    chunk_bytes = chunk_bytes or default_block_bytes(f.x.device)
    if fused is None:
        fused = tile_sizes is None and triton.available(f.x)
    if fused:
        if not triton.available(f.x):
            raise RuntimeError("the fused signed mean needs Triton and float32 factors on a CUDA device")
        row, col, taps, use_D = variant_parts(f, variant)
        return triton.signed_mean_fused(row, col, taps, use_D, f.dt, f.B, f.C, f.A, f.D,
                                             chunk_bytes=chunk_bytes)
    return _tiled_sum(f, variant, tuple(tile_sizes or TILE_SIZES), chunk_bytes) / f.x.shape[-1]


def _tiled_sum(f: MambaFactors, variant: str, tile_sizes: tuple[int, ...], chunk_bytes: int,
               reduction: ChannelReduction | None = None) -> torch.Tensor:
    """``[B, L, L]`` the channel sum of ``variant``'s matrices (or of ``reduction`` of them): every level's tiles
    (:func:`_level_tiles`), then the band left by the smallest tile size (:func:`_band`)."""
    if any(a % b for a, b in zip(tile_sizes, tile_sizes[1:])):
        raise ValueError(f"each tile size must be a multiple of the next, got {tile_sizes}")
    batch, length, _ = f.x.shape
    width = variant_parts(f, variant)[2].shape[1]
    cums = f.dt.to(torch.float64).cumsum(dim=1)                              # [B, L, E]
    out = torch.zeros(batch, length, length, dtype=f.x.dtype, device=f.x.device)
    parent = None
    for size in tile_sizes:
        _level_tiles(f, variant, cums, size, parent, chunk_bytes, out, reduction)
        parent = size
    rows, slots = band_entries(length, width, tile_sizes[-1])
    rows, slots = rows.to(f.x.device), slots.to(f.x.device)
    out[:, rows, rows - slots] += _band(f, variant, cums, tile_sizes[-1], chunk_bytes, reduction)[:, rows, slots]
    return out


def channel_reduced(f: MambaFactors, variant: str, reduction: ChannelReduction,
                    tile_sizes: tuple[int, ...] | None = None, chunk_bytes: int | None = None,
                    fused: bool | None = None) -> torch.Tensor:
    """``[B, L, L]`` the channel mean of ``reduction`` (``|A|``, ``relu(A)``, the attribution), never holding
    ``[C, L, L]``.

    The tiling of :func:`signed_mean` (eager path), with each channel's tile a product over the
    state alone (``[size, N] @ [N, size]``, every exponent ``<= 0``) formed for a chunk of channels,
    transformed and summed over them at once; the band is formed per channel likewise. Costs the
    ``O(L^2 E N)`` multiply-adds of the blocks but never materialises a channel's ``L x L`` matrix:
    memory stays at ``chunk_bytes`` (default :func:`~implicit_attention.memory.default_block_bytes`).
    On a CUDA device in float32 with Triton the tiles run in one fused kernel per level
    (:func:`.triton.reduced_tiles_fused`: each channel's tile transformed in registers); ``fused`` as
    in :func:`signed_mean`.
    """
    chunk_bytes = chunk_bytes or default_block_bytes(f.x.device)
    if fused is True and not triton.available(f.x):
        raise RuntimeError("the fused channel reductions need Triton and float32 factors on a CUDA device")
    if fused or (fused is None and tile_sizes is None and triton.available(f.x)):
        try:
            return _fused_channel_reduced(f, variant, reduction, chunk_bytes) / f.x.shape[-1]
        except Exception as error:  # a Triton build that cannot compile the kernel on this GPU
            if fused:
                raise
            _warn_fused_fallback(error)
    return _tiled_sum(f, variant, tuple(tile_sizes or CHANNEL_TILE_SIZES), chunk_bytes, reduction) / f.x.shape[-1]


def _warn_fused_fallback(error: Exception) -> None:
    """Say once per process that the fused reductions failed and the eager tiles serve instead."""
    if not getattr(_warn_fused_fallback, "said", False):
        warnings.warn(f"the fused Triton channel reductions failed ({type(error).__name__}: {error}); "
                      "using the eager tiles instead (same maps, slower)", RuntimeWarning, stacklevel=3)
        _warn_fused_fallback.said = True


def _fused_channel_reduced(f: MambaFactors, variant: str, reduction: ChannelReduction, chunk_bytes: int) -> torch.Tensor:
    """The channel sum of ``reduction``: fused tiles, then the band left by their smallest size (eager)."""
    row, col, taps, _ = variant_parts(f, variant)
    how, values = reduction.how, None
    if reduction.grad is not None:                 # g_i A_d[i, j] v_j: g joins the row factor, v the keys
        row = reduction.grad if row is None else row * reduction.grad
        how, values = ("mean" if reduction.signed else "pos"), reduction.values
    out = triton.reduced_tiles_fused(row, col, taps, f.dt, f.B, f.C, f.A, how, values=values)
    smallest, length = triton.REDUCE_TILE_SIZES[-1], f.x.shape[1]
    cums = f.dt.to(torch.float64).cumsum(dim=1)
    rows, slots = (t.to(f.x.device) for t in band_entries(length, taps.shape[1], smallest))
    out[:, rows, rows - slots] += _band(f, variant, cums, smallest, chunk_bytes, reduction)[:, rows, slots]
    return out


def matrix_rows(f: MambaFactors, variant: str, rows: torch.Tensor) -> torch.Tensor:
    """``[B, R, E, L]`` rows ``rows`` (``[R]`` indices) of every channel's matrix, in ``O(R L E N)``."""
    return matrix_and_offset_rows(f, variant, rows)[0]


def row_outputs(f: MambaFactors, variant: str, rows: torch.Tensor, values: torch.Tensor,
                chunk_bytes: int | None = None) -> torch.Tensor:
    """``[B, R, E]`` the operator's output at rows ``rows`` (``[R]``, ascending), ``sum_j A[i, j] values_j``
    plus the offset: what :func:`matrix_and_offset_rows` contracted with ``values`` ``[B, L, E]`` gives, in
    ``O(L E N)`` instead of ``O(R L E N)``.

    The taps move onto the values (``sum_j out[i, j] v_j = sum_k T[i, k] v'_k``, ``v'`` the depthwise causal
    convolution of ``v``) and the offset joins them (``v'_k + conv_bias``). Between consecutive rows the
    state ``h(i) = sum_{k <= i} exp((s_i - s_k) A) u_k`` ``[B, E, N]`` is carried with one factor, so every
    column's exponentials are taken once, not once per row; every exponent is ``<= 0``. Columns go in
    chunks of ``[B, chunk, E, N]`` within ``chunk_bytes``.
    """
    if len(rows) > 1 and bool((rows[1:] <= rows[:-1]).any()):
        raise ValueError("row_outputs carries the state forwards: give the rows in ascending order, once each")
    batch, _, channels = f.x.shape
    row_scale, col, taps, use_D = variant_parts(f, variant)
    carries_bias = variant in ("unified", "no_gate", "no_act") and f.conv_bias is not None
    inputs = causal_conv(values, taps, f.conv_bias if carries_bias else None)       # v'_k (+ bias), [B, L, E]
    if col is not None:
        inputs = inputs * col
    cums = f.dt.to(torch.float64).cumsum(dim=1)                               # [B, L, E]
    drive = f.dt * inputs                                                     # dt_k col_k v'_k
    chunk_bytes = chunk_bytes or default_block_bytes(f.x.device)
    chunk = max(1, chunk_bytes // (3 * batch * channels * f.A.shape[1] * f.x.dtype.itemsize))
    out = torch.zeros(batch, len(rows), channels, dtype=f.x.dtype, device=f.x.device)
    state, previous = None, None
    for r, row in enumerate(rows.tolist()):
        if state is not None:                       # carried from the previous row: exp((s_i - s_p) A)
            step = (cums[:, row] - cums[:, previous]).to(f.x.dtype)          # [B, E]
            state = torch.exp(step[..., None] * f.A) * state
        for start in range(0 if previous is None else previous + 1, row + 1, chunk):
            stop = min(start + chunk, row + 1)
            gap = (cums[:, row, None] - cums[:, start:stop]).to(f.x.dtype)    # [B, S, E], >= 0
            terms = torch.exp(gap[..., None] * f.A) * f.B[:, start:stop, None, :]            # [B, S, E, N]
            # a broadcast product and a sum: as an einsum this is a bmm over B * E tiny products, which
            # the CPU runs one batch entry at a time (half the time of the whole row check)
            part = (terms * drive[:, start:stop, :, None]).sum(dim=1)                          # [B, E, N]
            state = part if state is None else state + part
        previous = row
        out[:, r] = (state * f.C[:, row, None, :]).sum(dim=-1)
    if use_D:
        out += f.D * inputs[:, rows]
    if row_scale is not None:
        out = out * row_scale[:, rows]
    return out


def matrix_and_offset_rows(f: MambaFactors, variant: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`matrix_rows` and the same rows of the offset ``[B, R, E]`` (the conv bias carried through the
    operator, as :func:`~.operator.mamba_block` forms it; ``None`` where the variant has none)."""
    batch, length, channels = f.x.shape
    row_scale, col, taps, use_D = variant_parts(f, variant)
    width = taps.shape[1]
    cums = f.dt.to(torch.float64).cumsum(dim=1)                              # [B, L, E]
    gap = (cums[:, rows, None, :] - cums[:, None, :, :]).to(f.x.dtype).clamp_(min=0)   # [B, R, L, E] s_i - s_j
    positions = torch.arange(length, device=f.x.device)
    causal = positions[None, :] <= rows[:, None]                             # [R, L]
    T = torch.zeros(batch, len(rows), length, channels, dtype=f.x.dtype, device=f.x.device)
    for n in range(f.A.shape[1]):
        T += torch.exp(gap * f.A[:, n]) * (f.C[:, rows, None, None, n] * f.B[:, None, :, None, n])
    T *= f.dt[:, None]
    if use_D:
        T += (positions[None, :] == rows[:, None])[None, :, :, None] * f.D
    if col is not None:
        T *= col[:, None]
    T = T * causal[None, :, :, None]
    offset = None
    if variant in ("unified", "no_gate", "no_act") and f.conv_bias is not None:
        offset = T.sum(dim=2) * f.conv_bias                                   # [B, R, E]
    out = T * taps[:, width - 1]
    for shift in range(1, min(width, length)):
        out[:, :, : length - shift] += T[:, :, shift:] * taps[:, width - 1 - shift]
    if row_scale is not None:
        out = out * row_scale[:, rows, None, :]
        offset = None if offset is None else offset * row_scale[:, rows]
    return out.permute(0, 1, 3, 2), offset
