"""RWKV-4 time mixing (HF ``RwkvSelfAttention``) as exact per-channel implicit attention.

Glossary: ``B`` batch, ``L`` tokens, ``H`` hidden size (the layer input, after ``ln1``), ``C`` the
attention width (``attention_hidden_size``, the operator's channels), ``c`` a block of channels.

The layer (``transformers.models.rwkv.modeling_rwkv``, sequence path without a state)::

    x~*_t = mu_* h_t + (1 - mu_*) h_{t-1}        (h_{-1} = 0; mu_* per hidden channel, * in k, v, r)
    k = W_k x~k,   v = W_v x~v,   r = sigmoid(W_r x~r)                              [B, L, C]
    wkv_t[c] = sum_{j<=t} alpha_c[t, j] v_j[c]
    alpha_c[t, j] = exp(l[t, j]) / sum_{j'<=t} exp(l[t, j'])                      (a softmax over j <= t)
    l[t, j] = -(t-1-j) exp(time_decay[c]) + k_j[c]   (j < t),   l[t, t] = time_first[c] + k_t[c]
    out_t = r_t * wkv_t          (the input of ``output``, the layer's output projection)

``alpha`` is computed as a masked softmax, i.e. with max-subtraction (log-sum-exp): ``exp(k)`` alone
overflows in float32 for large keys. The module reads ``k`` in float32 (``key.float()``) whatever its
dtype, so the factors round ``k`` through float32 as well.

**Single-stream operator (variant ``no_shift``, exact):** ``A_c = diag(r_c) alpha_c`` with values
``v = W_v x~v`` (after the token shift) and no offset.

**Why one value stream cannot hold the value-path token shift.** The value of token ``j`` that enters the
recurrence is ``v_j = W_v (mu_v * h_j) + W_v ((1 - mu_v) * h_{j-1}) = p_j + q_{j-1}`` with
``p = W_v diag(mu_v) h`` and ``q = W_v diag(1 - mu_v) h``. A token shift commutes with the channel
map ``W_v``, but ``mu_v`` weights the *hidden* channels, so in the inner channels ``c`` the two-tap
mixing is ``v_t = P h_t + Q h_{t-1}`` with two different matrices ``P = W_v diag(mu_v)`` and
``Q = W_v diag(1 - mu_v)``. Putting the shift inside a per-channel operator ``A_c`` means finding
one value stream ``s`` (per inner channel, a function of one token) and taps with
``v_t[c] = a_t[c] s_t[c] + b_t[c] s_{t-1}[c]``. With ``s = W_v h`` this requires
``W_v diag(mu_v) = diag(x) W_v`` for some ``x``, which holds only when ``mu_v`` is constant over
the hidden channels each row of ``W_v`` reads (then ``a = mu_v``, ``b = 1 - mu_v``). In general the
only single-stream choices are data-controlled *ratios* ``a_t = p_t / s_t``, unbounded where
``s_t[c]`` is near zero (heavy-tailed entries that would dominate ``|A|`` aggregates), or a second
value stream, which the ``[B, C, L, L]`` per-channel form cannot hold. So the exact, well-conditioned
operator takes ``v`` (after the shift and ``W_v``) as its values: the shift is a two-tap mixing of
the *hidden* stream that happens before the values are formed, and ``A_c`` holds every token mixing
that happens after (the WKV recurrence with its ``time_first`` bonus and the receptance gate).
The key and receptance shifts are data-controlled constants inside ``k`` and ``r``.

**Padding.** ``RwkvModel`` ignores ``attention_mask`` (it warns and reads every token), so the
matrices include padding columns and the layer's ``mask`` is all ones: the decomposition mirrors
the module, which does read the padding tokens.

**The unified operator: the shift inside, on two value streams (variant ``unified``, exact).** With
``p = W_v diag(mu_v) h`` and ``q = W_v diag(1 - mu_v) h`` (each a function of one token),
``sum_j alpha[i, j] v_j = sum_j alpha[i, j] p_j + sum_j alpha[i, j + 1] q_j``. The variant has
``2C`` operator channels: channel ``c`` is ``diag(r_c) alpha_c`` on ``p``, channel ``C + c`` is
``diag(r_c) alpha_c S`` on ``q`` with ``(alpha S)[i, j] = alpha[i, j + 1]`` (the two-tap shift
moved into the matrix); ``fold`` adds both into output channel ``c``. Its aggregates average over
the ``2C`` operator channels, so the map shows where each token's value *and* the token shift
reach.

Variants: ``unified`` (exact, the value-path token shift inside the operator on two value
streams, ``2C`` operator channels folded into ``C`` outputs); ``no_shift`` (exact,
``diag(r) alpha`` on the values after the shift); ``wkv`` (``alpha`` alone, the recurrence
without the receptance gate; not exact, its matrix gradient carries ``r``).

**Aggregates without per-channel blocks.** Every entry is ``>= 0``, so the ``mean``, ``abs`` and
``pos`` maps are one map, the channel mean of ``diag(r) alpha`` (``unified``: its average with the
same map shifted by one column, the ``q`` stream). The per-row softmax denominators ``Z_t[c]`` do
not factorise over ``(t, j)``, but they are one number per row and channel: computed first by an
``O(L C)`` scan (:func:`wkv_log_normaliser`), they become part of the row factor, and the
off-diagonal weights ``exp((t-1-j) w + k_j - log Z_t)`` split into a row and a key factor per tile
of the lower triangle, each ``<= 1`` after a per-tile max over the keys (:func:`wkv_channel_sum`).
The ``exp(u + k_t)`` bonus sits on the diagonal, inside the band computed entry by entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import DEFAULT_BLOCK_BYTES
from .base import AGGREGATES, LayerDecomposition
from .registry import Architecture, CapturedLayer, register
from .tiled import Blocks, Tiling, assemble, channel_step, pad_tokens

#: The formulations offered; ``unified`` is the exact default.
VARIANTS: tuple[str, ...] = ("unified", "no_shift", "wkv")
EXACT_VARIANTS: frozenset[str] = frozenset({"unified", "no_shift"})


@dataclass
class RwkvFactors:
    """Every data-controlled quantity of one RWKV-4 time-mixing layer, in the compute dtype.

    Attributes:
        key: ``[B, L, C]`` ``k = W_k x~k`` (rounded through float32 as the module reads it).
        value: ``[B, L, C]`` ``v = W_v x~v``, the value stream.
        value_now: ``[B, L, C]`` ``p = W_v diag(mu_v) h``, the current-token part of ``v``.
        value_prev: ``[B, L, C]`` ``q = W_v diag(1 - mu_v) h``, the part ``v`` takes from the next token.
        receptance: ``[B, L, C]`` ``r = sigmoid(W_r x~r)``, the output gate.
        decay: ``[C]`` ``-exp(time_decay)`` (negative), the per-step log-decay.
        first: ``[C]`` ``time_first``, the bonus of the current token.
        mask: ``[B, L]`` all ones (the module reads every token, see the module docstring).
    """

    key: torch.Tensor
    value: torch.Tensor
    value_now: torch.Tensor
    value_prev: torch.Tensor
    receptance: torch.Tensor
    decay: torch.Tensor
    first: torch.Tensor
    mask: torch.Tensor


def rwkv_factors(layer: nn.Module, hidden: torch.Tensor, dtype: torch.dtype) -> RwkvFactors:
    """Recompute the factors of ``layer`` (``RwkvSelfAttention``) for its input ``hidden [B, L, H]``."""
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    h = hidden.detach().to(dtype)
    shifted = F.pad(h, (0, 0, 1, -1))                       # h_{t-1}, zero before the first token
    mixed = {}
    for name in ("key", "value", "receptance"):
        mu = p(getattr(layer, f"time_mix_{name}"))
        mixed[name] = F.linear(h * mu + shifted * (1 - mu), p(getattr(layer, name).weight))
    batch, length, _ = h.shape
    mu_v, w_v = p(layer.time_mix_value), p(layer.value.weight)
    return RwkvFactors(
        key=mixed["key"].float().to(dtype),                 # the module's ``key.float()``
        value=mixed["value"],
        value_now=F.linear(h * mu_v, w_v),
        value_prev=F.linear(h * (1 - mu_v), w_v),
        receptance=torch.sigmoid(mixed["receptance"]),
        decay=-torch.exp(p(layer.time_decay)),
        first=p(layer.time_first),
        mask=torch.ones(batch, length, dtype=dtype, device=h.device),
    )


def wkv_matrices(key: torch.Tensor, decay: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``[B, c, L, L]`` ``alpha_c[t, j]``, the WKV weights, as a masked softmax over ``j <= t``.

    Args:
        key: ``[B, L, c]``; decay, first: ``[c]``.
    """
    length = key.shape[1]
    t = torch.arange(length, device=key.device)
    distance = (t[:, None] - 1 - t[None, :]).to(key.dtype)              # [L, L] t-1-j
    logits = decay[None, :, None, None] * distance + key.transpose(1, 2)[:, :, None, :]
    diagonal = (first[None, :, None] + key.transpose(1, 2))             # [B, c, L]
    logits = logits.diagonal_scatter(diagonal, dim1=-2, dim2=-1)
    future = torch.ones(length, length, dtype=torch.bool, device=key.device).triu(1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def shift_left(matrices: torch.Tensor) -> torch.Tensor:
    """``[..., L, L]``: ``M S`` with ``(M S)[i, j] = M[i, j + 1]`` (0 in the last column)."""
    return torch.nn.functional.pad(matrices[..., 1:], (0, 1))


def rwkv_block(factors: RwkvFactors, channels: slice, variant: str) -> torch.Tensor:
    """Matrices ``[B, c, L, L]`` of ``variant`` for a block of channels (of ``2C`` for ``unified``)."""
    if variant == "unified":
        width = factors.value.shape[-1]
        parts = []
        for half in (0, 1):                                   # operator channels [0, C) and [C, 2C)
            start, stop = max(channels.start, half * width), min(channels.stop, (half + 1) * width)
            if start < stop:
                block = rwkv_block(factors, slice(start - half * width, stop - half * width), "no_shift")
                parts.append(shift_left(block) if half else block)
        return torch.cat(parts, dim=1)
    alpha = wkv_matrices(factors.key[..., channels], factors.decay[channels], factors.first[channels])
    if variant == "wkv":
        return alpha
    return alpha.mul_(factors.receptance[..., channels].transpose(1, 2)[..., None])


# ------------------------------------------------------------------------ fast channel aggregates
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


def wkv_channel_sum(f: RwkvFactors, gated: bool, block: int = 4,
                    chunk_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """``[B, L, L]`` ``sum_c diag(r_c) alpha_c`` (``gated``) or ``sum_c alpha_c``, never ``[C, L, L]``.

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
    row = pad_tokens(f.receptance, size) if gated else None
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


class RwkvLayerDecomposition(LayerDecomposition):
    """An RWKV-4 time-mixing layer as per-channel implicit attention over its attention width ``C``.

    Every entry is ``>= 0`` (softmax weights times the sigmoid gate), so the ``mean``, ``abs`` and
    ``pos`` aggregates are one map: the factorised channel sum of :func:`wkv_channel_sum` (for
    ``unified``, the ``q`` stream's channels hold the same matrices shifted by one column).
    """

    block_temporaries = 4
    #: band block of the tiles (:func:`wkv_channel_sum`; 4 measured fastest on CPU at L = 256..1024)
    tile_block: int = 4

    def __init__(self, factors: RwkvFactors, *, variant: str, **kwargs):
        self.factors = factors
        values, fold = factors.value, None
        if variant == "unified":
            values = torch.cat([factors.value_now, factors.value_prev], dim=-1)
            fold = torch.arange(factors.value.shape[-1], device=values.device).repeat(2)
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=values,
                         offset=torch.zeros_like(values), mask=factors.mask, fold=fold, **kwargs)

    def _block(self, channels: slice):
        return rwkv_block(self.factors, channels, self.variant), None

    def _from_channel_sum(self, total: torch.Tensor) -> torch.Tensor:
        """The channel mean from ``sum_c A_c`` over the ``C`` single-stream channels (unified: the
        ``p`` stream's ``A_c`` and the ``q`` stream's ``A_c S``, ``2C`` channels)."""
        if self.variant == "unified":
            total = total + shift_left(total)
        return total / self.channels

    def aggregate(self, how="mean", channel=None):
        # one factorised map serves all three aggregates (every entry is >= 0)
        if channel is None and how in AGGREGATES and how not in self._aggregates:
            if "mean" not in self._aggregates:
                total = wkv_channel_sum(self.factors, self.variant != "wkv", self.tile_block, self.block_bytes)
                self._aggregates["mean"] = self._from_channel_sum(total)
            self._aggregates[how] = self._aggregates["mean"]
        return super().aggregate(how, channel)

    def aggregate_rows(self, rows, how="mean"):
        # a few rows (raw / paper read the target row) cost O(R L C)
        rows = self._row_index(rows)
        if how not in AGGREGATES:
            raise ValueError(f"how must be one of {AGGREGATES}, got {how!r}")
        if how in self._aggregates:
            return self._aggregates[how][:, rows]
        return self._from_channel_sum(wkv_rows(self.factors, rows, self.variant != "wkv", self.block_bytes))

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # out = r * (alpha v): the gate "wkv" leaves out multiplies the gradient reaching alpha.
        return grad * self.factors.receptance if self.variant == "wkv" else grad


def _build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> RwkvLayerDecomposition:
    factors = rwkv_factors(captured.module, captured.inputs, dtype)
    return RwkvLayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                  output=captured.output.detach().to(dtype))


register(Architecture(
    name="rwkv4",
    module_classes=("transformers.models.rwkv.modeling_rwkv.RwkvSelfAttention",),
    model_classes=("RwkvForCausalLM", "RwkvModel"),
    variants=VARIANTS,
    output_module="output",
    build=_build,
    channels=lambda layer: layer.attention_hidden_size,
))
