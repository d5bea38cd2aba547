"""Gated linear attention (our ``implicit_attention.models.gla.GLAAttention``).

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``K`` key dim per head, ``V`` value dim per head,
``C = H * V`` the operator's channels (the value width), ``h(c)`` the head of channel ``c``.

The decays are per key dim, so the head's matrix sums ``K`` decayed query-key products:

    A_h[i, j] = sum_k q_i[k] k_j[k] prod_{s=j+1..i} alpha_s[k]          (j <= i; k = 0 on padding)

and ``o = A_h V`` per head. The output side (group norm per head, swish output gate) is the same
as RetNet's (see :mod:`.retnet`): with head-centred values ``v_j[c] - mean_{c' in h} v_j[c']``,

    unified:     matrix_c[i, j] = swish(r_i[c]) w_c s_i[h(c)] A_{h(c)}[i, j],  offset_i[c] = swish(r_i[c]) b_c,
    recurrence:  matrix_c = A_{h(c)}, values = v (the gated linear attention alone, exact=False).

Memory: ``A_h`` is accumulated over the key dim in a loop of ``K`` block-sized updates, each the
``exp`` of segment sums of ``log alpha[k]`` (exponents ``<= 0``); nothing holds ``[L, L, K]``.

Aggregates: each key dim is a scalar-decay channel (rows ``q[k]``, columns ``k[k]``), so ``A_h``
and the signed channel mean (a sum over all ``H K`` key dims with the heads' row sums folded into
the queries) come from the hierarchical tiles of :mod:`.tiled`: matrix products with exponents
``<= 0`` instead of ``L^2 K`` exponentials.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import DEFAULT_BLOCK_BYTES
from .base import AGGREGATES
from .mamba.operator import segment_sums
from .registry import Architecture, CapturedLayer, register
from .retnet import HeadGatedFactors, HeadSharedDecomposition, head_block, head_norm_scale
from .tiled import DiagonalOperator, diagonal_rows, diagonal_sum

#: ``unified`` is exact; ``recurrence`` is the gated linear attention alone (values ``v``).
VARIANTS: tuple[str, ...] = ("unified", "recurrence")


@dataclass
class GLAFactors(HeadGatedFactors):
    """GLA's data-controlled quantities for one input (plus :class:`~.retnet.HeadGatedFactors`).

    Attributes:
        q: ``[B, L, H, K]`` scaled queries; k: ``[B, L, H, K]`` keys (0 on padding).
        log_alpha: ``[B, L, H, K]`` ``log alpha = logsigmoid(.) / tau``.
    """

    q: torch.Tensor = None
    k: torch.Tensor = None
    log_alpha: torch.Tensor = None


def gla_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                dtype: torch.dtype) -> GLAFactors:
    """Recompute every data-controlled factor of ``module`` for its input ``hidden_states [B, L, D]``."""
    from ..models.gla.modeling_gla import chunked_gla  # lazy: the model package registers Auto classes

    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h = hidden_states.detach().to(dtype)
    batch, length, _ = h.shape
    heads = (batch, length, module.num_heads, -1)
    mask = torch.ones(batch, length, dtype=dtype, device=h.device) if attention_mask is None \
        else attention_mask.detach().to(device=h.device, dtype=dtype)
    lin = lambda proj, x=h: F.linear(x, p(proj.weight), p(proj.bias))  # noqa: E731
    q = lin(module.q_proj).view(heads) * module.head_k ** -0.5
    k = lin(module.k_proj).view(heads) * mask[:, :, None, None]
    v = lin(module.v_proj).view(heads)
    low, up = module.gk_proj
    log_alpha = F.logsigmoid(lin(up, lin(low)).view(heads)) / module.gate_logit_normalizer
    y = chunked_gla(q, k, v, log_alpha, module.chunk_size)
    norm = module.group_norm
    return GLAFactors(v=v, gate=F.silu(lin(module.g_proj)), norm_scale=head_norm_scale(y, norm.eps),
                      norm_weight=p(norm.weight), norm_bias=p(norm.bias), mask=mask,
                      q=q, k=k, log_alpha=log_alpha)


def gla_heads(f: GLAFactors, heads: slice) -> torch.Tensor:
    """``[B, h, L, L]`` ``A_h[i, j] = sum_k q_i[k] k_j[k] exp(sum_{s=j+1..i} log alpha_s[k])`` for a slice of heads."""
    q = f.q[:, :, heads].permute(0, 2, 3, 1)                  # [B, h, K, L]
    k = f.k[:, :, heads].permute(0, 2, 3, 1)
    log_alpha = f.log_alpha[:, :, heads].permute(0, 2, 3, 1)
    length = q.shape[-1]
    A = q.new_zeros(q.shape[0], q.shape[1], length, length)
    for n in range(q.shape[2]):                                # loop over the key dim: [B, h, L, L] at a time
        decay = segment_sums(log_alpha[:, :, n]).exp_()
        A += decay.mul_(q[:, :, n, :, None] * k[:, :, n, None, :])
    return A.tril_()


def key_dim_operator(f: GLAFactors, heads: slice, row: torch.Tensor | None = None,
                     heads_on_batch: bool = True) -> DiagonalOperator:
    """The heads' key dims as the channels of a :class:`~.tiled.DiagonalOperator`.

    ``A_h[i, j] = sum_k q_i[k] exp(G_i[k] - G_j[k]) k_j[k]`` is a sum over diagonal channels ``k``
    with rows ``q[k]`` and columns ``k[k]``. ``heads_on_batch``: batch ``B * h`` and channels ``K``
    (one sum per head); otherwise batch ``B`` and channels ``h K`` (one sum over every head).
    ``row [B, L, H]`` (or ``None``) scales the rows of each head.
    """
    q, k, log_alpha = f.q[:, :, heads], f.k[:, :, heads], f.log_alpha[:, :, heads]     # [B, L, h, K]
    if row is not None:
        q = q * row[:, :, heads, None]
    batch, length, count, size = q.shape
    if heads_on_batch:
        flat = lambda t: t.transpose(1, 2).reshape(batch * count, length, size)  # noqa: E731
    else:
        flat = lambda t: t.flatten(2)  # noqa: E731
    return DiagonalOperator(log_decay=flat(log_alpha), col=flat(k), row=flat(q))


def gla_heads_tiled(f: GLAFactors, heads: slice, chunk_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """``[B, h, L, L]`` the same ``A_h`` as :func:`gla_heads` by hierarchical tiles (:mod:`.tiled`):
    ``O(L^2 K)`` multiply-adds in matrix products instead of ``L^2 K`` exponentials."""
    batch, length = f.q.shape[:2]
    return diagonal_sum(key_dim_operator(f, heads), chunk_bytes=chunk_bytes).view(batch, -1, length, length)


def gla_block(f: GLAFactors, channels: slice, variant: str):
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    return head_block(lambda heads: gla_heads(f, heads), f, channels, variant)


def gla_naive(f: GLAFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: matrices ``[B, C, L, L]`` and offset ``[B, L, C]``, entry by entry from the equations."""
    batch, length, H, V = f.v.shape
    alpha = f.log_alpha.exp()
    matrices = torch.zeros(batch, H * V, length, length, dtype=f.v.dtype)
    offset = torch.zeros(batch, length, H * V, dtype=f.v.dtype)
    for b in range(batch):
        for c in range(H * V):
            h = c // V
            for i in range(length):
                row = 1.0
                if variant == "unified":
                    row = float(f.gate[b, i, c]) * float(f.norm_weight[c]) * float(f.norm_scale[b, i, h])
                    offset[b, i, c] = f.gate[b, i, c] * f.norm_bias[c]
                for j in range(i + 1):
                    total = 0.0
                    for n in range(f.q.shape[-1]):
                        decay = 1.0
                        for s in range(j + 1, i + 1):
                            decay *= float(alpha[b, s, h, n])
                        total += float(f.q[b, i, h, n]) * float(f.k[b, j, h, n]) * decay
                    matrices[b, c, i, j] = row * total
    return matrices, offset


