"""RWKV-4's channel aggregates without per-channel blocks: the softmax denominators by an ``O(L C)`` scan,
then tiles whose row and key factors are ``<= 1`` (see the module docstring of :mod:`.operator`)."""

from __future__ import annotations

import torch

from ...memory import DEFAULT_BLOCK_BYTES
from ..tiled import Blocks, Tiling, assemble, channel_step, pad_tokens
from .operator import RwkvFactors


def wkv_log_normaliser(key: torch.Tensor, decay: torch.Tensor, first: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``[B, L, c]`` float64 ``log Z_t = log(sum_{j<t} exp((t-1-j) w + k_j) + exp(u + k_t))``, the
    softmax denominators of :func:`wkv_matrices`, in ``O(L c)``.

    A chunked scan: inside a chunk starting at ``a`` a ``logcumsumexp`` of ``k_j + (a - j) w``
    (re-referenced at the chunk, so the linear ramp never exceeds ``chunk |w|``), across chunks the
    carry ``P_a = log sum_{j<a} exp((a-1-j) w + k_j)``, which decays by ``exp(n w)`` per chunk.

    Args:
        key: ``[B, L, c]``; decay (``w < 0``), first (``u``): ``[c]``.
    """
    k, w, u = key.to(torch.float64), decay.to(torch.float64), first.to(torch.float64)
    batch, length, channels = k.shape
    out = torch.empty_like(k)
    carry = k.new_full((batch, 1, channels), float("-inf"))               # P_a
    for a in range(0, length, chunk):
        kc = k[:, a:a + chunk]
        n = kc.shape[1]
        ramp = torch.arange(n, device=k.device, dtype=k.dtype)[:, None] * w     # [n, c] (t - a) w
        running = torch.logcumsumexp(kc - ramp, dim=1)                    # log sum_{a<=j<=t} exp(k_j + (a-j) w)
        within = torch.cat([torch.full_like(running[:, :1], float("-inf")), running[:, :-1] + ramp[:-1]], dim=1)
        before = torch.logaddexp(carry + ramp, within)                   # log sum_{j<t} exp((t-1-j) w + k_j)
        out[:, a:a + n] = torch.logaddexp(before, u + kc)
        carry = torch.logaddexp(carry + n * w, running[:, -1:] + (n - 1) * w)
    return out


def wkv_channel_sum(f: RwkvFactors, gated: bool, block: int = 4, chunk_bytes: int = DEFAULT_BLOCK_BYTES, *,
                    row_weight: torch.Tensor | None = None, key_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L, L]`` ``sum_c diag(r_c) alpha_c`` (``gated``) or ``sum_c alpha_c``, never ``[C, L, L]``.

    With ``row_weight`` ``R`` and/or ``key_weight`` ``V`` (``[B, L, C]``, any sign) the weighted sum
    ``sum_c R[t, c] alpha_c[t, j] V[j, c]`` instead (``R`` replaces the gate: pass ``g * r`` for the
    attribution of a gated layer).

    Off the diagonal ``alpha_c[t, j] = exp((t-1-j) w + k_j - log Z_t)``: on a tile of keys ``J``
    before rows ``I`` with ``rho`` the last key and ``m_c = max_{j in J} (k_j + (rho - j) w)``,

        sum_c r_t alpha_c[t, j] = sum_c Q[t, c] K[j, c]                          ([|I|, C] x [C, |J|])
        Q[t, c] = r_t exp(-log Z_t + (t-1-rho) w + m_c),   K[j, c] = exp(k_j + (rho-j) w - m_c)

    ``K <= 1`` by the choice of ``m``, and ``Q <= r_t``: ``m_c + (t-1-rho) w`` is one of the terms
    of ``Z_t``. So neither factor overflows at any length or key size (the max-subtraction of the
    softmax, per tile). The exact per-row denominators come first (:func:`wkv_log_normaliser`);
    the ``exp(u + k_t)`` bonus and the rest of the band near the diagonal, where rows and keys
    interleave, are computed entry by entry in windows of ``block`` tokens. Exponents are formed
    in float64. ``chunk_bytes`` bounds each temporary.
    """
    batch, length, channels = f.key.shape
    dtype, device = f.key.dtype, f.key.device
    tiling = Tiling(length, block, 1)
    size = tiling.padded_length
    log_z = wkv_log_normaliser(f.key, f.decay, f.first)
    # padding rows have Z = inf (weights 0) and are cropped anyway
    log_z = torch.cat([log_z, log_z.new_full((batch, size - length, channels), float("inf"))], dim=1)
    key = pad_tokens(f.key.to(torch.float64), size)
    if row_weight is None and gated:
        row_weight = f.receptance
    row = pad_tokens(row_weight, size) if row_weight is not None else None
    col = pad_tokens(key_weight, size) if key_weight is not None else None
    w, u = f.decay.to(torch.float64), f.first.to(torch.float64)

    def band(windows: Blocks) -> torch.Tensor:
        T = windows.size
        t = torch.arange(T, device=device)
        distance = (t[:, None] - 1 - t[None, :]).to(torch.float64)[:, :, None]    # [T, T, 1]
        future = (t[None, :] > t[:, None])[:, :, None]
        out = torch.zeros(batch, windows.count, T, T, dtype=dtype, device=device)
        step = channel_step(channels, 3 * batch * windows.count * T * T * 8, chunk_bytes)
        for c0 in range(0, channels, step):
            ch = slice(c0, min(c0 + step, channels))
            k = windows.of(key[..., ch])                                           # [B, nb, T, c]
            logits = distance * w[ch] + k[:, :, None]                              # [B, nb, T, T, c]
            logits.diagonal(dim1=2, dim2=3).copy_((u[ch] + k).transpose(-1, -2))   # the bonus at j = t
            logits -= windows.of(log_z[..., ch])[:, :, :, None]
            A = torch.exp(logits.masked_fill_(future, float("-inf")).to(dtype))
            if row is not None:
                A.mul_(windows.of(row[..., ch])[:, :, :, None])
            if col is not None:
                A.mul_(windows.of(col[..., ch])[:, :, None, :])
            out += A.sum(dim=-1)
        return out

    def pair(span: int, keys: Blocks, rows: Blocks, ref: Blocks) -> torch.Tensor:
        ramp = torch.arange(span, device=device, dtype=torch.float64)[:, None]     # [S, 1]
        out = torch.zeros(batch, keys.count, span, span, dtype=dtype, device=device)
        step = channel_step(channels, 5 * batch * keys.count * span * 8, chunk_bytes)
        for c0 in range(0, channels, step):
            ch = slice(c0, min(c0 + step, channels))
            key_exp = keys.of(key[..., ch]) + ramp.flip(0) * w[ch]                 # k_j + (rho - j) w
            top = key_exp.amax(dim=2, keepdim=True)                                # [B, P, 1, c]
            K = torch.exp((key_exp - top).to(dtype))
            Q = torch.exp((ramp * w[ch] + top - rows.of(log_z[..., ch])).to(dtype))   # t - 1 - rho = 0, 1, ...
            if row is not None:
                Q.mul_(rows.of(row[..., ch]))
            if col is not None:
                K.mul_(keys.of(col[..., ch]))
            out += Q @ K.transpose(-1, -2)
        return out

    return assemble(tiling, batch, dtype, device, band, pair)


def wkv_rows(f: RwkvFactors, rows: torch.Tensor, gated: bool, chunk_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """``[B, R, L]`` rows ``rows`` of :func:`wkv_channel_sum`, in ``O(R L C)`` (exponents ``<= 0``)."""
    batch, length, channels = f.key.shape
    dtype, device = f.key.dtype, f.key.device
    log_z = wkv_log_normaliser(f.key, f.decay, f.first)
    key, w, u = f.key.to(torch.float64), f.decay.to(torch.float64), f.first.to(torch.float64)
    j = torch.arange(length, device=device)
    distance = (rows[:, None] - 1 - j[None, :]).to(torch.float64)[..., None]       # [R, L, 1]
    current = (j[None, :] == rows[:, None])[..., None]
    future = (j[None, :] > rows[:, None])[..., None]
    out = torch.zeros(batch, len(rows), length, dtype=dtype, device=device)
    step = channel_step(channels, 3 * batch * len(rows) * length * 8, chunk_bytes)
    for c0 in range(0, channels, step):
        ch = slice(c0, min(c0 + step, channels))
        k = key[:, None, :, ch]                                                  # [B, 1, L, c]
        logits = torch.where(current, u[ch] + k, distance * w[ch] + k)           # [B, R, L, c]
        logits = (logits - log_z[:, rows, None, ch]).masked_fill_(future, float("-inf"))
        A = torch.exp(logits.to(dtype))
        if gated:
            A.mul_(f.receptance[:, rows, None, ch])
        out += A.sum(dim=-1)
    return out


def wkv_attribution(f: RwkvFactors, grad: torch.Tensor, variant: str, signed: bool = False, block: int = 4,
                    chunk_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """``[B, L, L]`` ``sum_c clamp(g_ic A_c[i, j] v_jc, min=0)`` over the operator channels (not divided by
    their number), from weighted channel sums (:func:`wkv_channel_sum`), never ``[C, L, L]``.

    Every ``A_c`` entry is ``>= 0`` (softmax weights, a sigmoid gate), so the clamp splits by sign:
    ``clamp(g A v) = A (relu(g) relu(v) + relu(-g) relu(-v))``, two weighted sums per value stream.
    ``unified``'s second stream ``q`` meets ``alpha[i, j + 1]``: its sums weight key ``j`` by ``q_{j-1}``
    and are shifted one column left. ``grad`` is at the matrix output (``[B, L, C]``, the gate already
    in it for ``wkv``); ``signed`` keeps the sign (one sum per stream).
    """
    gate = f.receptance if variant != "wkv" else None
    rows = grad if gate is None else grad * gate
    streams = [(f.value_now, False), (f.value_prev, True)] if variant == "unified" else [(f.value, False)]
    total = None
    for values, shifted in streams:
        if shifted:          # key j' carries q_{j'-1}; column j of the stream's map is column j + 1 here
            values = torch.nn.functional.pad(values, (0, 0, 1, -1))
        if signed:
            part = wkv_channel_sum(f, False, block, chunk_bytes, row_weight=rows, key_weight=values)
        else:
            part = sum(wkv_channel_sum(f, False, block, chunk_bytes, row_weight=(sign * rows).clamp(min=0),
                                       key_weight=(sign * values).clamp(min=0)) for sign in (1, -1))
        if shifted:
            part = torch.nn.functional.pad(part[..., 1:], (0, 1))
        total = part if total is None else total + part
    return total
