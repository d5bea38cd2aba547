"""Mamba-2 (SSD) implicit attention, vectorised: the fast path used by the library.

Glossary (Dao & Gu 2024 symbols in brackets):
``B`` batch, ``L`` tokens, ``E`` inner channels (``intermediate_size``), ``H`` heads, ``P`` channels
per head (``head_dim``, ``E = H P``), ``G`` groups of ``B``/``C`` (``n_groups``; head ``h`` reads
group ``h // (H / G)``), ``N`` state size, ``K`` conv width, ``c`` a block of channels.

The mixer projects ``[z; xBC; dt] = in_proj(h)``; a causal depthwise conv and a SiLU act on the
whole of ``xBC``; padding tokens are zeroed (``mask``); ``x`` (the first ``E`` channels of
``xBC``) is the value stream, while the conv outputs of the ``B`` and ``C`` channels are
data-controlled constants. Per head the decay is a scalar::

    dt_h   = clamp(softplus(dt_raw_h + dt_bias_h), time_step_limit)
    S_h[i, j] = (C_i . B_j) * exp(A_h * sum_{k=j+1..i} dt_k[h]) * dt_j[h]                  (j <= i)
    y_d    = (S_h + D_h I) u_d,      u_d = silu(c_d) * mask,   c_d = M_d x_d + b_d

and the output goes through the gated RMS norm of its group ``g``:
``out_d[i] = w_d * r_i(g) * silu(z_d[i]) * y_d[i]`` with ``r_i(g) = rsqrt(mean_{d' in g}
(y_d'[i] * silu(z_d'[i]))^2 + eps)`` (or of ``y`` alone where the norm comes before the gate, and
``r = 1``, ``w = 1`` where there is no norm). ``r`` is a data-controlled constant, so for channel
``d`` of head ``h``::

    unified:  A_d = diag(w_d r silu(z_d)) (S_h + D_h I) diag(sigmoid(c_d) mask) M_d
              offset_d = diag(w_d r silu(z_d)) (S_h + D_h I) diag(sigmoid(c_d) mask) b_d 1

with ``M_d`` the causal depthwise conv as a banded matrix, ``M_d[i, j] = w_d[K-1-(i-j)]``.
Variants: ``ssd`` (``S_h`` alone over ``u``, the predecessor's recurrence-only form), ``no_conv``
(values ``c``, drop ``M_d``; exact), ``no_gate`` (drop ``diag(silu z)``, keep the norm scale),
``no_act`` (drop ``diag(sigmoid c)``).

Heads share ``S_h``: a block of channels computes the ``[B, h, L, L]`` matrices of the heads it
touches (one ``C B^T`` contraction per head, never a ``[.., L, L, N]`` tensor) and repeats them
to its channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..mamba.operator import ScanFactors
from ..primitives import conv_right, segment_sums

#: The formulations this module offers; ``unified`` is the exact default.
VARIANTS: tuple[str, ...] = ("unified", "ssd", "no_conv", "no_gate", "no_act")
#: Which variants are exact identities of the layer.
EXACT_VARIANTS: frozenset[str] = frozenset({"unified", "no_conv"})


@dataclass
class Mamba2Factors(ScanFactors):
    """Every data-controlled quantity of one Mamba-2 mixer for one input, in the compute dtype.

    The fields of :class:`~..mamba.operator.ScanFactors` (``x``, ``z``, ``conv_out`` of the x
    channels, ``conv_weight [E, K]`` and ``conv_bias [E]`` of the x channels), with per-head scan
    inputs, and:

    Attributes:
        dt: ``[B, L, H]`` step sizes after softplus and the ``time_step_limit`` clamp.
        B: ``[B, L, G, N]`` input projections (conv output of the B channels, activated, masked).
        C: ``[B, L, G, N]`` output projections.
        A: ``[H]`` scalar continuous decay per head (negative).
        D: ``[H]`` skip term per head.
        head_dim: ``P``, channels per head.
        norm_scale: ``[B, L, E]`` ``w_d * r_i(g)``, the gated RMS norm as a per-token, per-channel
            constant (ones when the mixer has no norm). Set by the factor function once ``y`` is known.
    """

    scan_variant = "ssd"

    head_dim: int = 0
    norm_scale: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.A.shape[0]

    @property
    def out_gate(self) -> torch.Tensor:
        """``[B, L, E]`` everything on the output side: ``w_d * r_i * silu(z_d[i])``."""
        gate = self.gate
        return gate if self.norm_scale is None else gate * self.norm_scale


def ssd_matrices(f: Mamba2Factors, heads: slice) -> torch.Tensor:
    """``[B, h, L, L]`` the SSD hidden attention ``S_h`` of a slice of heads (causal, 0 above)."""
    per_group = f.num_heads // f.B.shape[2]
    groups = torch.arange(f.num_heads, device=f.dt.device)[heads] // per_group
    B = f.B[:, :, groups]                                           # [B, L, h, N]
    C = f.C[:, :, groups]
    dt = f.dt[..., heads].transpose(1, 2)                           # [B, h, L]
    S = torch.einsum("bihn,bjhn->bhij", C, B)                       # C_i . B_j
    S.mul_(torch.exp(segment_sums(dt) * f.A[heads][None, :, None, None]))
    S.mul_(dt[..., None, :])
    length = dt.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=dt.device).tril()
    return S.masked_fill_(~causal, 0)


def channel_heads(f: Mamba2Factors, channels: slice) -> tuple[slice, torch.Tensor]:
    """The slice of heads that ``channels`` touch, and each channel's index into that slice."""
    index = torch.arange(f.x.shape[-1], device=f.x.device)[channels] // f.head_dim
    first = int(index[0])
    return slice(first, int(index[-1]) + 1), index - first


