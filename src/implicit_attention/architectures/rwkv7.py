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
the diagonal, the gate ``g`` on the rows; see :class:`~.rwkv6.RwkvHeadsDecomposition`.

    unified:  matrix[c, i, j] = g_i[c] (gamma_c / sigma_i[h] A_h[i, j] + [i = j] bonus_i[h])
              offset[i, c]    = g_i[c] (beta_c + bonus_i[h] mean_h(v_i)),  values = v - mean_head(v)
    wkv:      matrix = A_h, values = v (the delta-rule recurrence alone; exact=False).

:mod:`.rwkv7_naive` is the slow reference (explicit ``N x N`` transition products).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Architecture, CapturedLayer, register
from .rwkv6 import RwkvHeadsDecomposition, _input_and_mask, decay_matrices, record_wkv, token_shift

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


def rwkv7_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  v_first: torch.Tensor | None, dtype: torch.dtype) -> Rwkv7Factors:
    """Recompute every factor of ``module`` (an ``Rwkv7TimeMix``) for its input ``[B, L, C]``."""
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    x, mask = _input_and_mask(hidden_states, attention_mask, dtype)
    batch, length, C = x.shape
    heads = (batch, length, module.num_heads, module.head_size)
    dx = token_shift(x) - x
    xr, xw, xk, xv, xa, xg = (x + dx * p(mu) for mu in (module.x_r, module.x_w, module.x_k, module.x_v,
                                                        module.x_a, module.x_g))
    r = F.linear(xr, p(module.receptance.weight))
    w = -F.softplus(-(p(module.w0) + torch.tanh(xw @ p(module.w1)) @ p(module.w2))) - 0.5
    k = F.linear(xk, p(module.key.weight))
    v = F.linear(xv, p(module.value.weight))
    if module.layer_id > 0:
        if v_first is None:
            raise ValueError(f"RWKV-7 layer {module.layer_id} was called without v_first")
        v_first = p(v_first)
        v = v + (v_first - v) * torch.sigmoid(p(module.v0) + (xv @ p(module.v1)) @ p(module.v2))
    a = torch.sigmoid(p(module.a0) + (xa @ p(module.a1)) @ p(module.a2))
    g = torch.sigmoid(xg @ p(module.g1)) @ p(module.g2)
    kk = F.normalize((k * p(module.k_k)).view(heads), dim=-1, p=2.0).view(batch, length, C)
    k = k * (1 + (a - 1) * p(module.k_a))
    bonus = (r.view(heads) * k.view(heads) * p(module.r_k)).sum(-1)
    return Rwkv7Factors(r=r.view(heads), k=k.view(heads), v=v.view(heads), log_w=(-torch.exp(w)).view(heads),
                        alpha=(-kk).view(heads), beta=(kk * a).view(heads), bonus=bonus, gate=g,
                        gn_weight=p(module.ln_x.weight), gn_bias=p(module.ln_x.bias), gn_eps=module.ln_x.eps,
                        mask=mask)


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


class Rwkv7LayerDecomposition(RwkvHeadsDecomposition):
    """An RWKV-7 time mixing as per-channel implicit attention over its ``C = H N`` value channels."""

    def __init__(self, factors: Rwkv7Factors, *, variant: str, **kwargs):
        self.factors = factors
        f = factors
        super().__init__(attention=rwkv7_attention(f.r, f.k, f.log_w, f.alpha, f.beta), v=f.v, gate=f.gate,
                         gn_weight=f.gn_weight, gn_bias=f.gn_bias, gn_eps=f.gn_eps, bonus=f.bonus,
                         variant=variant, mask=f.mask, **kwargs)


def _build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> Rwkv7LayerDecomposition:
    factors = rwkv7_factors(captured.module, captured.inputs, captured.attention_mask,
                            captured.kwargs.get("v_first"), dtype)
    return Rwkv7LayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                   output=captured.output.detach().to(dtype))


register(Architecture(
    name="rwkv7",
    module_classes=("implicit_attention.models.rwkv7.modeling_rwkv7.Rwkv7TimeMix",),
    model_classes=("Rwkv7ForCausalLM", "Rwkv7Model"),
    variants=VARIANTS,
    output_module="output",
    build=_build,
    channels=lambda module: module.hidden_size,
    extra_hooks=record_wkv,
))
