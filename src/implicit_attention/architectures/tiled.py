"""Fast exact channel sums of scalar-decay operators by hierarchical tiles (RG-LRU, HGRN, GLA, RWKV-4).

Glossary: ``B`` batch, ``L`` tokens, ``E`` the channels summed over (``c`` a block of them), ``K``
conv width, ``T`` the band block, ``W = T + K - 1`` a band window, ``S`` the tile size of a level,
``P`` the pairs of a level, ``R`` rows.

A *diagonal* operator has, per channel ``d``, a scalar decay per token and optionally a causal
depthwise conv on the right (taps ``w_d``), a row scale, a column scale and state resets::

    A_d[i, j] = row_d[i] key_mask[j] sum_{s=0..K-1} w_d[K-1-s] D_d[i, j+s] col_d[j+s]
    D_d[i, j'] = exp(G_i[d] - G_j'[d])   for j' <= i with no reset in (j', i], else 0
    G = cumsum(log_decay)                (log_decay <= 0: D is a product of decays in (0, 1])

(Griffin's RG-LRU ``diag(y) alpha M``, HGRN's ``diag(w s g) R diag(sigmoid(c) m) M diag(m)`` and each
key dim of a GLA head are of this form.)

**Signed channel sum.** On a tile whose rows ``I`` lie after every token its keys touch
(``j + s <= r < i`` for a reference token ``r``), the decay splits at ``r``::

    sum_d A_d[i, j] = sum_d Q[i, d] Kc[j, d]                          ([|I|, E] x [E, |J|])
    Q[i, d]  = row_d[i] exp(G_i - G_r) [no reset in (r, i]]
    Kc[j, d] = key_mask[j] sum_s w_d[K-1-s] col_d[j+s] exp(G_r - G_{j+s}) [no reset in (j+s, r]]

and both exponents are ``<= 0`` whatever the length: nothing overflows, and an exponential that
underflows belongs to an entry that is itself below the float range. A reset in ``(j+s, i]`` lies
in ``(j+s, r]`` or in ``(r, i]``, so the channel-independent reset masks factorise too.
:class:`Tiling` covers the lower triangle with such tiles (sibling blocks of a binary hierarchy,
one batched matrix product per level, all factors read as strided views) plus a band of short
windows along the diagonal, where rows and keys interleave: there the decay splits at each
window's midpoint (exponents bounded by half the window's decay, :data:`SAFE_EXPONENT`), and
windows with stronger decays (or a reset) are computed entry by entry from directly summed
segments of ``log_decay``. Cumulative sums are float64, so ``G_i - G_r`` keeps its accuracy at
any length.

Costs ``O(L^2 E)`` multiply-adds in matrix products and ``O(L log(L/T) E)`` exponentials, against
``O(L^2 E)`` exponentials for per-channel blocks. Temporaries are bounded by ``chunk_bytes``
(channels are processed in chunks); nothing holds ``[E, L, L]``. The rows of the map
(:func:`diagonal_rows`) cost ``O(R L E)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from ..memory import DEFAULT_BLOCK_BYTES
from .base import LayerDecomposition, channel_transform
from .primitives import conv_right, segment_sums


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Blocks:
    """Token blocks ``start + k * stride + a`` for ``k < count`` and ``a < size`` (they may overlap)."""

    start: int
    stride: int
    count: int
    size: int

    @property
    def end(self) -> int:
        """One past the last token the blocks touch."""
        return self.start + self.stride * (self.count - 1) + self.size

    def tokens(self, device) -> torch.Tensor:
        """``[count, size]`` the token indices (for gathers)."""
        first = self.start + self.stride * torch.arange(self.count, device=device)
        return first[:, None] + torch.arange(self.size, device=device)

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, count, size, ...]`` a strided view (no copy) of ``t [B, L', ...]``, ``L' >= end``."""
        stride = t.stride()
        return t.as_strided((t.shape[0], self.count, self.size, *t.shape[2:]),
                            (stride[0], self.stride * stride[1], *stride[1:]),
                            t.storage_offset() + self.start * stride[1])


