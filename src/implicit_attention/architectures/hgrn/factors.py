"""Reading HGRN layers: every data-controlled factor from the module and its captured input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import causal_conv, padding_mask
from .operator import HGRNFactors


def hgrn_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                 lower_bound: torch.Tensor | None, dtype: torch.dtype) -> HGRNFactors:
    """Recompute every data-controlled factor of ``module`` for its input ``hidden_states [B, L, D]``."""
    from ...models.hgrn.modeling_hgrn import chunked_scan  # lazy: the model package registers Auto classes

    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h = hidden_states.detach().to(dtype)
    mask = padding_mask(attention_mask, h)
    lin = lambda proj: F.linear(h, p(proj.weight), p(proj.bias))  # noqa: E731
    x = lin(module.i_proj) * mask[..., None]
    conv_weight = conv_bias = None
    conv_out = x
    if module.conv1d is not None:
        conv_weight, conv_bias = p(module.conv1d.weight)[:, 0, :], p(module.conv1d.bias)
        conv_out = causal_conv(x, conv_weight, conv_bias)
    z = lin(module.f_proj)
    lb = 0.0 if lower_bound is None else p(lower_bound)
    forget = lb + (1 - lb) * torch.sigmoid(z)
    one_minus_f = (1 - lb) * torch.sigmoid(-z)
    out_gate = torch.sigmoid(lin(module.g_proj))
    u = F.silu(conv_out) * mask[..., None]
    state = chunked_scan(torch.log(forget), one_minus_f * u, module.chunk_size)
    norm = module.g_norm
    norm_scale = torch.rsqrt((out_gate * state).pow(2).mean(-1) + norm.eps)
    return HGRNFactors(x=x, conv_out=conv_out, conv_weight=conv_weight, conv_bias=conv_bias, forget=forget,
                       one_minus_f=one_minus_f, out_gate=out_gate, norm_scale=norm_scale,
                       norm_weight=p(norm.weight), mask=mask)
