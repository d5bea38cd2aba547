"""RetNet multi-scale retention (our ``implicit_attention.models.retnet.RetNetRetention``): the math.

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``K`` key dim per head, ``V`` value dim per head,
``C = H * V`` the operator's channels (the value width), ``h(c)`` the head of channel ``c``.

Per head, the retention is ``A_h[i, j] = gamma_h^(i-j) (q_i . k_j)`` for ``j <= i`` (rotated
queries, rotated and scaled keys, keys of padding tokens zeroed), ``gamma_h = 1 - 2^(-5-h)``. The
output side (group norm per head, swish output gate) is in :mod:`..heads`::

    unified:     matrix_c[i, j] = swish(g_i[c]) w_c s_i[h(c)] A_{h(c)}[i, j],
                 values = head-centred v,  offset_i[c] = swish(g_i[c]) b_c.
    recurrence:  matrix_c = A_{h(c)}, values = v (the retention alone, exact=False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import HeadGatedFactors, head_block

#: ``unified`` is exact; ``recurrence`` is the retention alone (values ``v``, no gate or norm).
VARIANTS: tuple[str, ...] = ("unified", "recurrence")


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
