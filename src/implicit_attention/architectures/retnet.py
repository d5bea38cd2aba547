"""RetNet multi-scale retention (our ``implicit_attention.models.retnet.RetNetRetention``).

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``K`` key dim per head, ``V`` value dim per head,
``C = H * V`` the operator's channels (the value width), ``h(c)`` the head of channel ``c``.

Per head, the retention is ``A_h[i, j] = gamma_h^(i-j) (q_i . k_j)`` for ``j <= i`` (rotated
queries, rotated and scaled keys, keys of padding tokens zeroed). The output before ``o_proj`` is
``swish(g) ⊙ GroupNorm_h(Y)`` with ``Y = A_h V``; the group norm is per head and per token::

    out_i[c] = swish(g_i[c]) w_c s_i[h] (Y_i[c] - mean_{c' in h} Y_i[c']) + swish(g_i[c]) b_c,
    s_i[h] = 1 / sqrt(var_{c' in h}(Y_i[c']) + eps).

Since ``A_h`` is shared by the ``V`` channels of head ``h``, the mean over the head's channels
commutes with it: ``Y_i[c] - mean Y_i = sum_j A_h[i, j] (v_j[c] - mean_{c' in h} v_j[c'])``. Hence

    unified:     matrix_c[i, j] = swish(g_i[c]) w_c s_i[h(c)] A_{h(c)}[i, j],
                 values_j[c] = v_j[c] - mean_{c' in h(c)} v_j[c']  (head-centred values),
                 offset_i[c] = swish(g_i[c]) b_c.
    recurrence:  matrix_c = A_{h(c)}, values = v (the retention alone, exact=False).

The swish gate and the norm scale ``s`` are data-controlled constants (computed from the input,
then held fixed), which makes the identity exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import channels_per_block
from .base import AGGREGATES, LayerDecomposition
from .registry import Architecture, CapturedLayer, register

#: ``unified`` is exact; ``recurrence`` is the retention alone (values ``v``, no gate or norm).
VARIANTS: tuple[str, ...] = ("unified", "recurrence")


@dataclass
class HeadGatedFactors:
    """The output side shared by RetNet and GLA: per-head matrices, head group norm and swish gate.

    Attributes:
        v: ``[B, L, H, V]`` values.
        gate: ``[B, L, C]`` ``swish(g)``, the output gate.
        norm_scale: ``[B, L, H]`` ``1 / sqrt(var + eps)`` of the group norm, per head and token.
        norm_weight, norm_bias: ``[C]`` the group norm's affine parameters.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
    """

    v: torch.Tensor
    gate: torch.Tensor
    norm_scale: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    mask: torch.Tensor

    @property
    def head_v(self) -> int:
        return self.v.shape[-1]

    @property
    def row_scale(self) -> torch.Tensor:
        """``[B, L, C]`` ``swish(g) w s``: everything that multiplies row ``i`` of channel ``c``."""
        scale = self.norm_scale.repeat_interleave(self.head_v, dim=-1)
        return self.gate * self.norm_weight * scale

    def values(self, variant: str) -> torch.Tensor:
        """``[B, L, C]`` head-centred values (``unified``) or the raw ``v`` (``recurrence``)."""
        v = self.v - self.v.mean(-1, keepdim=True) if variant == "unified" else self.v
        return v.flatten(2)

    def head_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``[B, L, C]`` the gradient at ``Y = A v`` from the gradient at the output (gate, norm fixed).

        ``out = r ⊙ P(Y)`` with ``P`` the centring over each head (symmetric), so ``dY = P(r ⊙ grad)``.
        """
        g = (grad * self.row_scale).unflatten(-1, (-1, self.head_v))
        return (g - g.mean(-1, keepdim=True)).flatten(2)


def head_norm_scale(y: torch.Tensor, eps: float) -> torch.Tensor:
    """``[B, L, H]`` the group norm's ``1 / sqrt(var + eps)`` of ``y [B, L, H, V]`` (biased variance)."""
    centred = y - y.mean(-1, keepdim=True)
    return torch.rsqrt(centred.pow(2).mean(-1) + eps)