@dataclass(frozen=True)
class Tiling:
    """The tiles covering the lower triangle of an ``[L, L]`` map, in the row coordinate ``i - (K - 1)``.

    - band (:meth:`band`): window ``J`` holds tokens ``[J T, J T + W)``; its first ``T`` columns
      (keys) and all ``W`` rows are written, i.e. every row up to ``K - 1`` past the key block;
    - level ``S = T 2^l`` (:meth:`pairs`): pair ``p`` (a multiple of ``2 S``) joins the keys
      ``[p, p + S)`` to the rows ``[p + S + K - 1, p + 2 S + K - 1)``; the reference token is
      ``p + S + K - 2``, the last token the keys' conv taps touch.

    Every entry ``j <= i`` belongs to exactly one window or pair. Blocks of the last window or pair
    may run past ``L``: factors are padded to :attr:`padded_length` and those parts are cropped.
    """

    length: int
    block: int
    width: int = 1

    @property
    def size(self) -> int:
        """``W = T + K - 1``, the tokens of a band window."""
        return self.block + self.width - 1

    def band(self) -> Blocks:
        """The band windows (``[J T, J T + W)``)."""
        return Blocks(0, self.block, -(-self.length // self.block), self.size)

    def levels(self) -> list[int]:
        """Tile sizes ``S`` with at least one pair whose rows start inside the sequence."""
        sizes, span = [], self.block
        while span + self.width - 1 < self.length:
            sizes.append(span)
            span *= 2
        return sizes

    def pairs(self, span: int) -> tuple[Blocks, Blocks, Blocks]:
        """``(keys, rows, ref)`` of level ``span``: keys hold every token their conv taps touch
        (``S + K - 1``; the first ``S`` are the key columns), ``ref`` the reference token of each pair."""
        width = self.width
        count = -(-(self.length - span - width + 1) // (2 * span))
        return (Blocks(0, 2 * span, count, span + width - 1), Blocks(span + width - 1, 2 * span, count, span),
                Blocks(span + width - 2, 2 * span, count, 1))

    @property
    def padded_length(self) -> int:
        """Tokens the padded factors need so that every block is a view."""
        ends = [self.band().end, self.length]
        for span in self.levels():
            ends += [blocks.end for blocks in self.pairs(span)]
        return max(ends)


def pad_tokens(t: torch.Tensor | None, length: int, replicate: bool = False) -> torch.Tensor | None:
    """``t [B, L, ...]`` padded to ``length`` tokens with zeros (or copies of the last token), contiguous."""
    if t is None:
        return None
    extra = length - t.shape[1]
    if extra <= 0:
        return t.contiguous()
    tail = t[:, -1:].expand(t.shape[0], extra, *t.shape[2:]) if replicate \
        else t.new_zeros(t.shape[0], extra, *t.shape[2:])
    return torch.cat([t, tail], dim=1)


def write_tiles(out: torch.Tensor, tiles: torch.Tensor, first_row: int, first_col: int, stride: int) -> None:
    """Write ``tiles [B, P, R, S]`` at ``out[:, first_row + k stride + a, first_col + k stride + b]``, cropped at ``L``.

    Tiles wholly inside are one strided copy (no index arithmetic); the few at the end are cropped.
    """
    batch, count, height, width = tiles.shape
    length = out.shape[-1]
    whole = min(count, max(0, (length - height - first_row) // stride + 1),
                max(0, (length - width - first_col) // stride + 1))
    if whole:
        view = out.as_strided((batch, whole, height, width), (out.stride(0), stride * (length + 1), length, 1),
                              out.storage_offset() + first_row * length + first_col)
        view.copy_(tiles[:, :whole])
    for k in range(whole, count):
        row, col = first_row + k * stride, first_col + k * stride
        rows, cols = min(height, length - row), min(width, length - col)
        if rows > 0 and cols > 0:
            out[:, row:row + rows, col:col + cols] = tiles[:, k, :rows, :cols]


def assemble(tiling: Tiling, batch: int, dtype: torch.dtype, device,
             band: Callable[[Blocks], torch.Tensor],
             pair: Callable[[int, Blocks, Blocks, Blocks], torch.Tensor]) -> torch.Tensor:
    """``[B, L, L]`` from ``band(windows) -> [B, nb, W, W]`` and
    ``pair(S, keys, rows, ref) -> [B, P, S, S]`` (rows by key columns), see :class:`Tiling`."""
    out = torch.zeros(batch, tiling.length, tiling.length, dtype=dtype, device=device)
    windows = tiling.band()
    write_tiles(out, band(windows)[..., :tiling.block], 0, 0, windows.stride)
    for span in tiling.levels():
        keys, rows, ref = tiling.pairs(span)
        if keys.count > 0:
            write_tiles(out, pair(span, keys, rows, ref), rows.start, 0, keys.stride)
    return out


def channel_step(channels: int, per_channel_bytes: int, chunk_bytes: int) -> int:
    """How many channels a chunk holds when each costs ``per_channel_bytes`` (at least one)."""
    return max(1, min(channels, chunk_bytes // max(1, per_channel_bytes)))


# --------------------------------------------------------------------------- diagonal operators
#: Where a zero decay's ``log`` is floored (see :meth:`DiagonalOperator.finite`).
LOG_DECAY_FLOOR = -1e4


@dataclass
class DiagonalOperator:
    """``A_d`` of the module docstring for every channel ``d`` (see there for the equation).

    Attributes:
        log_decay: ``[B, L, E]`` ``log`` of the per-token decays (``<= 0``, finite).
        col: ``[B, L, E]`` the scale of each token's input before it enters the state.
        row: ``[B, L, E]`` or ``None`` (1): the scale of each output row.
        taps: ``[E, K]`` or ``None`` (no conv): ``taps[:, K-1]`` multiplies the current token.
        key_mask: ``[B, L]`` or ``None``: a scale of the final columns (after the conv).
        reset: ``[B, L]`` bool or ``None``: the state resets at these tokens (nothing crosses them).
    """

    log_decay: torch.Tensor
    col: torch.Tensor
    row: torch.Tensor | None = None
    taps: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    reset: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return 1 if self.taps is None else self.taps.shape[1]

    @cached_property
    def segments(self) -> torch.Tensor | None:
        """``[B, L]`` resets up to and at each token (two tokens share a segment iff equal), or ``None``."""
        return None if self.reset is None else self.reset.to(torch.long).cumsum(dim=1)

    def finite(self) -> DiagonalOperator:
        """The same operator with decays of exactly 0 (``log_decay = -inf``) floored at ``exp(-1e4)``.

        Any product through such a token is then ``exp(<= -1e4) = 0`` in every float dtype, as it
        should be, while the float64 cumulative sums stay finite (``-inf - -inf`` would be NaN).
        """
        if not bool(torch.isneginf(self.log_decay).any()):
            return self
        return replace(self, log_decay=self.log_decay.clamp(min=LOG_DECAY_FLOOR))

    def padded(self, length: int) -> DiagonalOperator:
        """The operator on ``length >= L`` tokens: the extra ones have decay 1 and zero scales."""
        return DiagonalOperator(log_decay=pad_tokens(self.log_decay, length), col=pad_tokens(self.col, length),
                                row=pad_tokens(self.row, length), taps=self.taps,
                                key_mask=pad_tokens(self.key_mask, length), reset=pad_tokens(self.reset, length))


@dataclass
class ProductWeights:
    """Weights of the entries of every channel's matrix: ``r_i[d] A_d[i, j] k_j[d]`` (``[B, L, E]`` each),
    clamped at 0 per channel before the channel sum where ``clamp`` (the attribution rule with
    ``r = grad``, ``k = values``)."""

    row: torch.Tensor
    key: torch.Tensor
    clamp: bool

    def padded(self, length: int) -> ProductWeights:
        return ProductWeights(pad_tokens(self.row, length), pad_tokens(self.key, length), self.clamp)


def diagonal_window_sums(op: DiagonalOperator, tokens: torch.Tensor, chunk_bytes: int,
                         weights: ProductWeights | None = None) -> torch.Tensor:
    """``[B, nb, W, W]`` ``sum_d A_d`` restricted to each window ``tokens [nb, W]``, entry by entry
    (with ``weights``: ``sum_d f(r_i[d] A_d[i, j] k_j[d])``, see :class:`ProductWeights`).

    ``A[i, j]`` depends only on the tokens ``j .. i``, so a window's operator is the restriction of
    the whole one (window-local conv taps past the window only reach entries above the diagonal).
    """
    batch, _, channels = op.log_decay.shape
    blocks, size = tokens.shape
    dtype, device = op.col.dtype, op.col.device
    keep = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    keep = keep.expand(batch, blocks, size, size)
    segments = op.segments
    if segments is not None:
        seg = segments[:, tokens]                                              # [B, nb, W]
        keep = keep & (seg[..., :, None] == seg[..., None, :])
    keep = keep[:, :, None]                                                    # [B, nb, 1, W, W]
    out = torch.zeros(batch, blocks, size, size, dtype=dtype, device=device)
    step = channel_step(channels, 4 * batch * blocks * size * size * dtype.itemsize, chunk_bytes)
    for c0 in range(0, channels, step):
        ch = slice(c0, min(c0 + step, channels))
        window = lambda t: t[:, tokens, ch].permute(0, 1, 3, 2)  # noqa: E731  [B, L, c] -> [B, nb, c, W]
        D = segment_sums(window(op.log_decay)).exp_().masked_fill_(~keep, 0)   # [B, nb, c, W, W]
        D.mul_(window(op.col)[..., None, :])
        if op.taps is not None:
            D = conv_right(D.flatten(0, 1), op.taps[ch]).unflatten(0, (batch, blocks))
        if op.key_mask is not None:
            D.mul_(op.key_mask[:, tokens][:, :, None, None, :])
        if op.row is not None:
            D.mul_(window(op.row)[..., None])
        if weights is not None:
            D.mul_(window(weights.row)[..., None]).mul_(window(weights.key)[..., None, :])
            if weights.clamp:
                D.clamp_(min=0)
        out += D.sum(dim=2)
    return out


#: Largest exponent a factorised band window may hold, by dtype: ``exp(x)`` rounds ``x`` first, so a
#: product ``exp(a) exp(b)`` of an entry carries a relative error of about ``(|a| + |b|) eps``.
SAFE_EXPONENT = {torch.float32: 20.0, torch.float64: 300.0}


def diagonal_band_sums(op: DiagonalOperator, cums: torch.Tensor, windows: Blocks,
                       chunk_bytes: int) -> torch.Tensor:
    """``[B, nb, W, W]`` ``sum_d A_d`` of each band window, factorised around its midpoint.

    Within a window ``exp(G_i - G_j') = exp(G_i - m) exp(m - G_j')`` with ``m`` the midpoint of the
    window's cumulative log-decays (per channel), so each factor's exponent is at most half the
    window's total decay and the band costs ``K`` small matrix products per window instead of
    ``W^2`` exponentials per channel; the conv is applied one tap at a time after masking the
    causal part (a tap must never reach past the row). Windows whose half-span exceeds
    :data:`SAFE_EXPONENT`, or that hold a reset, are computed entry by entry
    (:func:`diagonal_window_sums`). ``op`` and ``cums`` (float64 ``G``) are padded past ``windows.end``.
    """
    channels = op.log_decay.shape[-1]
    batch, blocks, size = op.log_decay.shape[0], windows.count, windows.size
    width = op.width
    dtype, device = op.col.dtype, op.col.device
    limit = SAFE_EXPONENT.get(dtype, 20.0)
    G_all = windows.of(cums)                                                     # [B, nb, W, E] (a view)
    unsafe = ((G_all[:, :, 0] - G_all[:, :, -1]).amax(dim=-1) / 2 > limit).any(dim=0)   # [nb]
    segments = op.segments
    if segments is not None:
        seg = windows.of(segments)
        unsafe |= (seg != seg[..., :1]).any(dim=-1).any(dim=0)
    causal = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    out = torch.zeros(batch, blocks, size, size, dtype=dtype, device=device)
    step = channel_step(channels, 6 * batch * blocks * size * 8, chunk_bytes)
    for c0 in range(0, channels, step):
        ch = slice(c0, min(c0 + step, channels))
        G = windows.of(cums[..., ch])                                          # [B, nb, W, c]
        rel = (G - (G[:, :, :1] + G[:, :, -1:]) / 2).to(dtype).clamp_(-limit, limit)   # unsafe ones are redone
        Q = torch.exp(rel)
        if op.row is not None:
            Q.mul_(windows.of(op.row[..., ch]))
        touched = torch.exp(rel.neg_()).mul_(windows.of(op.col[..., ch]))
        for shift in range(min(width, size)):
            keys = touched if op.taps is None else touched * op.taps[ch, width - 1 - shift]
            P = (Q @ keys.transpose(-1, -2)).masked_fill_(~causal, 0)          # [B, nb, W, W]: T[i, j']
            out[..., :size - shift] += P[..., shift:]                          # (T M)[i, j] += w T[i, j + s]
    if op.key_mask is not None:
        out.mul_(windows.of(op.key_mask)[:, :, None, :])
    if unsafe.any():
        index = unsafe.nonzero().reshape(-1)
        out[:, index] = diagonal_window_sums(op, windows.tokens(device)[index], chunk_bytes)
    return out


def diagonal_pair_sums(op: DiagonalOperator, cums: torch.Tensor, keys: Blocks, rows: Blocks, ref: Blocks,
                       chunk_bytes: int, weights: ProductWeights | None = None) -> torch.Tensor:
    """``[B, P, S, S]`` ``sum_d A_d[rows, key columns]`` of the pairs of one level, as ``Q Kc^T``.

    ``op`` and ``cums`` (float64 ``G``) are padded past the blocks' ends. Both exponents are
    ``<= 0`` (see the module docstring). With ``weights`` the rows of ``Q`` and the keys of ``Kc``
    are weighted; a pair's entries are one product per channel, so a clamp splits by sign:
    ``relu(Q) relu(Kc)^T + relu(-Q) relu(-Kc)^T``.
    """
    batch, _, channels = op.log_decay.shape
    pairs, span, width = rows.count, rows.size, op.width
    dtype, device = op.col.dtype, op.col.device
    segments = op.segments
    if segments is not None:
        seg_ref = ref.of(segments)                                             # [B, P, 1]
        row_same = (rows.of(segments) == seg_ref)[..., None]                   # [B, P, S, 1]
        key_same = (keys.of(segments) == seg_ref)[..., None]                   # [B, P, S + K - 1, 1]
    out = torch.zeros(batch, pairs, span, span, dtype=dtype, device=device)
    step = channel_step(channels, 6 * batch * pairs * (span + width) * 8, chunk_bytes)
    for c0 in range(0, channels, step):
        ch = slice(c0, min(c0 + step, channels))
        at_ref = ref.of(cums[..., ch])                                         # [B, P, 1, c]
        Q = torch.exp((rows.of(cums[..., ch]) - at_ref).to(dtype))             # [B, P, S, c], <= 1
        if op.row is not None:
            Q.mul_(rows.of(op.row[..., ch]))
        if segments is not None:
            Q.masked_fill_(~row_same, 0)
        touched = torch.exp((at_ref - keys.of(cums[..., ch])).to(dtype))       # [B, P, S + K - 1, c], <= 1
        touched.mul_(keys.of(op.col[..., ch]))
        if segments is not None:
            touched.masked_fill_(~key_same, 0)
        if op.taps is None:
            K = touched
        else:                                                                  # the conv folded into the keys
            K = touched[:, :, :span] * op.taps[ch, width - 1]
            for shift in range(1, width):
                K += touched[:, :, shift:shift + span] * op.taps[ch, width - 1 - shift]
        if op.key_mask is not None:
            K = K * keys.of(op.key_mask)[:, :, :span, None]
        if weights is not None:
            Q = Q * rows.of(weights.row[..., ch])
            K = K * keys.of(weights.key[..., ch])[:, :, :span]
            if weights.clamp:
                out += Q.clamp(min=0) @ K.clamp(min=0).transpose(-1, -2)
                Q, K = Q.neg_().clamp_(min=0), K.neg_().clamp_(min=0)
        out += Q @ K.transpose(-1, -2)
    return out


def default_block(cums: torch.Tensor, width: int, dtype: torch.dtype, largest: int = 32, smallest: int = 4,
                  unsafe_fraction: float = 0.1) -> int:
    """Band block ``T``: the largest power of two (``<= largest``) whose windows mostly factorise.

    A window of ``T + K - 1`` tokens factorises when half its total decay stays below
    :data:`SAFE_EXPONENT`; the others are computed entry by entry, which costs more. Strong decays
    therefore call for narrower windows: take the widest ``T`` with at most ``unsafe_fraction`` of
    its windows unsafe. ``cums``: ``[B, L, E]`` float64 cumulative log-decays.
    """
    length = cums.shape[1]
    limit = SAFE_EXPONENT.get(dtype, 20.0)
    block = largest
    while block > smallest:
        starts = torch.arange(0, length, block, device=cums.device)
        stops = (starts + block + width - 2).clamp(max=length - 1)
        half_span = (cums[:, starts] - cums[:, stops]).amax(dim=-1) / 2          # [B, nb]
        if float((half_span > limit).double().mean()) <= unsafe_fraction:
            return block
        block //= 2
    return block


def diagonal_sum(op: DiagonalOperator, block: int | None = None, chunk_bytes: int = DEFAULT_BLOCK_BYTES,
                 weights: ProductWeights | None = None) -> torch.Tensor:
    """``[B, L, L]`` ``sum_d A_d`` over every channel, by hierarchical tiles; never ``[E, L, L]``.

    With ``weights`` the weighted (and, where asked, clamped) sum ``sum_d f(r_i[d] A_d[i, j] k_j[d])``, conv
    taps included: off the band every channel's entry is one product ``Q[i, d] Kc[j, d]``, so the clamp
    splits by sign (:func:`diagonal_pair_sums`); in the band, where a conv sums differently signed terms into
    one entry, entries are formed per channel (:func:`diagonal_window_sums`), ``O(L W E)`` exponentials.

    Args:
        op: the operator; block: ``T``, the band block (default :func:`default_block`);
        chunk_bytes: bound on each temporary; weights: see above.
    """
    op = op.finite()
    batch, length, _ = op.log_decay.shape
    cums = op.log_decay.to(torch.float64).cumsum(dim=1)
    tiling = Tiling(length, block or default_block(cums, op.width, op.col.dtype), op.width)
    padded = op.padded(tiling.padded_length)              # decay 1 and zero scales past the end (cropped)
    cums = pad_tokens(cums, tiling.padded_length, replicate=True)
    if weights is None:
        band = lambda windows: diagonal_band_sums(padded, cums, windows, chunk_bytes)  # noqa: E731
    else:
        weights = weights.padded(tiling.padded_length)
        band = lambda windows: diagonal_window_sums(padded, windows.tokens(op.col.device), chunk_bytes,  # noqa: E731
                                                    weights)
    return assemble(tiling, batch, op.col.dtype, op.col.device, band=band,
                    pair=lambda span, keys, rows, ref: diagonal_pair_sums(padded, cums, keys, rows, ref, chunk_bytes,
                                                                          weights))


def diagonal_rows(op: DiagonalOperator, rows: torch.Tensor, how: str = "mean",
                  chunk_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """``[B, R, L]`` ``sum_d f(A_d[rows, :])`` with ``f`` the transform of aggregate ``how``, in ``O(R L E)``.

    Along one row every exponent ``G_i - G_j'`` (``j' <= i``) is ``<= 0``: no re-referencing needed.
    """
    op = op.finite()
    batch, length, channels = op.log_decay.shape
    width = op.width
    dtype, device = op.col.dtype, op.col.device
    cums = op.log_decay.to(torch.float64).cumsum(dim=1)
    positions = torch.arange(length, device=device)
    keep = (positions[None, :] <= rows[:, None]).expand(batch, len(rows), length)   # [B, R, L]
    segments = op.segments
    if segments is not None:
        keep = keep & (segments[:, rows, None] == segments[:, None, :])
    keep = keep[..., None]                                                    # [B, R, L, 1]
    out = torch.zeros(batch, len(rows), length, dtype=dtype, device=device)
    step = channel_step(channels, 4 * batch * len(rows) * length * 8, chunk_bytes)
    for c0 in range(0, channels, step):
        ch = slice(c0, min(c0 + step, channels))
        gap = (cums[:, rows, None, ch] - cums[:, None, :, ch]).clamp_(max=0).to(dtype)   # [B, R, L, c]
        D = gap.exp_().masked_fill_(~keep, 0).mul_(op.col[:, None, :, ch])
        if op.taps is None:
            A = D
        else:                                                                 # (D M)[i, j] = sum_s w[K-1-s] D[i, j+s]
            A = D * op.taps[ch, width - 1]
            for shift in range(1, min(width, length)):
                A[:, :, :length - shift] += D[:, :, shift:] * op.taps[ch, width - 1 - shift]
        if op.key_mask is not None:
            A.mul_(op.key_mask[:, None, :, None])
        if op.row is not None:
            A.mul_(op.row[:, rows, None, ch])
        out += channel_transform(A, how).sum(dim=-1)
    return out


# ------------------------------------------------------------------------------- layer mixin
class DiagonalDecomposition(LayerDecomposition):
    """A layer whose channels are the channels of one :class:`DiagonalOperator` (RG-LRU, HGRN).

    Subclasses provide ``diagonal_operator()`` for their variant and may set ``nonnegative`` where
    every entry of the variant's matrices is ``>= 0`` (then ``abs`` and ``pos`` are the signed mean).
    """

    #: band block ``T`` of the tiles (``None``: chosen from the decays, :func:`default_block`)
    tile_block: int | None = None

    def diagonal_operator(self) -> DiagonalOperator:
        raise NotImplementedError

    @property
    def nonnegative(self) -> bool:
        return False

    def _fast_aggregate(self, how: str) -> torch.Tensor | None:
        # the signed channel mean factorises (hierarchical tiles): never per-channel [c, L, L] blocks;
        # without conv taps |A| and relu(A) do too (_sign_split_sum)
        if how != "mean" and not self.nonnegative:
            return self._fast_abs_pos(how)
        if "mean" not in self._aggregates:   # one map serves all three when every entry is >= 0
            total = diagonal_sum(self.diagonal_operator(), self.tile_block, self.block_bytes)
            self._aggregates["mean"] = total / self.channels
        return self._aggregates["mean"]

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        # a few rows (raw / paper read the target row) cost O(R L E)
        return diagonal_rows(self.diagonal_operator(), rows, how, self.block_bytes) / self.channels

    def _sign_split_sum(self, op: DiagonalOperator, row: torch.Tensor, col: torch.Tensor, how: str) -> torch.Tensor:
        """``[B, L, L]`` ``sum_d f(row_i[d] e_d[i, j] col_j[d])`` for an operator without conv taps, whose
        channel matrices are ``row_i e_d[i, j] col_j`` with ``e_d > 0`` (products of decays, 0/1 resets):
        ``|.|`` takes ``|row|, |col|``; ``relu`` is ``e (row+ col+ + row- col-)``; ``"mean"`` is the plain sum."""
        total = lambda r, c: diagonal_sum(replace(op, row=r, col=c), self.tile_block, self.block_bytes)  # noqa: E731
        if how == "mean":
            return total(row, col)
        if how == "abs":
            return total(row.abs(), col.abs())
        return total(row.clamp(min=0), col.clamp(min=0)) + total((-row).clamp(min=0), (-col).clamp(min=0))

    def _split_operator(self) -> tuple[DiagonalOperator, torch.Tensor] | None:
        """The variant's operator and its rows (ones where it has none), or ``None`` where conv taps put a sum
        of differently signed terms inside each entry (then the channel blocks serve)."""
        op = self.diagonal_operator()
        if op.taps is not None or self.fold is not None:
            return None
        return op, op.row if op.row is not None else torch.ones_like(op.col)

    def _fast_abs_pos(self, how: str) -> torch.Tensor | None:
        split = self._split_operator()
        return None if split is None else self._sign_split_sum(split[0], split[1], split[0].col, how) / self.channels

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor | None:
        """``mean_d clamp(g_i[d] A_d[i, j] v_j[d], min=0)``: without conv taps two factorised channel sums (every
        decay product is positive, so the clamp splits by the signs of ``g row`` and ``col v``); with them
        :func:`diagonal_sum` with :class:`ProductWeights`; ``None`` for a folded layer."""
        split = self._split_operator()
        if split is None:
            if self.fold is not None:
                return None
            # conv taps: products off the band, entries per channel in it (diagonal_sum with weights)
            weights = ProductWeights(grad.to(self.dtype), self.values, clamp=not signed)
            return diagonal_sum(self.diagonal_operator(), self.tile_block, self.block_bytes, weights) / self.channels
        op, row = split
        return self._sign_split_sum(op, row * grad, op.col * self.values, "mean" if signed else "pos") / self.channels
