"""Delta-rule mixers (Gated DeltaNet, Kimi Delta Attention) as implicit attention: the math.

Glossary: ``B`` batch, ``L`` tokens, ``H`` value heads (``num_v_heads``; query/key heads are repeated
to them where fewer), ``Dk`` key dim per head, ``Dv`` value dim per head, ``C = H Dv`` the operator's
channels (the value width), ``K`` conv width, ``h(c)`` the head of channel ``c``, ``T`` a chunk.

**The recurrence** (``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule`` of the
modeling files, and ``chunk_kimi_delta_attention`` for KDA). Per head the state ``S_t [Dk, Dv]``
is first decayed, then corrected towards ``v_t`` along ``k_t`` and read by ``q_t``::

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

with ``alpha_t = exp(g_t)``: one scalar per head for Gated DeltaNet (``g = -exp(A_log) softplus(a +
dt_bias)``), one per key channel for KDA (its forget gate). ``q, k`` are L2-normalised and ``q`` is
scaled by ``Dk^-1/2`` inside the kernel (both included in ``q, k`` here); ``beta = sigmoid(b)``
(times 2 for OLMo-Hybrid's ``allow_neg_eigval``). Unrolled, for a fixed input the map ``v -> o``
is linear and the same for every value channel of the head::

    A_h[i, j] = beta_j k_j^T F_{j+1}^T F_{j+2}^T ... F_i^T q_i      (j <= i; empty product on the diagonal)
    F_t^T     = Diag(alpha_t) (I - beta_t k_t k_t^T),     o_i = sum_j A_h[i, j] v_j.

**Chunkwise, WY / UT form** (:func:`delta_attention`): run the module's own chunk algorithm with the
identity as values (``v_j = e_j``), so that the output rows are the rows of ``A_h`` and the state
``S [Dk, L]`` holds, in column ``j``, the key of token ``j`` carried to the current chunk
(``F_t ... F_{j+1} beta_j k_j``). Within a chunk with cumulative log-decays ``G_t = sum_{s<=t} g_s``
(inside the chunk) the unit-lower-triangular system ``I + tril(diag(beta) (K K^T) ⊙ exp(G_t - G_s), -1)``
is solved for the new values ``U`` (``diag(beta)`` on the chunk's own columns) and the decayed keys
``W`` (``diag(beta) K ⊙ exp(G)``); then ``V_new = U - W S``, the chunk's rows are
``(Q ⊙ exp(G)) S + tril((Q K^T) ⊙ exp(G_t - G_s)) V_new``, and the state moves on by the chunk's
``Dk x Dk`` transition in WY form, ``S <- (Diag(exp(G_T)) - (K ⊙ exp(G_T - G))^T W) S + (K ⊙ exp(G_T
- G))^T U``. Every exponent is ``<= 0``; nothing holds ``[L, L, Dk, Dk]``; a chunk holds ``[T, T, Dk]``
pairwise decays only for per-channel (KDA) decays. :mod:`.naive` multiplies the transitions out.

**Around the recurrence.** The mixer projects ``[q; k; x]`` (and the gate ``z``, ``b``, ``a``),
applies a causal depthwise conv and a SiLU to all three, and after the recurrence the gated RMS
norm per head ``norm(o) * act(z)`` (``act`` SiLU for Gated DeltaNet, sigmoid for KDA and
Qwen4-Exp's ``output_gate_type``). The conv output of the ``q, k`` channels enters only the
data-controlled coefficients of ``A_h``; **the values are the value channels at the conv input**,
``x`` (the value projection, zero on padding). For channel ``c`` of head ``h``::

    u_c = silu(M_c x_c + b_c) = diag(sigmoid(m_c)) (M_c x_c + b_c),       m_c = M_c x_c + b_c
    out_c[i] = w_c act(z_i[c]) r_i[h] o_i[c],       r_i[h] = rsqrt(mean_{c' in h} o_i[c']^2 + eps)

with ``M_c`` the conv as a banded matrix (``M_c[i, j] = w_c[K-1-(i-j)]``), and ``r`` a data-controlled
constant (read from the module's own norm input where it was captured). Hence exactly::

    unified:  A_c = diag(w_c act(z_c) r_h) A_h diag(sigmoid(m_c)) M_c,   values x,
              offset_c = diag(w_c act(z_c) r_h) A_h diag(sigmoid(m_c)) b_c 1   (only with a conv bias)
    no_conv:  drop M_c, values m (the conv output; exact)
    delta:    A_h alone over u = silu(m) (the recurrence; exact=False)
    no_gate:  drop diag(act(z)) (keep the norm scale and weight; exact=False)
    no_act:   drop diag(sigmoid(m)) (exact=False)

The stock layers have no conv bias (``bias=False``), so the offset is ``None``; the code keeps it
for a conv with one.

**Float32.** The modules run the recurrence in float32 whatever their dtype (``q, k, v, beta, g``
cast to float32, ``l2norm`` in float32) and their gated norm in float32. The factors round ``q, k``
(normalised in float32), ``beta`` and ``g`` the same way; the values cannot be rounded inside a
linear operator, so a float64 model's output differs from the exact operator by the kernel's
float32 arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..primitives import conv_right

#: ``unified`` is the exact default; ``no_conv`` is exact too; ``delta`` is the recurrence alone.
VARIANTS: tuple[str, ...] = ("unified", "no_conv", "delta", "no_gate", "no_act")
#: Which variants are exact identities of the layer.
EXACT_VARIANTS: frozenset[str] = frozenset({"unified", "no_conv"})

#: Default chunk of the WY form (the modules' own chunk size).
CHUNK_SIZE = 64


@dataclass
class DeltaFactors:
    """Every data-controlled quantity of one delta-rule mixer for one input, in the compute dtype.

    Attributes:
        x: ``[B, L, C]`` the value channels at the conv input (the values of ``unified``).
        conv_out: ``[B, L, C]`` ``m = M x + b`` of the value channels (before the SiLU).
        conv_weight: ``[C, K]`` and conv_bias ``[C]`` (or ``None``) of the value channels.
        q: ``[B, L, H, Dk]`` queries after conv, SiLU, L2 norm and the ``Dk^-1/2`` scale, repeated
            to the value heads; k: ``[B, L, H, Dk]`` keys, likewise (no scale).
        beta: ``[B, L, H]`` the delta rule's step.
        log_decay: ``[B, L, H, 1]`` (scalar per head) or ``[B, L, H, Dk]`` (per key channel) ``g <= 0``.
        gate: ``[B, L, C]`` ``act(z)``, the output gate.
        norm_weight: ``[C]`` the gated norm's weight per channel (repeated over the heads).
        norm_scale: ``[B, L, H]`` ``r = rsqrt(mean o^2 + eps)`` per head and token.
        attention: ``[B, H, L, L]`` ``A_h`` (:func:`delta_attention`).
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
    """

    x: torch.Tensor
    conv_out: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    q: torch.Tensor
    k: torch.Tensor
    beta: torch.Tensor
    log_decay: torch.Tensor
    gate: torch.Tensor
    norm_weight: torch.Tensor
    norm_scale: torch.Tensor | None
    attention: torch.Tensor | None
    mask: torch.Tensor

    @property
    def num_heads(self) -> int:
        return self.q.shape[2]

    @property
    def head_v(self) -> int:
        return self.x.shape[-1] // self.num_heads

    @property
    def act_gate(self) -> torch.Tensor:
        """``[B, L, C]`` ``sigmoid(m)``: the SiLU after the conv as a column gate."""
        return torch.sigmoid(self.conv_out)

    @property
    def u(self) -> torch.Tensor:
        """``[B, L, C]`` ``silu(m)``, the recurrence's values."""
        return self.conv_out * self.act_gate

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., C]``: each head's value repeated to its ``Dv`` channels."""
        return t.repeat_interleave(self.head_v, dim=-1)

    def row(self, variant: str) -> torch.Tensor:
        """``[B, L, C]`` what multiplies the rows of channel ``c``: ``w r act(z)`` (``w r`` for ``no_gate``)."""
        row = self.norm_weight * self.per_channel(self.norm_scale)
        return row if variant == "no_gate" else row * self.gate

    def values(self, variant: str) -> torch.Tensor:
        """``[B, L, C]`` the values of ``variant`` (``x``, ``m`` for ``no_conv``, ``u`` for ``delta``)."""
        return {"no_conv": self.conv_out, "delta": self.u}.get(variant, self.x)


