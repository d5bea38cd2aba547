"""Mamba (S6) implicit attention: the operator's math on a block of channels.

Glossary (Gu & Dao 2023 symbols in brackets):
``B`` batch, ``L`` tokens, ``E`` inner channels (``D`` in the paper, ``intermediate_size`` in HF),
``N`` state size, ``K`` conv width, ``c`` a block of channels.

The mixer computes ``[x; z] = in_proj(h)``, the causal depthwise conv ``c = M x + b``, the SSM input
``u = silu(c) = c * sigmoid(c)`` (zeroed on padding), ``dt = softplus(dt_proj(.) + dt_bias)``, ``B_t``
and ``C_t`` (shared by the channels), ``A = -exp(A_log)`` and the skip ``D``. For channel ``d``::

    S_d[i, j] = sum_n C_i[n] * exp(A[d, n] * sum_{k=j+1..i} dt_k[d]) * dt_j[d] * B_j[n]     (j <= i)
    unified:  A_d = diag(silu z_d) (S_d + D_d I) diag(sigmoid c_d) M_d
              offset_d = diag(silu z_d) (S_d + D_d I) diag(sigmoid c_d) b_d 1

with ``M_d`` the causal depthwise conv as a banded matrix, ``M_d[i, j] = w_d[K-1-(i-j)]`` for
``0 <= i-j < K`` (``w[K-1]`` multiplies the current token). The conv bias multiplies no value: it
goes to the offset, never into ``A``. Padding tokens have their SSM input zeroed by the module, so
the padding mask sits next to ``sigmoid(c)`` in the column scale. ``out_proj(sum_j A_d[i, j] x_d[j]
+ offset_d[i])`` is the mixer's output exactly.

Variants (the paper's ablations): ``s6`` (``S_d`` alone on ``u``, the predecessor's hidden
attention), ``no_conv`` (``M_d`` left out, values ``c``: still exact), ``no_gate`` (``diag(silu z)``
left out), ``no_act`` (``diag(sigmoid c)`` left out).

Everything here works on a block of channels at a time, producing ``[B, c, L, L]``; nothing ever
holds ``[B, c, L, L, N]``: the state dimension is summed in a loop of ``N`` block-sized updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..primitives import conv_right, segment_sums

#: The formulations this module offers; ``unified`` is the exact default.
VARIANTS: tuple[str, ...] = ("unified", "s6", "no_conv", "no_gate", "no_act")
#: Which variants are exact identities of the layer (the others drop a factor on purpose).
EXACT_VARIANTS: frozenset[str] = frozenset({"unified", "no_conv"})


@dataclass
class ScanFactors:
    """What Mamba and Mamba-2 mixers share: the conv branch, the scan's inputs and its gates.

    Attributes:
        x: ``[B, L, E]`` conv input, the value stream of the unified operator.
        z: ``[B, L, E]`` gate branch before its SiLU.
        conv_out: ``[B, L, E]`` ``c = M x + b``, the conv output before its activation.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
        conv_weight: ``[E, K]`` depthwise conv taps (``w[K-1]`` multiplies the current token).
        conv_bias: ``[E]`` or ``None``.
        dt: step sizes after softplus (``[B, L, E]`` for Mamba, ``[B, L, H]`` for Mamba-2).
        B, C: input and output projections of the scan (shared by channels or groups of heads).
        A: continuous state matrix (negative); D: skip term.
    """

    #: the variant that keeps the scan alone (its values are the scan input ``u``)
    scan_variant = "s6"

    x: torch.Tensor
    z: torch.Tensor
    conv_out: torch.Tensor
    mask: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    dt: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor

    @property
    def act_gate(self) -> torch.Tensor:
        """``[B, L, E]`` ``sigmoid(c)`` times the padding mask: SiLU written as ``c * sigmoid(c)``."""
        return torch.sigmoid(self.conv_out) * self.mask[..., None]

    @property
    def ssm_input(self) -> torch.Tensor:
        """``[B, L, E]`` ``u = silu(c)`` with padding zeroed, the input of the selective scan."""
        return self.conv_out * self.act_gate

    @property
    def gate(self) -> torch.Tensor:
        """``[B, L, E]`` ``silu(z)``."""
        return F.silu(self.z)

    def values(self, variant: str) -> torch.Tensor:
        """``[B, L, E]`` the value stream that ``variant``'s matrices multiply."""
        if variant == self.scan_variant:
            return self.ssm_input
        if variant == "no_conv":
            return self.conv_out
        return self.x


@dataclass
class MambaFactors(ScanFactors):
    """Every data-controlled quantity of one Mamba mixer for one input, in the compute dtype
    (:class:`ScanFactors` with ``dt [B, L, E]``, ``B``, ``C [B, L, N]``, ``A [E, N]``, ``D [E]``)."""

    @property
    def out_gate(self) -> torch.Tensor:
        """``[B, L, E]`` ``silu(z)``, the output gate."""
        return self.gate


