"""Reading short-conv layers (``Lfm2ShortConv``, ``Lfm3ShortConv``) from the module and its captured input.

Mirrors the module's forward without a cache: ``h * mask`` (``apply_mask_to_padding_states``),
``in_proj`` split in three chunks ``B~, C~, x`` (in that order), and the conv's taps and bias. The
conv itself is the operator's band (:mod:`.operator`); nothing else is data-controlled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import masked_input
from .operator import ShortConvFactors


def shortconv_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                      dtype: torch.dtype) -> ShortConvFactors:
    """Every data-controlled factor of a short-conv layer for its input ``hidden_states [B, L, E]``."""
    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h, mask = masked_input(hidden_states, attention_mask, dtype)
    b, c, x = F.linear(h, p(module.in_proj.weight), p(module.in_proj.bias)).chunk(3, dim=-1)
    weight = p(module.conv.weight)[:, 0, :]                                     # [E, K]
    return ShortConvFactors(x=x, b=b, c=c, weight=weight, bias=p(module.conv.bias), mask=mask)
