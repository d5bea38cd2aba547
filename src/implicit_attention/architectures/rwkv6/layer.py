"""RWKV-6 (and RWKV-7) time mixing as :class:`~..base.LayerDecomposition`: per-head matrices shared by
the value channels, the group norm and gate as row scales, aggregates factorised per head."""

from __future__ import annotations

import torch

from ..base import LayerDecomposition, channel_transform, scaled_head_sum
from ..heads import head_shared_attribution
from .operator import EXACT_VARIANTS, Rwkv6Factors, rwkv6_attention_tiled


class RwkvHeadsDecomposition(LayerDecomposition):
    """A multi-head RWKV time mixing as per-channel implicit attention (RWKV-6 and RWKV-7).

    Every value channel ``c`` of head ``h`` shares the head's matrix ``A_h``; the unified operator
    scales its rows by ``g_i[c] gamma_c / sigma_i[h]`` and adds ``g_i[c] bonus_i[h]`` on the
    diagonal (RWKV-7's ``r_k`` term, ``None`` for RWKV-6), with values ``v - mean_head(v)``.
    The part of the bonus on the head mean of ``v_i``, which the group norm removes from the wkv
    path but the bonus keeps, involves no other token: it goes to the offset with ``g beta``.

    Args:
        attention: ``[B, H, L, L]`` the per-head matrices ``A_h``.
        v: ``[B, L, H, N]`` the value stream of the recurrence.
        gate: ``[B, L, C]`` output gate; gn_weight, gn_bias: ``[C]``; gn_eps: group norm eps.
        bonus: ``[B, L, H]`` or ``None``.
    """

    def __init__(self, *, attention: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, gn_weight: torch.Tensor,
                 gn_bias: torch.Tensor, gn_eps: float, bonus: torch.Tensor | None, variant: str,
                 mask: torch.Tensor, **kwargs):
        batch, length, heads, size = v.shape
        self.attention = attention
        self.head_size = size
        self.gate, self.gn_weight = gate, gn_weight
        wkv = torch.einsum("bhij,bjhn->bihn", attention, v)                    # the recurrence's output o
        self.inv_sigma = torch.rsqrt(wkv.var(-1, unbiased=False) + gn_eps)    # [B, L, H]
        per_channel = lambda t: t.repeat_interleave(size, dim=-1)  # noqa: E731  [.., H] -> [.., C]
        self.row = self.diag = offset = None
        if variant == "unified":
            values = (v - v.mean(-1, keepdim=True)).flatten(2)
            self.row = gate * gn_weight * per_channel(self.inv_sigma)         # [B, L, C]
            shift = gn_bias.expand_as(gate)
            if bonus is not None:
                self.diag = gate * per_channel(bonus)
                shift = shift + per_channel(bonus * v.mean(-1))
            offset = gate * shift
        else:
            values = v.flatten(2)
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=values, offset=offset,
                         mask=mask, **kwargs)

    def _block(self, channels: slice):
        heads = torch.arange(self.channels, device=self.device)[channels] // self.head_size
        block = self.attention[:, heads]                                       # [B, c, L, L] (a copy)
        if self.row is not None:
            block.mul_(self.row[..., channels].transpose(1, 2)[..., None])
        if self.diag is not None:
            block.diagonal(dim1=-2, dim2=-1).add_(self.diag[..., channels].transpose(1, 2))
        return block, None if self._offset is None else self._offset[..., channels]

    rows_from_map = True

    def _fast_aggregate(self, how: str) -> torch.Tensor:
        """``[B, L, L]``, factorised per head: ``O(B H L^2)`` instead of ``O(B C L^2)``.

        Off the diagonal ``matrix[c, i, j] = row_i[c] A_h[i, j]``, so ``mean_c |.|`` is
        ``sum_h |A_h[i, j]| sum_{c in h} |row_i[c]| / C`` and ``mean_c relu(.)`` splits by sign
        (:func:`~..base.scaled_head_sum`); the diagonal, where RWKV-7 adds its bonus, is computed
        per channel.
        """
        batch, length, _ = self.values.shape
        row = self.row if self.row is not None else torch.ones_like(self.values)
        A = self.attention
        total = scaled_head_sum(A, row.view(batch, length, A.shape[1], self.head_size), how, "bhij,bih->bij")
        if self.diag is not None:
            diagonal = row * A.diagonal(dim1=-2, dim2=-1).transpose(1, 2).repeat_interleave(self.head_size, -1)
            total.diagonal(dim1=-2, dim2=-1).copy_(channel_transform(diagonal + self.diag, how).sum(-1))
        return total / self.channels

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        """Per head (:func:`~..heads.head_shared_attribution`) off the diagonal; the diagonal, where RWKV-7
        adds its bonus per channel, exactly per channel."""
        batch, length, _ = self.values.shape
        row = self.row if self.row is not None else torch.ones_like(self.values)
        a = (grad * row).view(batch, length, -1, self.head_size).transpose(1, 2)           # [B, H, L, N]
        b = self.values.view(batch, length, -1, self.head_size).transpose(1, 2)
        total = head_shared_attribution(self.attention, a, b, signed)
        if self.diag is not None:
            diagonal = row * self.attention.diagonal(dim1=-2, dim2=-1).transpose(1, 2).repeat_interleave(
                self.head_size, -1) + self.diag
            cam = grad * diagonal * self.values
            total.diagonal(dim1=-2, dim2=-1).copy_((cam if signed else cam.clamp(min=0)).sum(-1))
        return total / self.channels

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # wkv: out = g (gamma (o - mean_h o) / sigma + ...); with sigma held fixed (a
        # data-controlled constant) d score / d o_c = (s_c - mean_h s) / sigma, s = grad g gamma.
        if self.variant != "wkv":
            return grad
        batch, length, _ = grad.shape
        s = (grad * self.gate * self.gn_weight).view(batch, length, -1, self.head_size)
        return ((s - s.mean(-1, keepdim=True)) * self.inv_sigma[..., None]).flatten(2)


class Rwkv6LayerDecomposition(RwkvHeadsDecomposition):
    """An RWKV-6 time mixing as per-channel implicit attention over its ``C = H N`` value channels."""

    def __init__(self, factors: Rwkv6Factors, *, variant: str, **kwargs):
        self.factors = factors
        f = factors
        super().__init__(attention=rwkv6_attention_tiled(f.r, f.k, f.log_w, f.u), v=f.v, gate=f.gate,
                         gn_weight=f.gn_weight, gn_bias=f.gn_bias, gn_eps=f.gn_eps, bonus=None,
                         variant=variant, mask=f.mask, **kwargs)
