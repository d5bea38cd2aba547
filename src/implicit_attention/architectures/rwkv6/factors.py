"""Reading RWKV-6 time mixing (``Rwkv6TimeMix``): every data-controlled factor from the module and its
captured input, and the hook that records the recurrence's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import masked_input
from ..registry import CapturedLayer
from .operator import Rwkv6Factors


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """``[B, L, C]``: ``x_{t-1}``, zero at ``t = 0``."""
    return F.pad(x, (0, 0, 1, -1))


def rwkv6_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> Rwkv6Factors:
    """Recompute every factor of ``module`` (an ``Rwkv6TimeMix``) for its input ``[B, L, C]``."""
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    x, mask = masked_input(hidden_states, attention_mask, dtype)
    batch, length, C = x.shape
    dx = token_shift(x) - x
    lora = torch.tanh((x + dx * p(module.time_maa_x)) @ p(module.time_maa_w1)).view(batch, length, 5, -1)
    mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", lora, p(module.time_maa_w2)).unbind(0)
    xw = x + dx * (p(module.time_maa_w) + mw)
    xk = x + dx * (p(module.time_maa_k) + mk)
    xv = x + dx * (p(module.time_maa_v) + mv)
    xr = x + dx * (p(module.time_maa_r) + mr)
    xg = x + dx * (p(module.time_maa_g) + mg)
    heads = (batch, length, module.num_heads, module.head_size)
    r = F.linear(xr, p(module.receptance.weight)).view(heads)
    k = F.linear(xk, p(module.key.weight)).view(heads)
    v = F.linear(xv, p(module.value.weight)).view(heads)
    gate = F.silu(F.linear(xg, p(module.gate.weight)))
    log_w = -torch.exp(p(module.time_decay) + torch.tanh(xw @ p(module.time_decay_w1)) @ p(module.time_decay_w2))
    return Rwkv6Factors(r=r, k=k, v=v, log_w=log_w.view(heads), u=p(module.time_faaaa), gate=gate,
                        gn_weight=p(module.ln_x.weight), gn_bias=p(module.ln_x.bias), gn_eps=module.ln_x.eps,
                        mask=mask)


def record_wkv(module: nn.Module, record: CapturedLayer):
    """Hook recording the recurrence's output (the input of the group norm ``ln_x``) as ``extra["wkv"]``."""
    def hook(_, args):
        record.extra["wkv"] = args[0].detach()
    return [module.ln_x.register_forward_pre_hook(hook)]