def s6_matrices_direct(dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``[B, c, L, L]`` the S6 hidden attention ``S_d`` of a block of channels, entry by entry.

    ``N`` exponentials per entry. Args: dt ``[B, L, c]``; B, C ``[B, L, N]``; A ``[c, N]``.
    """
    length = dt.shape[1]
    dt_t = dt.transpose(1, 2)                         # [B, c, L]
    seg = segment_sums(dt_t)                          # [B, c, L, L]
    out = torch.zeros_like(seg)
    for n in range(A.shape[1]):
        cb = C[:, :, n, None] * B[:, None, :, n]      # [B, L, L]  C_i[n] B_j[n]
        out += torch.exp(seg * A[None, :, n, None, None]) * cb[:, None]
    causal = torch.ones(length, length, dtype=torch.bool, device=dt.device).tril()
    return out.mul_(dt_t[..., None, :]).masked_fill_(~causal, 0)


def s6_matrices(dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A: torch.Tensor,
                block: int = 16) -> torch.Tensor:
    """``[B, c, L, L]`` the S6 hidden attention ``S_d`` of a block of channels, by tiles.

    Diagonal ``block x block`` tiles come from :func:`s6_matrices_direct`; the rest of the lower
    triangle is tiled by sibling blocks of a binary hierarchy (keys ``[p, p + S)``, rows
    ``[p + S, p + 2S)``) where ``S_d[i, j] = sum_n Q[i, n] K[j, n]`` with
    ``Q = C_i exp(A (s_i - r))`` and ``K = dt_j B_j exp(A (r - s_j))``, ``r`` the cumulative step
    at the tile's last key: both exponents are <= 0, so nothing overflows at any length, and the
    entries come from small matrix products instead of ``N`` exponentials each. On CUDA devices
    this returns :func:`s6_matrices_direct` (faster there).

    Args:
        dt: ``[B, L, c]``; B, C: ``[B, L, N]``; A: ``[c, N]``.
    """
    batch, length, channels = dt.shape
    if length <= 2 * block or dt.is_cuda:
        # on a GPU the entry-by-entry form is N fused passes, while the tiles launch many small
        # kernels per level: the direct form is the faster one there
        return s6_matrices_direct(dt, B, C, A)
    out = dt.new_zeros(batch, channels, length, length)
    flat = out.view(batch, channels, length * length)
    for start in range(0, length, block):             # diagonal tiles
        sl = slice(start, min(start + block, length))
        out[:, :, sl, sl] = s6_matrices_direct(dt[:, sl], B[:, sl], C[:, sl], A)
    cums = dt.to(torch.float64).cumsum(dim=1)                                 # [B, L, c]
    size = block
    while size < length:
        starts = torch.arange(0, length - size, 2 * size, device=dt.device)  # pairs with rows inside
        offsets = torch.arange(size, device=dt.device)
        keys = starts[:, None] + offsets                                      # [P, S]
        rows = (keys + size).clamp(max=length - 1)                            # cropped below
        ref = cums[:, starts + size - 1]                                      # [B, P, c]
        q_exp = (cums[:, rows] - ref[:, :, None]).to(dt.dtype)[..., None] * A   # [B, P, S, c, N]
        k_exp = (ref[:, :, None] - cums[:, keys]).to(dt.dtype)[..., None] * A
        Q = torch.exp(q_exp) * C[:, rows, None, :]
        K = torch.exp(k_exp) * (B[:, keys, None, :] * dt[:, keys, :, None])
        tiles = Q.permute(0, 1, 3, 2, 4) @ K.permute(0, 1, 3, 4, 2)          # [B, P, c, S, S]
        row_index, col_index = torch.broadcast_tensors(starts[:, None, None] + size + offsets[None, :, None],
                                                       keys[:, None, :])
        inside = row_index < length                                           # [P, S, S]
        linear = (row_index * length + col_index)[inside]
        flat[:, :, linear] = tiles.permute(0, 2, 1, 3, 4)[:, :, inside]
        size *= 2
    return out


def mamba_block(factors: MambaFactors, channels: slice, variant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    f = factors
    S = s6_matrices(f.dt[..., channels], f.B, f.C, f.A[channels])
    if variant == "s6":
        return S, None
    use_conv = variant != "no_conv"
    use_act = variant != "no_act"
    use_gate = variant != "no_gate"

    T = S
    T.diagonal(dim1=-2, dim2=-1).add_(f.D[channels][None, :, None])     # S + D I
    column = f.act_gate[..., channels] if use_act else f.mask[..., None].expand_as(f.x[..., channels])
    T.mul_(column.transpose(1, 2)[:, :, None, :])                       # diag(sigmoid c) on the right
    offset = None
    if use_conv and f.conv_bias is not None:
        offset = T.sum(dim=-1) * f.conv_bias[channels][None, :, None]   # [B, c, L]
    if use_conv:
        T = conv_right(T, f.conv_weight[channels])
    if use_gate:
        row = f.out_gate[..., channels].transpose(1, 2)                 # [B, c, L]
        T.mul_(row[..., None])
        if offset is not None:
            offset = offset * row
    return T, None if offset is None else offset.transpose(1, 2)
