"""MiniMax lightning attention (``MiniMaxLightningAttention``): the operator's math.

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``D`` head width, ``C = H * D`` the operator's
channels (the value width), ``h(c)`` the head of channel ``c``.

The layer computes ``[q; k; v] = act(qkv_proj(h))`` (SiLU by default), zeroed on padding tokens,
and per head the linear attention with a fixed decay ``s_h`` (``slope_rate``, set by the head and
the layer's depth)::

    A_h[i, j] = exp(-s_h (i - j)) (q_i . k_j)     (j <= i; no score scale, no normaliser)

computed by the module block by block (``block_size``: the decays inside a block, a decayed
``K^T V`` state between blocks; the same sums). The heads' outputs ``Y = A v`` are concatenated,
RMS-normalised over all ``C`` channels at once (``r_i = 1 / sqrt(mean_c Y_i[c]^2 + eps)``, in float32
as the module computes it, and a weight ``w``) and gated by ``sigmoid(output_gate(h))``::

    unified:     matrix_c[i, j] = sigmoid(g_i[c]) w_c r_i A_{h(c)}[i, j],   values v,   offset 0
    no_gate:     matrix_c[i, j] = w_c r_i A_{h(c)}[i, j]        (the output gate left out; not exact)
    recurrence:  matrix_c = A_{h(c)}                            (the decayed linear attention alone)

The norm's scale and the gate are data-controlled constants (computed from the input, then held
fixed), which makes ``unified`` exact. The module's decays are float32 buffers whatever its dtype;
here they are recomputed in the compute dtype from the float32 slopes (a float64 model differs by
its own float32 rounding of the decays).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import channel_heads

#: ``unified`` is exact; ``no_gate`` drops the sigmoid gate, ``recurrence`` keeps the decayed linear attention.
VARIANTS: tuple[str, ...] = ("unified", "no_gate", "recurrence")


@dataclass
class LightningFactors:
    """Every data-controlled quantity of one lightning-attention layer for one input, in the compute dtype.

    Attributes:
        q, k, v: ``[B, L, H, D]`` after the activation, zero on padding tokens.
        slope: ``[H]`` the decay rate of each head.
        gate: ``[B, L, C]`` ``sigmoid(output_gate(h))``.
        norm_scale: ``[B, L]`` the RMS norm's ``1 / sqrt(mean_c Y^2 + eps)``; norm_weight: ``[C]``.
        mask: ``[B, L]`` 1 for real tokens.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    slope: torch.Tensor
    gate: torch.Tensor
    norm_scale: torch.Tensor
    norm_weight: torch.Tensor
    mask: torch.Tensor

    @property
    def head_v(self) -> int:
        return self.v.shape[-1]

    def row_scale(self, variant: str) -> torch.Tensor | None:
        """``[B, L, C]`` what multiplies row ``i`` of channel ``c`` under ``variant`` (``None``: 1)."""
        if variant == "recurrence":
            return None
        scale = self.norm_weight * self.norm_scale[..., None]
        return scale * self.gate if variant == "unified" else scale

    def values(self) -> torch.Tensor:
        """``[B, L, C]`` the values, heads concatenated."""
        return self.v.flatten(2)


def decay_matrix(slope: torch.Tensor, length: int) -> torch.Tensor:
    """``[h, L, L]`` ``exp(-s_h (i - j))`` for ``j <= i``, 0 above."""
    idx = torch.arange(length, device=slope.device)
    distance = (idx[:, None] - idx[None, :]).to(slope.dtype)
    return torch.exp(-distance.clamp(min=0) * slope[:, None, None]).tril()


def lightning_heads(f: LightningFactors, heads: slice) -> torch.Tensor:
    """``[B, h, L, L]`` ``A_h[i, j] = exp(-s_h (i - j)) (q_i . k_j)``, ``j <= i``, for a slice of heads."""
    scores = torch.einsum("bihd,bjhd->bhij", f.q[:, :, heads], f.k[:, :, heads])
    return scores * decay_matrix(f.slope[heads], f.q.shape[1])


def lightning_block(f: LightningFactors, channels: slice, variant: str):
    """Matrices ``[B, c, L, L]`` and offset (``None``: zero) of ``variant`` for a channel block."""
    heads, index = channel_heads(channels, f.head_v)
    T = lightning_heads(f, heads)[:, index.to(f.q.device)]
    row = f.row_scale(variant)
    if row is not None:
        T = T * row[..., channels].transpose(1, 2)[..., None]
    return T, None
