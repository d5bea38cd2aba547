"""RWKV-6 time mixing (our :class:`~implicit_attention.models.rwkv6.Rwkv6TimeMix`) as implicit attention.

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``N`` head size (key dim = value dim), ``C = H N``
the operator's channels (value channels of all heads), ``c`` a block of channels.

The factors are recomputed from the module's parameters and its captured input, mirroring
``Rwkv6TimeMix.forward``: ddlerp token shift, ``r, k, v``, gate ``g = silu(W_g xg)``, log-decays
``lw_t = log w_t = -exp(d_0 + tanh(xw D1) D2)`` and the bonus ``u``. Per head ``h`` the wkv
``o_i = r_i (S_{i-1} + diag(u) k_i^T v_i)``, ``S_i = diag(w_i) S_{i-1} + k_i^T v_i`` unrolls to one
matrix shared by the ``N`` value channels of the head::

    A_h[i, j] = sum_n r_i[n] exp(sum_{s=j+1..i-1} lw_s[n]) k_j[n]      (j < i)
    A_h[i, i] = sum_n r_i[n] u[n] k_i[n]
    o_i[c]    = sum_j A_h[i, j] v_j[c]

(the decay runs over the tokens strictly between ``j`` and ``i``: ``S_{i-1}`` holds ``k_j^T v_j``
decayed by ``w_{j+1} .. w_{i-1}``, the current token enters through the bonus only).

The group norm per head, ``GN(o)_c = gamma_c (o_c - mean_h o) / sigma_i + beta_c`` with
``sigma_i = sqrt(var_h(o_i) + eps)`` a data-controlled constant, commutes with ``A_h`` for the
mean: ``o_c - mean_h o = sum_j A_h[i, j] (v_j[c] - mean_h v_j)``. Hence, exactly,

    unified:  matrix[c, i, j] = g_i[c] gamma_c / sigma_i[h] A_h[i, j],   values = v - mean_head(v),
              offset[i, c] = g_i[c] beta_c;   out = (GN(o) * g), the input of ``output``.
    wkv:      matrix = A_h, values = v (the recurrence alone, the predecessor's form; exact=False).

The fast path loops over the head size ``N`` with ``[B, H, L, L]`` temporaries (never
``[B, H, L, L, N]``); the decay exponent is a directly summed segment of log-decays, so it is
always ``<= 0`` and accurate. :mod:`.naive` is the slow reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Formulations offered; ``unified`` is exact, ``wkv`` is the recurrence alone.
VARIANTS: tuple[str, ...] = ("unified", "wkv")
EXACT_VARIANTS: frozenset[str] = frozenset({"unified"})


@dataclass
class Rwkv6Factors:
    """Every data-controlled quantity of one RWKV-6 time mixing for one input, in the compute dtype.

    Attributes:
        r, k, v: receptance, key, value ``[B, L, H, N]``.
        log_w: ``[B, L, H, N]`` log-decays ``log w_t <= 0``.
        u: ``[H, N]`` bonus.
        gate: ``[B, L, C]`` ``silu(W_g xg)``.
        gn_weight, gn_bias: ``[C]`` group norm affine; gn_eps its eps.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
    """

    r: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_w: torch.Tensor
    u: torch.Tensor
    gate: torch.Tensor
    gn_weight: torch.Tensor
    gn_bias: torch.Tensor
    gn_eps: float
    mask: torch.Tensor


def decay_matrices(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., L] -> ([..., L, L], [..., L, L])`` the pairwise decays of one key channel.

    ``inclusive[i, j] = exp(sum_{s=j+1..i} lw_s)`` for ``j <= i`` and
    ``strict[i, j] = exp(sum_{s=j+1..i-1} lw_s)`` for ``j < i``; zero elsewhere. The segments are
    summed directly (masked cumulative sums), never as differences of one cumulative sum.
    """
    length = log_w.shape[-1]
    below = torch.ones(length, length, dtype=torch.bool, device=log_w.device).tril(-1)
    segments = log_w.unsqueeze(-1).expand(*log_w.shape, length).masked_fill(~below, 0).cumsum(dim=-2)
    inclusive = torch.exp(segments).masked_fill_(~torch.ones_like(below).tril(), 0)
    strict = F.pad(inclusive[..., :-1, :], (0, 0, 1, 0))
    return inclusive, strict


def rwkv6_attention(r: torch.Tensor, k: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, L]`` the per-head wkv attention ``A_h`` (bonus on the diagonal).

    Args:
        r, k, log_w: ``[B, L, H, N]``; u: ``[H, N]``.
    """
    batch, length, heads, size = r.shape
    r_t, k_t, lw_t = (t.permute(0, 2, 3, 1) for t in (r, k, log_w))           # [B, H, N, L]
    A = r.new_zeros(batch, heads, length, length)
    for n in range(size):
        _, strict = decay_matrices(lw_t[:, :, n])
        A += r_t[:, :, n, :, None] * strict * k_t[:, :, n, None, :]
    return A + torch.diag_embed((r * u * k).sum(-1).transpose(1, 2))


def head_decay_sums(row: torch.Tensor, col: torch.Tensor, log_w: torch.Tensor, *, strict: bool,
                    chunk_bytes: int | None = None) -> torch.Tensor:
    """``[B, H, L, L]`` ``sum_n row_i[n] exp(sum_s log_w_s[n]) col_j[n]`` per head by hierarchical tiles
    (:func:`~..tiled.diagonal_sum`, heads on the batch, every exponent ``<= 0``): the decay over
    ``s = j+1..i`` (``j <= i``), or with ``strict`` over ``s = j+1..i-1`` (``j < i``), the state read
    before token ``i`` decays it: row ``i - 1`` of the inclusive sum with row scale ``row_{t+1}`` at ``t``.

    Args:
        row, col, log_w: ``[B, L, H, N]``.
    """
    from ...memory import DEFAULT_BLOCK_BYTES
    from ..tiled import DiagonalOperator, diagonal_sum

    batch, length, heads, size = row.shape
    flat = lambda t: t.transpose(1, 2).reshape(batch * heads, length, size)  # noqa: E731
    if strict:
        row = F.pad(row[:, 1:], (0, 0, 0, 0, 0, 1))                       # row_{t+1} at t, 0 past the end
    sums = diagonal_sum(DiagonalOperator(log_decay=flat(log_w), col=flat(col), row=flat(row)),
                        chunk_bytes=chunk_bytes or DEFAULT_BLOCK_BYTES).view(batch, heads, length, length)
    return F.pad(sums[:, :, :-1], (0, 0, 1, 0)) if strict else sums      # strict: row i <- row i - 1


def rwkv6_attention_tiled(r: torch.Tensor, k: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor,
                          chunk_bytes: int | None = None) -> torch.Tensor:
    """``[B, H, L, L]`` the same ``A_h`` as :func:`rwkv6_attention` by hierarchical tiles (:func:`head_decay_sums`):
    ``O(L^2 N)`` multiply-adds in matrix products, every exponent ``<= 0``, instead of ``L^2 N`` exponentials."""
    A = head_decay_sums(r, k, log_w, strict=True, chunk_bytes=chunk_bytes)
    return A + torch.diag_embed((r * u * k).sum(-1).transpose(1, 2))
