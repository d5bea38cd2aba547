"""Reading RWKV-4 time mixing (``RwkvSelfAttention``): every data-controlled factor from the module and its
captured input (the token shifts, keys rounded through float32 as the module reads them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .operator import RwkvFactors


def rwkv_factors(layer: nn.Module, hidden: torch.Tensor, dtype: torch.dtype) -> RwkvFactors:
    """Recompute the factors of ``layer`` (``RwkvSelfAttention``) for its input ``hidden [B, L, H]``."""
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    h = hidden.detach().to(dtype)
    shifted = F.pad(h, (0, 0, 1, -1))                       # h_{t-1}, zero before the first token
    mixed = {}
    for name in ("key", "value", "receptance"):
        mu = p(getattr(layer, f"time_mix_{name}"))
        mixed[name] = F.linear(h * mu + shifted * (1 - mu), p(getattr(layer, name).weight))
    batch, length, _ = h.shape
    mu_v, w_v = p(layer.time_mix_value), p(layer.value.weight)
    return RwkvFactors(
        key=mixed["key"].float().to(dtype),                 # the module's ``key.float()``
        value=mixed["value"],
        value_now=F.linear(h * mu_v, w_v),
        value_prev=F.linear(h * (1 - mu_v), w_v),
        receptance=torch.sigmoid(mixed["receptance"]),
        decay=-torch.exp(p(layer.time_decay)),
        first=p(layer.time_first),
        mask=torch.ones(batch, length, dtype=dtype, device=h.device),
    )
