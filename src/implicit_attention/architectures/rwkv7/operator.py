"""RWKV-7 time mixing (our :class:`~implicit_attention.models.rwkv7.Rwkv7TimeMix`) as implicit attention.

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``N`` head size (key dim = value dim), ``C = H N``.

The factors mirror ``Rwkv7TimeMix.forward``: token shift, ``r``, log-decays ``lw``, replacement key
``k``, value ``v`` after the value residual (``v0 + (v_first - v0) sigmoid(..)`` with ``v_first``
captured from the layer's call), in-context rate ``a``, removal key ``kappa``, gate ``g``. The
state of a head evolves as ``S_t = S_{t-1} G_t + v_t^T k_t`` with the non-diagonal transition

    G_t = diag(w_t) + alpha_t^T beta_t,   alpha = -kappa,  beta = kappa * a,

and ``o_t = S_t r_t``. Unrolled, for a fixed input the map ``v -> o`` is linear and the same for
every value channel of the head::

    A_h[i, j] = k_j^T (G_{j+1} G_{j+2} ... G_i) r_i          (j <= i; empty product on the diagonal)

Computed without ``[L, L, N, N]`` products, in the WY / UT-transform form over the whole sequence
(see ``modeling_rwkv7`` for the derivation, here with ``S_0 = 0``): with ``gamma_t = prod_{s<=t} w_s``,

    Q_v[t, s] = r_t . (k_s gamma_t/gamma_s),         Q_z[t, s] = r_t . (beta_s gamma_t/gamma_s)     (s <= t)
    M_v[t, s] = alpha_t . (k_s gamma_{t-1}/gamma_s),  M_z[t, s] = alpha_t . (beta_s gamma_{t-1}/gamma_s)  (s < t)
    A_h = Q_v + Q_z (I - M_z)^{-1} M_v

(``z_t = S_{t-1} alpha_t = sum_s [(I - M_z)^{-1} M_v][t, s] v_s``). The four matrices are built
by a loop over the head size ``N`` with ``[B, H, L, L]`` temporaries and directly summed
log-decay segments; one unit-triangular solve per head replaces the token loop.

After the recurrence: the group norm per head (per-token scale a data-controlled constant; the mean
commutes with ``A_h``, so values are ``v - mean_head(v)``), the bonus ``(sum_n r k r_k)_head v`` on
the diagonal, the gate ``g`` on the rows; see :class:`~..rwkv6.layer.RwkvHeadsDecomposition`.

    unified:  matrix[c, i, j] = g_i[c] (gamma_c / sigma_i[h] A_h[i, j] + [i = j] bonus_i[h])
              offset[i, c]    = g_i[c] (beta_c + bonus_i[h] mean_h(v_i)),  values = v - mean_head(v)
    wkv:      matrix = A_h, values = v (the delta-rule recurrence alone; exact=False).

:mod:`.naive` is the slow reference (explicit ``N x N`` transition products).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rwkv6.operator import decay_matrices

VARIANTS: tuple[str, ...] = ("unified", "wkv")


@dataclass
class Rwkv7Factors:
    """Every data-controlled quantity of one RWKV-7 time mixing for one input, in the compute dtype.

    Attributes:
        r, k, v: receptance, replacement key, value after the value residual ``[B, L, H, N]``.
        log_w: ``[B, L, H, N]`` log-decays (``-exp(w)``, in ``(-exp(-0.5), 0)``).
        alpha, beta: ``[B, L, H, N]`` the rank-one part of the transition (``-kappa``, ``kappa * a``).
        bonus: ``[B, L, H]`` ``sum_n r k r_k`` per head.
        gate: ``[B, L, C]``; gn_weight, gn_bias: ``[C]``; gn_eps.
        mask: ``[B, L]``.
    """

    r: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_w: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    bonus: torch.Tensor
    gate: torch.Tensor
    gn_weight: torch.Tensor
    gn_bias: torch.Tensor
    gn_eps: float
    mask: torch.Tensor


def rwkv7_attention(r: torch.Tensor, k: torch.Tensor, log_w: torch.Tensor, alpha: torch.Tensor,
                    beta: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, L]`` ``A_h[i, j] = k_j^T (G_{j+1} ... G_i) r_i``, ``G_t = diag(w_t) + alpha_t^T beta_t``.

    Args:
        r, k, log_w, alpha, beta: ``[B, L, H, N]``.
    """
    batch, length, heads, size = r.shape
    r_t, k_t, lw_t, a_t, b_t = (t.permute(0, 2, 3, 1) for t in (r, k, log_w, alpha, beta))  # [B, H, N, L]
    q_v, q_z, m_v, m_z = (r.new_zeros(batch, heads, length, length) for _ in range(4))
    for n in range(size):
        inclusive, strict = decay_matrices(lw_t[:, :, n])      # gamma_t/gamma_s, gamma_{t-1}/gamma_s
        row_r, row_a = r_t[:, :, n, :, None], a_t[:, :, n, :, None]
        col_k, col_b = k_t[:, :, n, None, :], b_t[:, :, n, None, :]
        q_v += row_r * inclusive * col_k
        q_z += row_r * inclusive * col_b
        m_v += row_a * strict * col_k
        m_z += row_a * strict * col_b
    eye = torch.eye(length, dtype=r.dtype, device=r.device)
    z_of_v = torch.linalg.solve_triangular(eye - m_z, m_v, upper=False, unitriangular=True)
    return q_v + q_z @ z_of_v


def rwkv7_attention_tiled(r: torch.Tensor, k: torch.Tensor, log_w: torch.Tensor, alpha: torch.Tensor,
                          beta: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
    """``[B, H, L, L]`` the same ``A_h`` as :func:`rwkv7_attention`, its four decayed products by hierarchical
    tiles (:func:`~..rwkv6.operator.head_decay_sums`) instead of ``L^2 N`` exponentials each."""
    from ..rwkv6.operator import head_decay_sums

    q_v = head_decay_sums(r, k, log_w, strict=False, chunk_bytes=chunk_bytes)
    q_z = head_decay_sums(r, beta, log_w, strict=False, chunk_bytes=chunk_bytes)
    m_v = head_decay_sums(alpha, k, log_w, strict=True, chunk_bytes=chunk_bytes)
    m_z = head_decay_sums(alpha, beta, log_w, strict=True, chunk_bytes=chunk_bytes)
    eye = torch.eye(r.shape[1], dtype=r.dtype, device=r.device)
    z_of_v = torch.linalg.solve_triangular(eye - m_z, m_v, upper=False, unitriangular=True)
    return q_v + q_z @ z_of_v