def ssd_output(f: Mamba2Factors, heads_per_block: int | None = None) -> torch.Tensor:
    """``[B, L, E]`` ``y = (S_h + D_h I) u``, the scan output before the gated norm, by blocks of heads."""
    batch, length, _ = f.x.shape
    u = f.ssm_input.view(batch, length, f.num_heads, f.head_dim)
    step = heads_per_block or f.num_heads
    parts = []
    for start in range(0, f.num_heads, step):
        heads = slice(start, min(start + step, f.num_heads))
        S = ssd_matrices(f, heads)
        parts.append(torch.einsum("bhij,bjhp->bihp", S, u[:, :, heads])
                     + f.D[heads][None, None, :, None] * u[:, :, heads])
    return torch.cat(parts, dim=2).reshape(batch, length, -1)


def mamba2_block(f: Mamba2Factors, channels: slice, variant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    heads, index = channel_heads(f, channels)
    T = ssd_matrices(f, heads)[:, index]                                # [B, c, L, L], a copy per channel
    if variant == "ssd":
        return T, None
    use_conv = variant != "no_conv"
    use_act = variant != "no_act"
    use_gate = variant != "no_gate"

    D = f.D[heads][index]
    T.diagonal(dim1=-2, dim2=-1).add_(D[None, :, None])                 # S + D I
    column = f.act_gate[..., channels] if use_act else f.mask[..., None].expand_as(f.x[..., channels])
    T.mul_(column.transpose(1, 2)[:, :, None, :])                       # diag(sigmoid c * mask) on the right
    offset = None
    if use_conv and f.conv_bias is not None:
        offset = T.sum(dim=-1) * f.conv_bias[channels][None, :, None]   # [B, c, L]
    if use_conv:
        T = conv_right(T, f.conv_weight[channels])
    row = (f.out_gate if use_gate else (f.norm_scale if f.norm_scale is not None
                                        else torch.ones_like(f.x)))[..., channels].transpose(1, 2)
    T.mul_(row[..., None])
    if offset is not None:
        offset = offset * row
    return T, None if offset is None else offset.transpose(1, 2)


def matrix_rows(f: Mamba2Factors, variant: str, rows: torch.Tensor) -> torch.Tensor:
    """``[B, R, E, L]`` rows ``rows`` (``[R]`` indices in ``[0, L)``) of every channel's matrix.

    ``O(R L (E K + H N))``: ``S_h[r, j] = (C_r . B_j) exp(A_h sum_{k=j+1..r} dt_k) dt_j`` for one
    row needs only that row's decay sums, a reversed cumulative sum of ``dt`` up to ``r`` (no
    differences of long cumulative sums); the channel factors and the conv then act on vectors.
    """
    batch, length, channels = f.x.shape
    positions = torch.arange(length, device=f.x.device)
    upto = positions[None, :] <= rows[:, None]                                   # [R, L]: k <= r
    dt = f.dt.transpose(1, 2)[:, :, None, :] * upto                              # [B, H, R, L]
    inclusive = dt.flip(-1).cumsum(-1).flip(-1)                                 # sum_{k=j..r}
    decay = F.pad(inclusive[..., 1:], (0, 1))                                    # sum_{k=j+1..r}
    per_group = f.num_heads // f.B.shape[2]
    CB = torch.einsum("brgn,bjgn->bgrj", f.C[:, rows], f.B)                      # [B, G, R, L]
    S = CB.repeat_interleave(per_group, dim=1) * torch.exp(decay * f.A[None, :, None, None]) * dt
    heads = torch.arange(channels, device=f.x.device) // f.head_dim
    T = S[:, heads]                                                              # [B, E, R, L]
    if variant != "ssd":
        diagonal = (positions[None, :] == rows[:, None]).to(T.dtype)             # [R, L]
        T = T + f.D[heads][None, :, None, None] * diagonal
        column = f.act_gate if variant != "no_act" else f.mask[..., None].expand_as(f.x)
        T = T * column.transpose(1, 2)[:, :, None, :]
        if variant != "no_conv":
            T = conv_right(T, f.conv_weight)
        row = f.out_gate if variant != "no_gate" else \
            (f.norm_scale if f.norm_scale is not None else torch.ones_like(f.x))
        T = T * row[:, rows].transpose(1, 2)[..., None]
    return T.transpose(1, 2)


def signed_mean(f: Mamba2Factors, variant: str, heads_per_block: int | None = None) -> torch.Tensor:
    """``[B, L, L]`` the signed channel mean of ``variant``'s matrices, never holding ``[C, L, L]``.

    Channels of a head share ``S'_h = S_h + D_h I``, so with ``o`` the output factor, ``s`` the input
    factor and the conv ``(T M)[i, j] = sum_k w[K-1-k] T[i, j+k]``::

        sum_d A_d[i, j] = sum_k V_k[i, j+k],   V_k = sum_h S'_h * (O_h diag(w_h[K-1-k]) Sigma_h)

    where ``O_h [L, P]`` and ``Sigma_h [P, L]`` hold the head's ``o`` and ``s``: one ``[L, P] x [P, L]``
    product per head and tap instead of ``P`` channel matrices.
    """
    batch, length, channels = f.x.shape
    out = torch.zeros(batch, length, length, dtype=f.x.dtype, device=f.x.device)
    step = heads_per_block or f.num_heads
    if variant == "ssd":
        for start in range(0, f.num_heads, step):
            out += ssd_matrices(f, slice(start, min(start + step, f.num_heads))).sum(dim=1)
        return out / f.num_heads
    row = f.out_gate if variant != "no_gate" else (f.norm_scale if f.norm_scale is not None else torch.ones_like(f.x))
    column = f.act_gate if variant != "no_act" else f.mask[..., None].expand_as(f.x)
    taps = f.conv_weight if variant != "no_conv" else torch.ones_like(f.conv_weight[:, :1])
    width, P = taps.shape[1], f.head_dim
    for start in range(0, f.num_heads, step):
        heads = slice(start, min(start + step, f.num_heads))
        ch = slice(heads.start * P, heads.stop * P)
        S = ssd_matrices(f, heads)                                               # [B, h, L, L]
        S.diagonal(dim1=-2, dim2=-1).add_(f.D[heads][None, :, None])
        O = row[..., ch].unflatten(-1, (-1, P)).transpose(1, 2)                  # [B, h, L, P]
        Sigma = column[..., ch].unflatten(-1, (-1, P)).permute(0, 2, 3, 1)       # [B, h, P, L]
        for shift in range(min(width, length)):
            w = taps[ch, width - 1 - shift].view(-1, P)                          # [h, P]
            V = (torch.matmul(O * w[None, :, None, :], Sigma) * S).sum(dim=1)    # [B, L, L]
            out[..., : length - shift] += V[..., shift:]
    return out / channels