class GLALayerDecomposition(HeadSharedDecomposition):
    """A GLA layer as per-channel implicit attention over its value width ``C = H V``.

    Aggregates never build per-channel blocks. The signed mean folds each head's channel sum of
    row scales ``rsum_h[i] = sum_{c in h} r_i[c]`` into its queries, which makes it one factorised
    channel sum over all ``H K`` key dims (:func:`~.tiled.diagonal_sum`); ``abs`` and ``pos`` need
    each head's ``A_h`` (from tiles, :func:`gla_heads_tiled`); single rows cost ``O(R L H K)``.
    The per-channel blocks (:attr:`matrix`, attribution) keep the direct :func:`gla_heads`.
    """

    def __init__(self, factors: GLAFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant == "unified", values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return gla_block(self.factors, channels, self.variant)

    def _head_matrices(self, heads: slice) -> torch.Tensor:
        return gla_heads_tiled(self.factors, heads, self.block_bytes)

    def _head_rows(self) -> torch.Tensor:
        """``[B, L, H, V]`` what multiplies row ``i`` of each channel (1 for ``recurrence``)."""
        f = self.factors
        r = f.row_scale if self.variant == "unified" else torch.ones_like(f.gate)
        return r.unflatten(-1, (f.v.shape[2], f.head_v))

    def aggregate(self, how="mean", channel=None):
        if how == "mean" and channel is None and "mean" not in self._aggregates:
            # mean_c r_i[c] A_h(c)[i, j] = (1/C) sum_h rsum_h[i] A_h[i, j]: one sum over all H K key dims
            op = key_dim_operator(self.factors, slice(None), row=self._head_rows().sum(-1), heads_on_batch=False)
            self._aggregates["mean"] = diagonal_sum(op, chunk_bytes=self.block_bytes) / self.channels
        return super().aggregate(how, channel)

    def aggregate_rows(self, rows, how="mean") -> torch.Tensor:
        if how not in AGGREGATES:
            raise ValueError(f"how must be one of {AGGREGATES}, got {how!r}")
        rows = self._row_index(rows)
        if how in self._aggregates:
            return self._aggregates[how][:, rows]
        f = self.factors
        r = self._head_rows()[:, rows].transpose(1, 2)                          # [B, H, R, V]
        A = diagonal_rows(key_dim_operator(f, slice(None)), rows, "mean", self.block_bytes)
        A = A.view(self.batch_size, -1, len(rows), self.length)                  # [B, H, R, L] the heads' rows
        if how == "mean":
            total = torch.einsum("bhrj,bhr->brj", A, r.sum(-1))
        elif how == "abs":
            total = torch.einsum("bhrj,bhr->brj", A.abs(), r.abs().sum(-1))
        else:
            total = (torch.einsum("bhrj,bhr->brj", A.clamp(min=0), r.clamp(min=0).sum(-1))
                     + torch.einsum("bhrj,bhr->brj", (-A).clamp(min=0), (-r).clamp(min=0).sum(-1)))
        return total / self.channels

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self.variant == "unified" else self.factors.head_gradient(grad)


def _build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> GLALayerDecomposition:
    factors = gla_factors(captured.module, captured.inputs, captured.attention_mask, dtype)
    return GLALayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                 output=captured.output.detach().to(dtype))


register(Architecture(
    name="gla",
    module_classes=("implicit_attention.models.gla.modeling_gla.GLAAttention",),
    model_classes=("GLAForCausalLM", "GLAModel"),
    variants=VARIANTS,
    output_module="o_proj",
    build=_build,
    channels=lambda module: module.value_dim,
))
