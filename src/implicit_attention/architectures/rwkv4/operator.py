"""RWKV-4 time mixing (HF ``RwkvSelfAttention``) as exact per-channel implicit attention: the math.

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
``O(L C)`` scan (:func:`.fast.wkv_log_normaliser`), they become part of the row factor, and the
off-diagonal weights ``exp((t-1-j) w + k_j - log Z_t)`` split into a row and a key factor per tile
of the lower triangle, each ``<= 1`` after a per-tile max over the keys (:func:`.fast.wkv_channel_sum`).
The ``exp(u + k_t)`` bonus sits on the diagonal, inside the band computed entry by entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
