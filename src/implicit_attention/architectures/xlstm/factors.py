"""Reading xLSTM's mLSTM layers (``xLSTMLayer``): every data-controlled factor from the module and its
captured input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .operator import XlstmFactors, mlstm_matrices


def _soft_cap(x: torch.Tensor, cap) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def projections(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """``q, k, v, o~, i~, f~`` exactly as ``xLSTMLayer.forward`` splits them (single or fused weights)."""
    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    lin = lambda module: F.linear(x, p(module.weight), p(module.bias))  # noqa: E731
    config = layer.config
    if config.weight_mode == "single":
        q, k, v, o = lin(layer.q), lin(layer.k), lin(layer.v), lin(layer.ogate_preact)
        i = _soft_cap(lin(layer.igate_preact), config.gate_soft_cap)
        f = _soft_cap(lin(layer.fgate_preact), config.gate_soft_cap)
    else:
        q, k, v, o = torch.tensor_split(lin(layer.qkv_opreact),
                                        (layer.qk_dim, 2 * layer.qk_dim, 2 * layer.qk_dim + layer.v_dim), dim=-1)
        i, f = torch.tensor_split(_soft_cap(lin(layer.ifgate_preact), config.gate_soft_cap),
                                  (config.num_heads,), dim=-1)
    return q, k, v, o, i, f


def xlstm_factors(layer: nn.Module, hidden: torch.Tensor, dtype: torch.dtype) -> XlstmFactors:
    """Recompute every factor of ``layer`` (``xLSTMLayer``) for its input ``hidden [B, L, H]``."""
    x = hidden.detach().to(dtype)
    batch, length, _ = x.shape
    heads = layer.config.num_heads
    q, k, v, o, i, f = projections(layer, x, dtype)
    per_head = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731  [B, nh, L, .]
    attention = mlstm_matrices(per_head(q), per_head(k), i.transpose(1, 2), f.transpose(1, 2), layer.config.eps)

    norm = layer.multihead_norm
    h = (attention @ per_head(v)).transpose(1, 2)                          # [B, L, nh, dv]
    variance = h.var(dim=-1, keepdim=True, unbiased=False)
    scale = torch.rsqrt(variance + norm.eps).expand_as(h).flatten(-2)     # [B, L, C]
    weight = torch.ones_like(scale[0, 0]) if norm.weight is None else norm.weight.detach().to(dtype)
    factors = XlstmFactors(attention=attention, value=v, centred=v, norm_scale=scale * weight,
                           norm_bias=None if norm.bias is None else norm.bias.detach().to(dtype),
                           out_gate=torch.sigmoid(o), heads=heads,
                           mask=torch.ones(batch, length, dtype=dtype, device=x.device))
    factors.centred = v - factors.head_mean(v)
    return factors
