"""HGRN's gated linear recurrence (our ``implicit_attention.models.hgrn.HGRNRecurrence``): the math.

Glossary: ``B`` batch, ``L`` tokens, ``E`` recurrence width = the operator's channels ``C``,
``K`` short conv width, ``c`` a block of channels.

Per channel ``e`` (see ``models/hgrn/modeling_hgrn.py``): ``h_t = f_t h_{t-1} + (1 - f_t) i_t`` unrolls to

    R_e[i, j] = (prod_{k=j+1..i} f_k[e]) (1 - f_j[e]) m_j          (j <= i; m the padding mask)

with the input ``i = silu(c) ⊙ m`` written as the gate ``sigmoid(c) ⊙ m`` times ``c``, and
``c = M_e x + b_conv`` the short causal conv as a banded matrix ``M_e[i, j] = w_e[K-1-(i-j)]``.
The output before ``o_proj`` is ``RMSNorm(g ⊙ h) = w_e s_i g_i[e] h_i[e]`` with the per-token
RMS scale ``s_i = 1 / sqrt(mean_e (g_i[e] h_i[e])^2 + eps)`` a data-controlled constant. Hence

    unified:     A_e = diag(w_e s g_e) R_e diag(sigmoid(c_e) m) M_e diag(m),   values x (the conv input),
                 offset_e = diag(w_e s g_e) R_e diag(sigmoid(c_e) m) b_conv[e] 1.
    recurrence:  A_e = R_e,  values i (the recurrence input; exact=False).

Without the short conv, ``M_e = I`` and ``c = x``. The right ``diag(m)`` changes nothing (``x`` is 0
on padding) but keeps the padding columns of the maps at 0 where the conv would spread into them.
Products of forget gates are ``exp`` of segment sums of ``log f`` (every exponent ``<= 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..primitives import conv_right, segment_sums
from ..tiled import DiagonalOperator

#: ``unified`` is exact; ``recurrence`` is the HGRU recurrence alone (values: its input ``i``).
VARIANTS: tuple[str, ...] = ("unified", "recurrence")


@dataclass
class HGRNFactors:
    """Every data-controlled quantity of one HGRN layer for one input, in the compute dtype.

    Attributes:
        x: ``[B, L, E]`` input branch ``W_i h + b_i`` (0 on padding), the conv input: unified values.
        conv_out: ``[B, L, E]`` ``c = M x + b_conv`` (``x`` without the short conv).
        conv_weight: ``[E, K]`` or ``None``; conv_bias: ``[E]`` or ``None``.
        forget: ``[B, L, E]`` ``f``; one_minus_f: ``[B, L, E]`` ``1 - f``.
        out_gate: ``[B, L, E]`` ``g = sigmoid(W_g h + b_g)``.
        norm_scale: ``[B, L]`` the RMS norm's ``1 / sqrt(mean (g h)^2 + eps)``; norm_weight: ``[E]``.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
    """

    x: torch.Tensor
    conv_out: torch.Tensor
    conv_weight: torch.Tensor | None
    conv_bias: torch.Tensor | None
    forget: torch.Tensor
    one_minus_f: torch.Tensor
    out_gate: torch.Tensor
    norm_scale: torch.Tensor
    norm_weight: torch.Tensor
    mask: torch.Tensor

    @property
    def act_gate(self) -> torch.Tensor:
        """``[B, L, E]`` ``sigmoid(c) m``: SiLU written as ``c * sigmoid(c)``, with the padding mask."""
        return torch.sigmoid(self.conv_out) * self.mask[..., None]

    @property
    def recurrence_input(self) -> torch.Tensor:
        """``[B, L, E]`` ``i = silu(c) m``."""
        return self.conv_out * self.act_gate

    @property
    def row_scale(self) -> torch.Tensor:
        """``[B, L, E]`` ``w s g``: the RMS norm and the output gate, held fixed."""
        return self.norm_weight * self.norm_scale[..., None] * self.out_gate


def recurrence_matrices(f: HGRNFactors, channels: slice) -> torch.Tensor:
    """``[B, c, L, L]`` ``R_e[i, j] = (prod_{k=j+1..i} f_k) (1 - f_j) m_j`` for a block of channels."""
    log_f = torch.log(f.forget[..., channels]).transpose(1, 2)                   # [B, c, L]
    length = log_f.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_f.device).tril()
    R = segment_sums(log_f).exp_().masked_fill_(~causal, 0)
    column = (f.one_minus_f[..., channels] * f.mask[..., None]).transpose(1, 2)  # [B, c, L]
    return R.mul_(column[:, :, None, :])


def hgrn_block(f: HGRNFactors, channels: slice, variant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    T = recurrence_matrices(f, channels)
    if variant == "recurrence":
        return T, None
    T.mul_(f.act_gate[..., channels].transpose(1, 2)[:, :, None, :])           # diag(sigmoid c m) on the right
    offset = None
    if f.conv_bias is not None:
        offset = T.sum(dim=-1) * f.conv_bias[channels][None, :, None]          # [B, c, L]
    if f.conv_weight is not None:
        T = conv_right(T, f.conv_weight[channels]).mul_(f.mask[:, None, None, :])
    row = f.row_scale[..., channels].transpose(1, 2)                            # [B, c, L]
    T.mul_(row[..., None])
    return T, None if offset is None else (offset * row).transpose(1, 2)


def hgrn_operator(f: HGRNFactors, variant: str) -> DiagonalOperator:
    """``variant``'s matrices as a :class:`~..tiled.DiagonalOperator` (decays ``f``, columns
    ``(1 - f) m`` times ``sigmoid(c) m``, the conv and its column mask, rows ``w s g``), for the
    factorised channel aggregates."""
    col = f.one_minus_f * f.mask[..., None]
    if variant == "recurrence":
        return DiagonalOperator(log_decay=torch.log(f.forget), col=col)
    conv = f.conv_weight is not None
    return DiagonalOperator(log_decay=torch.log(f.forget), col=col * f.act_gate, row=f.row_scale,
                            taps=f.conv_weight, key_mask=f.mask if conv else None)
