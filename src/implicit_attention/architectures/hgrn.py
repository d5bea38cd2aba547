"""HGRN's gated linear recurrence (our ``implicit_attention.models.hgrn.HGRNRecurrence``).

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
import torch.nn.functional as F
from torch import nn

from .mamba.operator import conv_right, segment_sums
from .registry import Architecture, CapturedLayer, register
from .tiled import DiagonalDecomposition, DiagonalOperator

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


def hgrn_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                 lower_bound: torch.Tensor | None, dtype: torch.dtype) -> HGRNFactors:
    """Recompute every data-controlled factor of ``module`` for its input ``hidden_states [B, L, D]``."""
    from ..models.hgrn.modeling_hgrn import chunked_scan  # lazy: the model package registers Auto classes

    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h = hidden_states.detach().to(dtype)
    batch, length, _ = h.shape
    mask = torch.ones(batch, length, dtype=dtype, device=h.device) if attention_mask is None \
        else attention_mask.detach().to(device=h.device, dtype=dtype)
    lin = lambda proj: F.linear(h, p(proj.weight), p(proj.bias))  # noqa: E731
    x = lin(module.i_proj) * mask[..., None]
    conv_weight = conv_bias = None
    conv_out = x
    if module.conv1d is not None:
        conv_weight, conv_bias = p(module.conv1d.weight)[:, 0, :], p(module.conv1d.bias)
        width = conv_weight.shape[-1]
        conv_out = F.conv1d(x.transpose(1, 2), conv_weight[:, None, :], conv_bias, padding=width - 1,
                            groups=conv_weight.shape[0])[..., :length].transpose(1, 2)
    z = lin(module.f_proj)
    lb = 0.0 if lower_bound is None else p(lower_bound)
    forget = lb + (1 - lb) * torch.sigmoid(z)
    one_minus_f = (1 - lb) * torch.sigmoid(-z)
    out_gate = torch.sigmoid(lin(module.g_proj))
    u = F.silu(conv_out) * mask[..., None]
    state = chunked_scan(torch.log(forget), one_minus_f * u, module.chunk_size)
    norm = module.g_norm
    norm_scale = torch.rsqrt((out_gate * state).pow(2).mean(-1) + norm.eps)
    return HGRNFactors(x=x, conv_out=conv_out, conv_weight=conv_weight, conv_bias=conv_bias, forget=forget,
                       one_minus_f=one_minus_f, out_gate=out_gate, norm_scale=norm_scale,
                       norm_weight=p(norm.weight), mask=mask)


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
    """``variant``'s matrices as a :class:`~.tiled.DiagonalOperator` (decays ``f``, columns
    ``(1 - f) m`` times ``sigmoid(c) m``, the conv and its column mask, rows ``w s g``), for the
    factorised channel aggregates."""
    col = f.one_minus_f * f.mask[..., None]
    if variant == "recurrence":
        return DiagonalOperator(log_decay=torch.log(f.forget), col=col)
    conv = f.conv_weight is not None
    return DiagonalOperator(log_decay=torch.log(f.forget), col=col * f.act_gate, row=f.row_scale,
                            taps=f.conv_weight, key_mask=f.mask if conv else None)


def hgrn_naive(f: HGRNFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: matrices ``[B, E, L, L]`` and offset ``[B, L, E]``, one channel and entry at a time."""
    batch, length, channels = f.x.shape
    dtype = f.x.dtype
    matrices = torch.zeros(batch, channels, length, length, dtype=dtype)
    offset = torch.zeros(batch, length, channels, dtype=dtype)
    for b in range(batch):
        for e in range(channels):
            R = torch.zeros(length, length, dtype=dtype)
            for i in range(length):
                for j in range(i + 1):
                    decay = 1.0
                    for k in range(j + 1, i + 1):
                        decay *= float(f.forget[b, k, e])
                    R[i, j] = decay * float(1 - f.forget[b, j, e]) * float(f.mask[b, j])
            if variant == "recurrence":
                matrices[b, e] = R
                continue
            M = torch.eye(length, dtype=dtype)
            if f.conv_weight is not None:
                width = f.conv_weight.shape[1]
                M = torch.zeros(length, length, dtype=dtype)
                for i in range(length):
                    for j in range(max(0, i - width + 1), i + 1):
                        M[i, j] = f.conv_weight[e, width - 1 - (i - j)]
            act = torch.diag(torch.sigmoid(f.conv_out[b, :, e]) * f.mask[b])
            gate = torch.diag(f.norm_weight[e] * f.norm_scale[b] * f.out_gate[b, :, e])
            matrices[b, e] = gate @ R @ act @ M @ torch.diag(f.mask[b])
            if f.conv_bias is not None and f.conv_weight is not None:
                offset[b, :, e] = gate @ R @ act @ torch.full((length,), float(f.conv_bias[e]), dtype=dtype)
    return matrices, offset


class HGRNLayerDecomposition(DiagonalDecomposition):
    """An HGRN recurrence layer as per-channel implicit attention over its width ``E``.

    The signed channel mean (and single rows) come from hierarchical tiles (:mod:`.tiled`), never
    from per-channel blocks; ``recurrence``'s ``R >= 0`` makes its ``abs`` and ``pos`` maps the mean.
    """

    block_temporaries = 5

    def __init__(self, factors: HGRNFactors, *, variant: str, **kwargs):
        self.factors = factors
        values = factors.recurrence_input if variant == "recurrence" else factors.x
        super().__init__(variant=variant, exact=variant == "unified", values=values, offset=None,
                         mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return hgrn_block(self.factors, channels, self.variant)

    def diagonal_operator(self) -> DiagonalOperator:
        return hgrn_operator(self.factors, self.variant)

    @property
    def nonnegative(self) -> bool:
        return self.variant == "recurrence"     # products of f in (0, 1), 1 - f > 0 and the 0/1 mask

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # out = w s g ⊙ (R i): the recurrence variant leaves the norm and gate out of its matrix.
        return grad if self.variant == "unified" else grad * self.factors.row_scale


def _build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> HGRNLayerDecomposition:
    factors = hgrn_factors(captured.module, captured.inputs, captured.attention_mask,
                           captured.kwargs.get("lower_bound"), dtype)
    return HGRNLayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                  output=captured.output.detach().to(dtype))


register(Architecture(
    name="hgrn",
    module_classes=("implicit_attention.models.hgrn.modeling_hgrn.HGRNRecurrence",),
    model_classes=("HGRNForCausalLM", "HGRNModel"),
    variants=VARIANTS,
    output_module="o_proj",
    build=_build,
    channels=lambda module: module.expand_dim,
))
