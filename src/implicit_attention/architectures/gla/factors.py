"""Reading GLA layers: every data-controlled factor from the module and its captured input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import head_norm_scale
from ..primitives import padding_mask
from .operator import GLAFactors


def gla_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                dtype: torch.dtype) -> GLAFactors:
    """Recompute every data-controlled factor of ``module`` for its input ``hidden_states [B, L, D]``."""
    from ...models.gla.modeling_gla import chunked_gla  # lazy: the model package registers Auto classes

    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h = hidden_states.detach().to(dtype)
    batch, length, _ = h.shape
    heads = (batch, length, module.num_heads, -1)
    mask = padding_mask(attention_mask, h)
    lin = lambda proj, x=h: F.linear(x, p(proj.weight), p(proj.bias))  # noqa: E731
    q = lin(module.q_proj).view(heads) * module.head_k ** -0.5
    k = lin(module.k_proj).view(heads) * mask[:, :, None, None]
    v = lin(module.v_proj).view(heads)
    low, up = module.gk_proj
    log_alpha = F.logsigmoid(lin(up, lin(low)).view(heads)) / module.gate_logit_normalizer
    y = chunked_gla(q, k, v, log_alpha, module.chunk_size)
    norm = module.group_norm
    return GLAFactors(v=v, gate=F.silu(lin(module.g_proj)), norm_scale=head_norm_scale(y, norm.eps),
                      norm_weight=p(norm.weight), norm_bias=p(norm.bias), mask=mask,
                      q=q, k=k, log_alpha=log_alpha)
