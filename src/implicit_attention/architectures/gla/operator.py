"""Gated linear attention (our ``implicit_attention.models.gla.GLAAttention``): the math.

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``K`` key dim per head, ``V`` value dim per head,
``C = H * V`` the operator's channels (the value width), ``h(c)`` the head of channel ``c``.

The decays are per key dim, so the head's matrix sums ``K`` decayed query-key products:

    A_h[i, j] = sum_k q_i[k] k_j[k] prod_{s=j+1..i} alpha_s[k]          (j <= i; k = 0 on padding)

and ``o = A_h V`` per head. The output side (group norm per head, swish output gate) is the same
as RetNet's (see :mod:`..heads`): with head-centred values ``v_j[c] - mean_{c' in h} v_j[c']``,

    unified:     matrix_c[i, j] = swish(r_i[c]) w_c s_i[h(c)] A_{h(c)}[i, j],  offset_i[c] = swish(r_i[c]) b_c,
    recurrence:  matrix_c = A_{h(c)}, values = v (the gated linear attention alone, exact=False).

Memory: ``A_h`` is accumulated over the key dim in a loop of ``K`` block-sized updates, each the
``exp`` of segment sums of ``log alpha[k]`` (exponents ``<= 0``); nothing holds ``[L, L, K]``.

Aggregates: each key dim is a scalar-decay channel (rows ``q[k]``, columns ``k[k]``), so ``A_h``
and the signed channel mean (a sum over all ``H K`` key dims with the heads' row sums folded into
the queries) come from the hierarchical tiles of :mod:`..tiled` (:mod:`.fast`): matrix products with exponents
``<= 0`` instead of ``L^2 K`` exponentials.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import HeadGatedFactors, head_block
from ..primitives import segment_sums

#: ``unified`` is exact; ``recurrence`` is the gated linear attention alone (values ``v``).
VARIANTS: tuple[str, ...] = ("unified", "recurrence")


@dataclass
class GLAFactors(HeadGatedFactors):
    """GLA's data-controlled quantities for one input (plus :class:`~..heads.HeadGatedFactors`).

    Attributes:
        q: ``[B, L, H, K]`` scaled queries; k: ``[B, L, H, K]`` keys (0 on padding).
        log_alpha: ``[B, L, H, K]`` ``log alpha = logsigmoid(.) / tau``.
    """

    q: torch.Tensor = None
    k: torch.Tensor = None
    log_alpha: torch.Tensor = None


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
