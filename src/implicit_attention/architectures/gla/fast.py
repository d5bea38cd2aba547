"""GLA's heads by hierarchical tiles: each key dim is a scalar-decay channel of a
:class:`~..tiled.DiagonalOperator` (rows ``q[k]``, columns ``k[k]``), so ``A_h`` and the signed
channel mean are matrix products with exponents ``<= 0`` instead of ``L^2 K`` exponentials."""

from __future__ import annotations

import torch

from ...memory import DEFAULT_BLOCK_BYTES
from ..tiled import DiagonalOperator, diagonal_sum
from .operator import GLAFactors


def key_dim_operator(f: GLAFactors, heads: slice, row: torch.Tensor | None = None,
                     heads_on_batch: bool = True) -> DiagonalOperator:
    """The heads' key dims as the channels of a :class:`~..tiled.DiagonalOperator`.

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
    """``[B, h, L, L]`` the same ``A_h`` as :func:`gla_heads` by hierarchical tiles (:mod:`..tiled`):
    ``O(L^2 K)`` multiply-adds in matrix products instead of ``L^2 K`` exponentials."""
    batch, length = f.q.shape[:2]
    return diagonal_sum(key_dim_operator(f, heads), chunk_bytes=chunk_bytes).view(batch, -1, length, length)
