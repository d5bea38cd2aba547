"""The output side shared by RetNet and GLA: per-head matrices, a group norm per head and a swish gate.

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``V`` value dim per head, ``C = H V`` the
operator's channels, ``h(c)`` the head of channel ``c``.

The layer's output before ``o_proj`` is ``swish(g) ⊙ GroupNorm_h(Y)`` with ``Y = A_h V`` per head;
the group norm is per head and per token::

    out_i[c] = swish(g_i[c]) w_c s_i[h] (Y_i[c] - mean_{c' in h} Y_i[c']) + swish(g_i[c]) b_c,
    s_i[h] = 1 / sqrt(var_{c' in h}(Y_i[c']) + eps).

Since ``A_h`` is shared by the ``V`` channels of head ``h``, the mean over the head's channels
commutes with it: ``Y_i[c] - mean Y_i = sum_j A_h[i, j] (v_j[c] - mean_{c' in h} v_j[c'])``. Hence

    unified:     matrix_c[i, j] = swish(g_i[c]) w_c s_i[h(c)] A_{h(c)}[i, j],
                 values_j[c] = v_j[c] - mean_{c' in h(c)} v_j[c']  (head-centred values),
                 offset_i[c] = swish(g_i[c]) b_c.
    recurrence:  matrix_c = A_{h(c)}, values = v (the recurrence alone, exact=False).

The swish gate and the norm scale ``s`` are data-controlled constants (computed from the input,
then held fixed), which makes the identity exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..memory import channels_per_block
from .base import LayerDecomposition, scaled_head_sum


@dataclass
class HeadGatedFactors:
    """The output side shared by RetNet and GLA: per-head matrices, head group norm and swish gate.

    Attributes:
        v: ``[B, L, H, V]`` values.
        gate: ``[B, L, C]`` ``swish(g)``, the output gate.
        norm_scale: ``[B, L, H]`` ``1 / sqrt(var + eps)`` of the group norm, per head and token.
        norm_weight, norm_bias: ``[C]`` the group norm's affine parameters.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
        centred: whether the norm centres each head (a group norm: head-centred values); ``False`` for
            an RMS norm (``flash-linear-attention``'s layers), whose values are ``v`` itself.
    """

    v: torch.Tensor
    gate: torch.Tensor
    norm_scale: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    mask: torch.Tensor
    centred: bool = True

    @property
    def head_v(self) -> int:
        return self.v.shape[-1]

    @property
    def row_scale(self) -> torch.Tensor:
        """``[B, L, C]`` ``swish(g) w s``: everything that multiplies row ``i`` of channel ``c``."""
        scale = self.norm_scale.repeat_interleave(self.head_v, dim=-1)
        return self.gate * self.norm_weight * scale

    def values(self, variant: str) -> torch.Tensor:
        """``[B, L, C]`` head-centred values (``unified`` under a group norm) or the raw ``v``."""
        v = self.v - self.v.mean(-1, keepdim=True) if variant == "unified" and self.centred else self.v
        return v.flatten(2)

    def head_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``[B, L, C]`` the gradient at ``Y = A v`` from the gradient at the output (gate, norm fixed).

        ``out = r ⊙ P(Y)`` with ``P`` the centring over each head (symmetric), so ``dY = P(r ⊙ grad)``.
        """
        g = (grad * self.row_scale).unflatten(-1, (-1, self.head_v))
        return (g - g.mean(-1, keepdim=True)).flatten(2) if self.centred else g.flatten(2)


def head_norm_scale(y: torch.Tensor, eps: float, centred: bool = True) -> torch.Tensor:
    """``[B, L, H]`` the group norm's ``1 / sqrt(var + eps)`` of ``y [B, L, H, V]`` (biased variance), or
    with ``centred=False`` the RMS norm's ``1 / sqrt(mean y^2 + eps)``."""
    centred_y = y - y.mean(-1, keepdim=True) if centred else y
    return torch.rsqrt(centred_y.pow(2).mean(-1) + eps)


def channel_heads(channels: slice, head_v: int) -> tuple[slice, torch.Tensor]:
    """The heads covering ``channels`` and, per channel, its index among them."""
    first, last = channels.start // head_v, (channels.stop - 1) // head_v
    index = torch.arange(channels.start, channels.stop) // head_v - first
    return slice(first, last + 1), index


def head_shared_attribution(M: torch.Tensor, a: torch.Tensor, b: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """``[B, L, L]`` ``sum_h sum_{c in h} clamp(a_i[c] M_h[i, j] b_j[c], min=0)`` for matrices ``M [B, H, L, L]``
    shared by the channels of each head, ``a, b [B, H, L, V]`` (the gradient times the row scale, and the values).

    ``relu(x M) = relu(M) relu(x) + relu(-M) relu(-x)`` and ``relu(a b) = a+ b+ + a- b-`` (``x+ = relu(x)``,
    ``x- = relu(-x)``), so the channel sum is ``relu(M_h) ⊙ (A+ B+^T + A- B-^T) + relu(-M_h) ⊙ (A+ B-^T + A- B+^T)``:
    four ``[L, V] x [V, L]`` products per head instead of ``V`` channel matrices, exactly; ``signed``: ``M_h ⊙ (A B^T)``.
    """
    bt = b.transpose(-1, -2)
    if signed:
        return (M * (a @ bt)).sum(dim=1)
    a_pos, a_neg, b_pos, b_neg = a.clamp(min=0), (-a).clamp(min=0), bt.clamp(min=0), (-bt).clamp(min=0)
    return (M.clamp(min=0) * (a_pos @ b_pos + a_neg @ b_neg)
            + (-M).clamp(min=0) * (a_pos @ b_neg + a_neg @ b_pos)).sum(dim=1)


def head_conv_reduce(head_matrix, row: torch.Tensor, col: torch.Tensor, taps: torch.Tensor, head_size: int, *,
                     how: str = "abs", grad: torch.Tensor | None = None, values: torch.Tensor | None = None,
                     signed: bool = False, block_bytes: int) -> torch.Tensor:
    """``[B, L, L]`` ``mean_c f(A_c)`` (``how``: ``abs`` or ``pos``), or with ``grad`` and ``values`` the attribution
    ``mean_c clamp(g_i[c] A_c[i, j] v_j[c], min=0)`` (no clamp if ``signed``), for channels that share their
    head's matrix before a column scale, a causal conv and a row scale (Mamba-2, the delta rule)::

        A_c[i, j] = row_i[c] sum_s taps[c, K-1-s] M_h[i, j+s] col_{j+s}[c]

    ``head_matrix(h) -> [B, 1, L, L]`` gives ``M_h`` once per head; a chunk of its channels accumulates the
    taps in place into one buffer (no copy of ``M_h`` per channel, no separate passes per factor). The
    matrices are causal, so each block of rows is formed only up to its last row's column (about half
    the entries of the square); the values of the attribution ride on the taps' column factors.
    ``row``, ``col``: ``[B, L, C]``; ``taps``: ``[C, K]``.
    """
    batch, length, channels = row.shape
    width = taps.shape[1]
    left = row if grad is None else row * grad
    step = channels_per_block(batch, length, channels, row.dtype.itemsize, 2, block_bytes)
    row_block = max(32, -(-length // 8))
    total = torch.zeros(batch, length, length, dtype=row.dtype, device=row.device)
    for head in range(channels // head_size):
        M = head_matrix(head)                                                       # [B, 1, L, L]
        for start in range(head * head_size, (head + 1) * head_size, step):
            ch = slice(start, min(start + step, (head + 1) * head_size))
            column = col[..., ch].transpose(1, 2)[:, :, None, :]                    # [B, c, 1, L]
            value = None if grad is None else values[..., ch].transpose(1, 2)[:, :, None, :]
            # tap s reads column j + s and lands on column j: its factor, with the value of column j
            factors = []
            for shift in range(min(width, length)):
                factor = column[..., shift:] * taps[ch, width - 1 - shift, None, None]
                factors.append(factor if value is None else factor * value[..., : length - shift])
            rows_left = left[..., ch].transpose(1, 2)[..., None]                    # [B, c, L, 1]
            for r0 in range(0, length, row_block):
                r1 = min(r0 + row_block, length)                  # rows [r0, r1) reach columns [0, r1)
                block = M[..., r0:r1, :r1]
                A = block * factors[0][..., :r1]
                for shift in range(1, min(width, r1)):
                    A[..., : r1 - shift].addcmul_(block[..., shift:], factors[shift][..., : r1 - shift])
                A.mul_(rows_left[:, :, r0:r1])
                if grad is not None:
                    part = (A if signed else A.clamp_(min=0)).sum(dim=1)
                else:
                    part = (A.abs_() if how == "abs" else A.clamp_(min=0)).sum(dim=1)
                total[:, r0:r1, :r1] += part
    return total / channels


def head_block(head_matrices, factors: HeadGatedFactors, channels: slice, variant: str):
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` from ``head_matrices(heads) -> [B, h, L, L]``."""
    heads, index = channel_heads(channels, factors.head_v)
    T = head_matrices(heads)[:, index.to(factors.v.device)]                  # [B, c, L, L]
    if variant != "unified":
        return T, None
    T = T * factors.row_scale[..., channels].transpose(1, 2)[..., None]
    return T, factors.gate[..., channels] * factors.norm_bias[channels]


class HeadSharedDecomposition(LayerDecomposition):
    """Channel aggregates of operators whose channels share one matrix per head, ``A_c = diag(r_c) A_h(c)``.

    ``mean_c f(r_i[c] A_h[i, j])`` factorises per head for ``f`` = identity, ``|.|`` and ``clamp(., 0)``
    (:func:`~.base.scaled_head_sum`), so the aggregates cost ``[B, H, L, L]``, not ``[B, C, L, L]``;
    rows are read off the map. Subclasses provide ``factors`` (a :class:`HeadGatedFactors`) and
    ``_head_matrices(heads)``.
    """

    factors: HeadGatedFactors
    rows_from_map = True

    def _head_matrices(self, heads: slice) -> torch.Tensor:
        raise NotImplementedError

    def _head_rows(self) -> torch.Tensor:
        """``[B, L, H, V]`` what multiplies row ``i`` of each channel (1 for ``recurrence``)."""
        f = self.factors
        r = f.row_scale if self.variant == "unified" else torch.ones_like(f.gate)
        return r.unflatten(-1, (f.v.shape[2], f.head_v))

    def _fast_aggregate(self, how: str) -> torch.Tensor:
        heads = self.factors.v.shape[2]
        r = self._head_rows().transpose(1, 2)                                 # [B, H, L, V]
        total = torch.zeros(self.batch_size, self.length, self.length, dtype=self.dtype, device=self.device)
        step = channels_per_block(self.batch_size, self.length, heads, self.dtype.itemsize,
                                  self.block_temporaries, self.block_bytes)
        for start in range(0, heads, step):
            sl = slice(start, min(start + step, heads))
            total += scaled_head_sum(self._head_matrices(sl), r[:, sl], how, "bhij,bhi->bij")
        return total / self.channels

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        """``mean_c clamp(g_i[c] r_i[c] A_h[i, j] v_j[c], min=0)`` per head (:func:`head_shared_attribution`)."""
        heads, head_v = self.factors.v.shape[2], self.factors.head_v
        a = (grad * self._head_rows().flatten(2)).unflatten(-1, (heads, head_v)).transpose(1, 2)   # [B, H, L, V]
        b = self.values.unflatten(-1, (heads, head_v)).transpose(1, 2)
        total = torch.zeros(self.batch_size, self.length, self.length, dtype=self.dtype, device=self.device)
        step = channels_per_block(self.batch_size, self.length, heads, self.dtype.itemsize,
                                  self.block_temporaries + 2, self.block_bytes)
        for start in range(0, heads, step):
            sl = slice(start, min(start + step, heads))
            total += head_shared_attribution(self._head_matrices(sl), a[:, sl], b[:, sl], signed)
        return total / self.channels

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # "recurrence" leaves the gate and the norm out of its matrix (HeadGatedFactors.head_gradient)
        return grad if self.variant == "unified" else self.factors.head_gradient(grad)
