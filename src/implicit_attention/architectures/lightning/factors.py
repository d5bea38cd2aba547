"""Reading ``MiniMaxLightningAttention`` layers: every data-controlled factor from the module and its input.

Mirrors the module's forward without a cache: ``act(qkv_proj(h))`` zeroed on padding
(``apply_mask_to_padding_states``), split per head into ``q, k, v``; the heads' outputs are
recomputed (:func:`~.operator.lightning_heads`) for the RMS norm's per-token scale, which the
module computes in float32; the output gate ``sigmoid(output_gate(h))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import padding_mask
from .operator import LightningFactors, lightning_heads


def lightning_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                      dtype: torch.dtype) -> LightningFactors:
    """Every data-controlled factor of ``module`` for its input ``hidden_states [B, L, E]``."""
    h = hidden_states.detach().to(dtype)
    batch, length, _ = h.shape
    heads, size = module.num_attention_heads, module.head_dim
    mask = padding_mask(attention_mask, h)
    qkv = module.act_fn(F.linear(h, module.qkv_proj.weight.detach().to(dtype))) * mask[..., None]
    q, k, v = qkv.view(batch, length, heads, 3 * size).split(size, dim=-1)
    slope = module.slope_rate.detach().reshape(heads).to(dtype)
    factors = LightningFactors(q=q, k=k, v=v, slope=slope, gate=torch.sigmoid(F.linear(
        h, module.output_gate.weight.detach().to(dtype))), norm_scale=None,
        norm_weight=module.norm.weight.detach().to(dtype), mask=mask)
    # one head at a time: a [B, L, L] matrix each, never [B, H, L, L]
    y = torch.cat([torch.einsum("bij,bjd->bid", lightning_heads(factors, slice(h, h + 1))[:, 0], v[:, :, h])
                   for h in range(heads)], dim=-1).float()
    factors.norm_scale = torch.rsqrt(y.pow(2).mean(-1) + module.norm.variance_epsilon).to(dtype)
    return factors
