"""Reading Griffin recurrent blocks: every data-controlled factor from the module and its captured input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import causal_conv
from .operator import GriffinFactors


def _block_diagonal(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[B, L, E]``: per head ``x_h @ W_h + b_h`` (the module's ``baddbmm`` over heads)."""
    heads, width, _ = weight.shape
    out = torch.einsum("blhi,hij->blhj", x.unflatten(-1, (heads, width)), weight) + bias
    return out.flatten(-2)


def _position_ids(kwargs: dict, batch: int, length: int, device) -> torch.Tensor:
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=device)[None]
    return position_ids.to(device).expand(batch, length)


def griffin_factors(block: nn.Module, hidden: torch.Tensor, kwargs: dict, dtype: torch.dtype) -> GriffinFactors:
    """Recompute every factor of ``block`` (``RecurrentGemmaRecurrentBlock``) for ``hidden [B, L, H]``."""
    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h = hidden.detach().to(dtype)
    batch, length, _ = h.shape
    gate = block.act_fn(F.linear(h, p(block.linear_y.weight), p(block.linear_y.bias)))
    x = F.linear(h, p(block.linear_x.weight), p(block.linear_x.bias))
    conv_weight, conv_bias = p(block.conv_1d.weight)[:, 0, :], p(block.conv_1d.bias)
    conv_out = causal_conv(x, conv_weight, conv_bias)

    lru = block.rg_lru
    input_gate = torch.sigmoid(_block_diagonal(conv_out, p(lru.input_gate_weight), p(lru.input_gate_bias)))
    recurrent_gate = torch.sigmoid(_block_diagonal(conv_out, p(lru.recurrent_gate_weight), p(lru.recurrent_gate_bias)))
    log_a = -8.0 * recurrent_gate * F.softplus(p(lru.recurrent_param))
    reset = _position_ids(kwargs, batch, length, h.device) == 0
    multiplier = torch.sqrt(1 - torch.exp(2 * log_a))          # the module's a_square = exp(2 log a)
    multiplier = torch.where(reset[..., None], torch.ones_like(multiplier), multiplier)
    return GriffinFactors(x=x, conv_out=conv_out, gate=gate, input_gate=input_gate, log_a=log_a,
                          multiplier=multiplier, reset=reset, conv_weight=conv_weight, conv_bias=conv_bias,
                          mask=torch.ones(batch, length, dtype=dtype, device=h.device))
