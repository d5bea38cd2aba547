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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mamba.operator import segment_sums
from .registry import Architecture, CapturedLayer, register
from .retnet import HeadGatedFactors, HeadSharedDecomposition, head_block, head_norm_scale

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
    """A GLA layer as per-channel implicit attention over its value width ``C = H V``."""

    def __init__(self, factors: GLAFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant == "unified", values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return gla_block(self.factors, channels, self.variant)

    def _head_matrices(self, heads: slice) -> torch.Tensor:
        return gla_heads(self.factors, heads)

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
