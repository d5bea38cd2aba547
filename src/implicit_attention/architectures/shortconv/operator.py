"""Short gated convolutions (LFM2 / LFM3 ``ShortConv``): the operator's math on a block of channels.

Glossary: ``B`` batch, ``L`` tokens, ``E`` channels (``hidden_size``), ``K`` conv width
(``conv_L_cache``), ``c`` a block of channels, ``s`` a shift ``i - j`` (``0 <= s < K``).

The layer computes ``[B~; C~; x] = in_proj(h * mask)`` (three chunks of ``E`` channels), the causal
depthwise conv of ``B~ * x`` and ``y = C~ * (conv(B~ * x) + b)``, then ``out_proj(y)``. Per channel ``c``::

    unified:  A_c = diag(C~_c) M_c diag(B~_c),   values x_c,   offset_c = C~_c b_c
    no_gate:  A_c = M_c,                         values x_c    (both gates dropped; not exact)

with ``M_c[i, j] = w_c[K-1-(i-j)]`` for ``0 <= i-j < K`` (``w[K-1]`` multiplies the current token):
a band of ``K`` diagonals, so every aggregate is ``K`` diagonals of ``[B, L, E]`` products
(:func:`band_aggregate`), never an ``[E, L, L]`` tensor. The conv bias multiplies no value: it is
the offset, never part of ``A``. Padding tokens have their input zeroed by the module; with an
``in_proj`` bias their ``B~ * x`` is not zero and the conv carries it into the next real tokens
(the operator still reproduces the layer exactly: those values are part of ``x``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import channel_transform

#: ``unified`` is exact; ``no_gate`` drops both gates (the conv alone on ``x``).
VARIANTS: tuple[str, ...] = ("unified", "no_gate")


@dataclass
class ShortConvFactors:
    """Every data-controlled quantity of one short-conv layer for one input, in the compute dtype.

    Attributes:
        x: ``[B, L, E]`` values (the third chunk of ``in_proj``).
        b: ``[B, L, E]`` input gate ``B~`` (first chunk); c: ``[B, L, E]`` output gate ``C~`` (second).
        weight: ``[E, K]`` conv taps; bias: ``[E]`` or ``None``.
        mask: ``[B, L]`` 1 for real tokens.
    """

    x: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    def scales(self, variant: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(row [B, L, E], column [B, L, E])`` scales of ``variant`` (``None``: none)."""
        return (self.c, self.b) if variant == "unified" else (None, None)


def shift_product(f: ShortConvFactors, variant: str, shift: int, channels: slice = slice(None),
                  right: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L - shift, c]`` entry ``(i, i - shift)`` of every channel's matrix (times ``right_j`` if given)."""
    length = f.x.shape[1]
    row, column = f.scales(variant)
    tap = f.weight[channels, f.width - 1 - shift]                              # [c]
    out = tap.expand(f.x.shape[0], length - shift, tap.shape[0]).clone()
    if row is not None:
        out = out * row[:, shift:, channels] * column[:, : length - shift, channels]
    if right is not None:
        out = out * right[:, : length - shift]
    return out


def shortconv_block(f: ShortConvFactors, channels: slice, variant: str):
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    batch, length, _ = f.x.shape
    width = len(range(*channels.indices(f.x.shape[-1])))
    T = f.x.new_zeros(batch, width, length, length)
    rows = torch.arange(length, device=f.x.device)
    for shift in range(min(f.width, length)):
        T[:, :, rows[shift:], rows[: length - shift]] = shift_product(f, variant, shift, channels).transpose(1, 2)
    offset = None
    if variant == "unified" and f.bias is not None:
        offset = f.c[..., channels] * f.bias[channels]
    return T, offset


def band_aggregate(f: ShortConvFactors, variant: str, how: str, chunk: int) -> torch.Tensor:
    """``[B, L, L]`` the channel mean of ``how`` (``mean``, ``abs``, ``pos``): ``K`` diagonals of products."""
    batch, length, channels = f.x.shape
    out = f.x.new_zeros(batch, length, length)
    rows = torch.arange(length, device=f.x.device)
    for shift in range(min(f.width, length)):
        total = f.x.new_zeros(batch, length - shift)
        for start in range(0, channels, chunk):
            sl = slice(start, min(start + chunk, channels))
            total += channel_transform(shift_product(f, variant, shift, sl), how).sum(-1)
        out[:, rows[shift:], rows[: length - shift]] = total / channels
    return out


def band_attribution(f: ShortConvFactors, variant: str, grad: torch.Tensor, values: torch.Tensor, signed: bool,
                     chunk: int) -> torch.Tensor:
    """``[B, L, L]`` ``mean_c clamp(g_i[c] A_c[i, j] v_j[c], 0)`` on the band (``grad`` at the matrix output)."""
    batch, length, channels = f.x.shape
    out = f.x.new_zeros(batch, length, length)
    rows = torch.arange(length, device=f.x.device)
    for shift in range(min(f.width, length)):
        total = f.x.new_zeros(batch, length - shift)
        for start in range(0, channels, chunk):
            sl = slice(start, min(start + chunk, channels))
            cam = shift_product(f, variant, shift, sl, right=values[..., sl]) * grad[:, shift:, sl]
            total += (cam if signed else cam.clamp(min=0)).sum(-1)
        out[:, rows[shift:], rows[: length - shift]] = total / channels
    return out