def delta_attention(q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor,
                    chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """``[B, H, L, L]`` ``A_h[i, j] = beta_j k_j^T F_{j+1}^T ... F_i^T q_i``, chunkwise in WY / UT form.

    Args:
        q, k: ``[B, L, H, Dk]``; beta: ``[B, L, H]``; log_decay: ``[B, L, H, 1]`` or ``[B, L, H, Dk]``.
        chunk_size: tokens per chunk ``T``.

    See the module docstring: the module's chunk algorithm with the identity as values. Per chunk:
    ``O(T^2 Dk)`` for its systems, ``O(T L Dk)`` for reading and moving the state ``[Dk, L]``.
    """
    batch, length, heads, size = k.shape
    q, k, g = (t.transpose(1, 2) for t in (q, k, log_decay))                  # [B, H, L, .]
    beta = beta.transpose(1, 2)                                                # [B, H, L]
    per_channel = g.shape[-1] > 1
    A = q.new_zeros(batch, heads, length, length)
    state = q.new_zeros(batch, heads, size, length)
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        n = end - start
        qc, kc, bc = q[:, :, start:end], k[:, :, start:end], beta[:, :, start:end]
        G = g[:, :, start:end].cumsum(2)                                       # [B, H, T, 1 or Dk]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if per_channel:                                                        # exp(G_t - G_s) per key channel
            decay = (G[:, :, :, None] - G[:, :, None]).masked_fill(~causal[..., None], float("-inf")).exp()
            kk = torch.einsum("bhtd,bhsd,bhtsd->bhts", kc, kc, decay)
            qk = torch.einsum("bhtd,bhsd,bhtsd->bhts", qc, kc, decay)
        else:
            decay = (G[..., 0, None] - G[..., None, :, 0]).masked_fill(~causal, float("-inf")).exp()
            kk = (kc @ kc.transpose(-1, -2)) * decay
            qk = (qc @ kc.transpose(-1, -2)) * decay
        system = torch.eye(n, dtype=q.dtype, device=q.device) + (bc[..., None] * kk).tril(-1)
        rhs = torch.cat([torch.diag_embed(bc), bc[..., None] * kc * G.exp()], dim=-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        U, W = solved[..., :n], solved[..., n:]                                # [B, H, T, T], [B, H, T, Dk]
        past = state[..., :end]
        new = -(W @ past)                                                      # [B, H, T, end]
        new[..., start:end] += U
        A[:, :, start:end, :end] = (qc * G.exp()) @ past + qk @ new
        last = G[:, :, -1:]                                                    # [B, H, 1, 1 or Dk]
        state[..., :end] = last.transpose(-1, -2).exp() * past + (kc * (last - G).exp()).transpose(-1, -2) @ new
    return A


def channel_heads(f: DeltaFactors, channels: slice) -> tuple[slice, torch.Tensor]:
    """The slice of heads that ``channels`` touch, and each channel's index into that slice."""
    index = torch.arange(f.x.shape[-1], device=f.x.device)[channels] // f.head_v
    first = int(index[0])
    return slice(first, int(index[-1]) + 1), index - first


def delta_block(f: DeltaFactors, channels: slice, variant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    heads, index = channel_heads(f, channels)
    T = f.attention[:, heads][:, index]                                         # [B, c, L, L], a copy per channel
    if variant == "delta":
        return T, None
    if variant != "no_act":
        T.mul_(f.act_gate[..., channels].transpose(1, 2)[:, :, None, :])       # diag(sigmoid m) on the right
    use_conv = variant != "no_conv"
    offset = None
    if use_conv and f.conv_bias is not None:
        offset = T.sum(dim=-1) * f.conv_bias[channels][None, :, None]           # [B, c, L]
    if use_conv:
        T = conv_right(T, f.conv_weight[channels])
    row = f.row(variant)[..., channels].transpose(1, 2)                         # [B, c, L]
    T.mul_(row[..., None])
    return T, None if offset is None else (offset * row).transpose(1, 2)


def matrix_rows(f: DeltaFactors, variant: str, rows: torch.Tensor) -> torch.Tensor:
    """``[B, R, C, L]`` rows ``rows`` (``[R]`` in ``[0, L)``) of every channel's matrix, ``O(R L C K)``
    from the rows of the per-head ``A_h`` (never a ``[B, C, L, L]`` block)."""
    heads = torch.arange(f.x.shape[-1], device=f.x.device) // f.head_v
    T = f.attention[:, :, rows][:, heads]                                       # [B, C, R, L]
    if variant != "delta":
        if variant != "no_act":
            T = T * f.act_gate.transpose(1, 2)[:, :, None, :]
        if variant != "no_conv":
            T = conv_right(T, f.conv_weight)
        T = T * f.row(variant)[:, rows].transpose(1, 2)[..., None]
    return T.transpose(1, 2)


def signed_mean(f: DeltaFactors, variant: str, heads_per_block: int | None = None) -> torch.Tensor:
    """``[B, L, L]`` the signed channel mean of ``variant``'s matrices, never holding ``[B, C, L, L]``.

    Channels of a head share ``A_h``; with ``o`` the row factor, ``s`` the column gate and the conv
    ``(T M)[i, j] = sum_k w[K-1-k] T[i, j+k]``::

        sum_c A_c[i, j] = sum_k V_k[i, j+k],   V_k = sum_h A_h ⊙ (O_h diag(w_h[K-1-k]) Sigma_h)

    with ``O_h [L, Dv]`` and ``Sigma_h [Dv, L]`` the head's ``o`` and ``s``: one ``[L, Dv] x [Dv, L]``
    product per head and tap.
    """
    batch, length, channels = f.x.shape
    if variant == "delta":
        return f.attention.mean(dim=1)
    out = torch.zeros(batch, length, length, dtype=f.x.dtype, device=f.x.device)
    row = f.row(variant)
    column = f.act_gate if variant != "no_act" else torch.ones_like(f.x)
    taps = f.conv_weight if variant != "no_conv" else torch.ones_like(f.conv_weight[:, :1])
    width, P, H = taps.shape[1], f.head_v, f.num_heads
    step = heads_per_block or H
    for start in range(0, H, step):
        heads = slice(start, min(start + step, H))
        ch = slice(heads.start * P, heads.stop * P)
        A = f.attention[:, heads]                                                # [B, h, L, L]
        O = row[..., ch].unflatten(-1, (-1, P)).transpose(1, 2)                  # [B, h, L, P]
        Sigma = column[..., ch].unflatten(-1, (-1, P)).permute(0, 2, 3, 1)       # [B, h, P, L]
        for shift in range(min(width, length)):
            w = taps[ch, width - 1 - shift].view(-1, P)                          # [h, P]
            V = (torch.matmul(O * w[None, :, None, :], Sigma) * A).sum(dim=1)    # [B, L, L]
            out[..., : length - shift] += V[..., shift:]
    return out / channels