def channel_heads(channels: slice, head_v: int) -> tuple[slice, torch.Tensor]:
    """The heads covering ``channels`` and, per channel, its index among them."""
    first, last = channels.start // head_v, (channels.stop - 1) // head_v
    index = torch.arange(channels.start, channels.stop) // head_v - first
    return slice(first, last + 1), index


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
    (``(r A)_+ = r_+ A_+ + r_- A_-``), so the aggregates cost ``[B, H, L, L]``, not ``[B, C, L, L]``.
    Subclasses provide ``factors`` (a :class:`HeadGatedFactors`) and ``_head_matrices(heads)``.
    """

    factors: HeadGatedFactors

    def _head_matrices(self, heads: slice) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, how="mean", channel: int | None = None) -> torch.Tensor:
        if channel is not None or how not in AGGREGATES or how in self._aggregates:
            return super().aggregate(how, channel)
        f = self.factors
        heads, V = f.v.shape[2], f.head_v
        r = f.row_scale if self.variant == "unified" else torch.ones_like(f.gate)
        r = r.unflatten(-1, (heads, V)).transpose(1, 2)                       # [B, H, L, V]
        total = torch.zeros(self.batch_size, self.length, self.length, dtype=self.dtype, device=self.device)
        step = channels_per_block(self.batch_size, self.length, heads, self.dtype.itemsize,
                                  self.block_temporaries, self.block_bytes)
        for start in range(0, heads, step):
            sl = slice(start, min(start + step, heads))
            A, rh = self._head_matrices(sl), r[:, sl]
            if how == "mean":
                total += torch.einsum("bhij,bhi->bij", A, rh.sum(-1))
            elif how == "abs":
                total += torch.einsum("bhij,bhi->bij", A.abs(), rh.abs().sum(-1))
            else:
                total += torch.einsum("bhij,bhi->bij", A.clamp(min=0), rh.clamp(min=0).sum(-1))
                total += torch.einsum("bhij,bhi->bij", (-A).clamp(min=0), (-rh).clamp(min=0).sum(-1))
        self._aggregates[how] = total / self.channels
        return self._aggregates[how]

    def aggregate_rows(self, rows, how="mean") -> torch.Tensor:
        if how not in AGGREGATES:
            raise ValueError(f"how must be one of {AGGREGATES}, got {how!r}")
        return self.aggregate(how)[:, self._row_index(rows)]


@dataclass
class RetNetFactors(HeadGatedFactors):
    """RetNet's data-controlled quantities for one input (plus :class:`HeadGatedFactors`).

    Attributes:
        q: ``[B, L, H, K]`` rotated queries; k: ``[B, L, H, K]`` rotated, scaled keys (0 on padding).
        log_gamma: ``[H]`` ``log(1 - 2^(-5-h))``.
    """

    q: torch.Tensor = None
    k: torch.Tensor = None
    log_gamma: torch.Tensor = None


def retnet_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   dtype: torch.dtype) -> RetNetFactors:
    """Recompute every data-controlled factor of ``module`` for its input ``hidden_states [B, L, D]``."""
    # lazy: importing the model package registers its Auto classes
    from ..models.retnet.modeling_retnet import log_gammas, retention_matrices, rotary

    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h = hidden_states.detach().to(dtype)
    batch, length, _ = h.shape
    H, K, V = module.num_heads, module.head_k, module.head_v
    mask = torch.ones(batch, length, dtype=dtype, device=h.device) if attention_mask is None \
        else attention_mask.detach().to(device=h.device, dtype=dtype)
    lin = lambda proj: F.linear(h, p(proj.weight), p(proj.bias))  # noqa: E731
    q = rotary(lin(module.q_proj).view(batch, length, H, K), module.rotary_base)
    k = rotary(lin(module.k_proj).view(batch, length, H, K), module.rotary_base) * K ** -0.5
    k = k * mask[:, :, None, None]
    v = lin(module.v_proj).view(batch, length, H, V)
    log_gamma = log_gammas(H, dtype, h.device)
    y = torch.einsum("bhnm,bmhv->bnhv", retention_matrices(q, k, log_gamma), v)
    norm = module.group_norm
    return RetNetFactors(v=v, gate=F.silu(lin(module.g_proj)), norm_scale=head_norm_scale(y, norm.eps),
                         norm_weight=p(norm.weight), norm_bias=p(norm.bias), mask=mask,
                         q=q, k=k, log_gamma=log_gamma)


def retention_heads(f: RetNetFactors, heads: slice) -> torch.Tensor:
    """``[B, h, L, L]`` ``A_h[i, j] = gamma_h^(i-j) (q_i . k_j)``, ``j <= i``, for a slice of heads."""
    q, k, log_gamma = f.q[:, :, heads], f.k[:, :, heads], f.log_gamma[heads]
    length = q.shape[1]
    idx = torch.arange(length, device=q.device)
    distance = (idx[:, None] - idx[None, :]).to(q.dtype)
    decay = torch.exp(distance.clamp(min=0) * log_gamma[:, None, None]).tril()   # [h, L, L]
    return torch.einsum("bihk,bjhk->bhij", q, k) * decay


def retnet_block(f: RetNetFactors, channels: slice, variant: str):
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    return head_block(lambda heads: retention_heads(f, heads), f, channels, variant)


def retnet_naive(f: RetNetFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: matrices ``[B, C, L, L]`` and offset ``[B, L, C]``, entry by entry from the equations."""
    batch, length, H, V = f.v.shape
    matrices = torch.zeros(batch, H * V, length, length, dtype=f.v.dtype)
    offset = torch.zeros(batch, length, H * V, dtype=f.v.dtype)
    for b in range(batch):
        for c in range(H * V):
            h = c // V
            gamma = 1 - 2.0 ** (-5 - h)
            for i in range(length):
                row = 1.0
                if variant == "unified":
                    row = float(f.gate[b, i, c]) * float(f.norm_weight[c]) * float(f.norm_scale[b, i, h])
                    offset[b, i, c] = f.gate[b, i, c] * f.norm_bias[c]
                for j in range(i + 1):
                    qk = sum(float(f.q[b, i, h, n]) * float(f.k[b, j, h, n]) for n in range(f.q.shape[-1]))
                    matrices[b, c, i, j] = row * gamma ** (i - j) * qk
    return matrices, offset


class RetNetLayerDecomposition(HeadSharedDecomposition):
    """A RetNet retention layer as per-channel implicit attention over its value width ``C = H V``."""

    def __init__(self, factors: RetNetFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant == "unified", values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return retnet_block(self.factors, channels, self.variant)

    def _head_matrices(self, heads: slice) -> torch.Tensor:
        return retention_heads(self.factors, heads)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self.variant == "unified" else self.factors.head_gradient(grad)


def _build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> RetNetLayerDecomposition:
    factors = retnet_factors(captured.module, captured.inputs, captured.attention_mask, dtype)
    return RetNetLayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                    output=captured.output.detach().to(dtype))


register(Architecture(
    name="retnet",
    module_classes=("implicit_attention.models.retnet.modeling_retnet.RetNetRetention",),
    model_classes=("RetNetForCausalLM", "RetNetModel"),
    variants=VARIANTS,
    output_module="o_proj",
    build=_build,
    channels=lambda module: module.value_dim,
))
