"""Softmax attention layers as :class:`~..base.LayerDecomposition`: channel ``c`` of head ``c // D`` has
matrix ``P_h`` (``diag(g_c) P_h`` with an output gate ``g``), with aggregates and attributions computed per head."""

from __future__ import annotations

import dataclasses

import torch

from ..base import LayerDecomposition, scaled_head_sum
from .operator import AttentionFactors, attention_probabilities, split_heads


class AttentionLayerDecomposition(LayerDecomposition):
    """A softmax attention layer: channel ``c`` of the concatenated heads has matrix ``P_{c // D}``.

    The probabilities are recomputed from ``q, k`` and the mask for a few heads at a time (an
    ``[L, L]`` matrix per head is never kept for the whole model); aggregates, attributions and
    the reconstruction work per head.

    Attributes:
        factors: the :class:`AttentionFactors` of the call.
        head_dim: ``D``, channels per head.
    """

    block_temporaries = 3

    def __init__(self, factors: AttentionFactors, *, variant: str = "unified", **kwargs):
        # softmax attention has none of the parts a recurrent ablation drops: under such a variant of a
        # hybrid it stays exact and records "unified". ``no_gate`` drops its output gate, if it has one.
        ablated = variant == "no_gate" and factors.gate is not None
        if ablated:
            factors = dataclasses.replace(factors, gate=None)
        self.factors = factors
        self.head_dim = factors.values.shape[-1] // factors.q.shape[1]
        super().__init__(variant="no_gate" if variant == "no_gate" else "unified", exact=not ablated,
                         values=factors.values, offset=torch.zeros_like(factors.values), mask=factors.token_mask,
                         **kwargs)
        # a gated attention's map is cheap per head but its rows need the gate: read them off the map
        self.rows_from_map = factors.gate is not None

    @property
    def gate(self) -> torch.Tensor | None:
        """``[B, L, C]`` the output gate (the row scale of each channel), or ``None``."""
        return self.factors.gate

    def _head_gate(self, heads: slice) -> torch.Tensor:
        """``[B, h, L, D]`` the gate of a slice of heads."""
        return split_heads(self.gate, self.head_dim)[:, heads]

    @property
    def heads(self) -> int:
        return self.factors.q.shape[1]

    def head_probs(self, heads: slice = slice(None), rows=None) -> torch.Tensor:
        """``[B, h, L, L]`` (or ``[B, h, R, L]`` for ``rows``) the probabilities of a slice of heads."""
        f = self.factors
        index = torch.arange(self.heads, device=self.device)[heads]
        q = f.q[:, heads]
        k = f.k.index_select(1, index // (self.heads // f.k.shape[1]))  # the key head serving each query head
        bias, empty = f.bias(self.length, self.dtype, self.device)
        if bias is not None and bias.dim() == 4 and bias.shape[1] > 1:  # a per-head mask
            bias = bias[:, heads]
            empty = None if empty is None else empty[:, heads]
        if rows is not None:
            q = q[:, :, rows]
            bias = None if bias is None else bias[..., rows, :]
            empty = None if empty is None else empty[..., rows]
        return attention_probabilities(q, k, f.scale, bias, empty)

    @property
    def probs(self) -> torch.Tensor:
        """``[B, H, L, L]`` every head's attention probabilities (computed on each access)."""
        return self.head_probs()

    def _head_chunks(self):
        per_head = self.batch_size * self.length ** 2 * self.dtype.itemsize * self.block_temporaries
        step = max(1, min(self.heads, self.block_bytes // max(per_head, 1)))
        for start in range(0, self.heads, step):
            yield slice(start, min(start + step, self.heads))

    def _block(self, channels: slice):
        heads = torch.arange(self.channels, device=self.device)[channels] // self.head_dim
        first, last = int(heads[0]), int(heads[-1]) + 1
        block = self.head_probs(slice(first, last)).index_select(1, heads - first)
        if self.gate is not None:
            block = block * self.gate[..., channels].transpose(1, 2)[..., None]
        return block, None

    def reconstruct(self) -> torch.Tensor:
        """``[B, L, C]`` ``P_h V_h`` head by head (the offset is zero)."""
        parts = []
        for heads in self._head_chunks():
            v = split_heads(self.values, self.head_dim)[:, heads]               # [B, h, L, D]
            out = self.head_probs(heads) @ v
            if self.gate is not None:
                out = out * self._head_gate(heads)
            parts.append(out.transpose(1, 2).flatten(2))
        return torch.cat(parts, dim=-1)

    def measure_error(self, max_entries=None) -> float:
        """Relative error of :meth:`reconstruct` over every channel (per head it is as cheap as the layer)."""
        self.error_channels = self.channels
        denom = self.output.norm().clamp_min(torch.finfo(self.dtype).tiny)
        self.error = float((self.reconstruct() - self.output).norm() / denom)
        return self.error

    def channel_matrix(self, channel: int) -> torch.Tensor:
        head = channel // self.head_dim
        probs = self.head_probs(slice(head, head + 1))[:, 0]
        return probs if self.gate is None else probs * self.gate[:, :, channel, None]

    def _fast_aggregate(self, how: str) -> torch.Tensor:
        """Per head: every head has ``D`` channels and ``P >= 0``, so all three equal ``mean_h P_h``.

        With an output gate ``g``: ``mean_c f(g_i[c] P_h(c)[i, j])`` factorises per head
        (:func:`~..base.scaled_head_sum`), ``H`` matrices, not ``C``.
        """
        if self.gate is not None:
            return sum(scaled_head_sum(self.head_probs(heads), self._head_gate(heads), how, "bhij,bhi->bij")
                       for heads in self._head_chunks()) / self.channels
        return sum(self.head_probs(heads).sum(dim=1) for heads in self._head_chunks()) / self.heads

    def _fast_rows(self, rows: torch.Tensor, how: str) -> torch.Tensor:
        """Rows of :meth:`aggregate` from those rows of the queries only (a gated layer reads them off its map)."""
        return self.head_probs(rows=rows).mean(dim=1)

    def _fast_attribution(self, grad: torch.Tensor, signed: bool = False) -> torch.Tensor:
        """Chefer et al.'s rule per head: ``mean_h clamp(dP_h * P_h, min=0)``.

        ``dP_h[i, j] = sum_{d in h} g_i[d] v_j[d]`` is the exact gradient of the score with respect to
        the head's probabilities (``out_i = sum_j P_h[i, j] v_j``): ``G_h V_h^T``, one ``[L, D] x [D, L]``
        product per head. (Recurrent layers have no heads of probabilities: there the channel is the
        head, and the base class clamps per channel.) With an output gate ``g`` the gradient at the
        probabilities is ``(G ⊙ g)_h V_h^T``, and ``dP_h * P_h`` equals the gated matrix times its own
        gradient (the rule is the same whichever of the two is called the head's attention).
        """
        if self.gate is not None:
            grad = grad * self.gate
        g_all = split_heads(grad, self.head_dim)                            # [B, H, L, D]
        v_all = split_heads(self.values, self.head_dim)
        total = torch.zeros(self.batch_size, self.length, self.length, dtype=self.dtype, device=self.device)
        for heads in self._head_chunks():
            dP = g_all[:, heads] @ v_all[:, heads].transpose(-1, -2)        # [B, h, L, L]
            cam = dP * self.head_probs(heads)
            total += (cam if signed else cam.clamp_(min=0)).sum(dim=1)
        return total / self.heads
