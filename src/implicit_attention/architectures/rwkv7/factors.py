"""Reading RWKV-7 time mixing (``Rwkv7TimeMix``): every data-controlled factor from the module, its captured
input and the ``v_first`` it was called with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import masked_input
from ..rwkv6.factors import token_shift
from .operator import Rwkv7Factors


def rwkv7_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  v_first: torch.Tensor | None, dtype: torch.dtype) -> Rwkv7Factors:
    """Recompute every factor of ``module`` (an ``Rwkv7TimeMix``) for its input ``[B, L, C]``."""
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    x, mask = masked_input(hidden_states, attention_mask, dtype)
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
