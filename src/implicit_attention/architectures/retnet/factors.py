"""Reading RetNet retention layers: every data-controlled factor from the module and its captured input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import head_norm_scale
from ..primitives import padding_mask
from .operator import RetNetFactors


def retnet_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   dtype: torch.dtype) -> RetNetFactors:
    """Recompute every data-controlled factor of ``module`` for its input ``hidden_states [B, L, D]``."""
    # lazy: importing the model package registers its Auto classes
    from ...models.retnet.modeling_retnet import log_gammas, retention_matrices, rotary

    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h = hidden_states.detach().to(dtype)
    batch, length, _ = h.shape
    H, K, V = module.num_heads, module.head_k, module.head_v
    mask = padding_mask(attention_mask, h)
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
