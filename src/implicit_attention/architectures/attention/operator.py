"""Softmax self-attention as an operator: masks, probabilities and the factors one call needs.

Glossary: ``B`` batch, ``H`` query heads, ``G`` key/value heads (``H / G`` queries share one
key/value head: GQA), ``D`` head width, ``C = H * D`` the concatenated heads, ``L`` tokens.

Per head ``h``: ``P_h = softmax(scale * q_h k_h^T + M)`` with ``M`` the additive form of the mask the
module received (``0`` / ``-inf`` for boolean masks, as is for float masks; causal, within the
module's sliding window if it has one, when there is no mask and the module is causal; a row with
no visible key is zero, as in PyTorch's SDPA); ``out[:, h*D:(h+1)*D] = P_h v_h``. A gated attention
(Qwen3-Next, LFM3, Bailing) multiplies the output by a data-controlled gate ``g [B, L, H * D]``
before its projection: ``out_c = g_c ⊙ (P_h v_c)``, the row scale ``diag(g_c) P_h`` of channel ``c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, L, n * D]`` -> ``[B, n, L, D]``."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def additive_mask(mask: torch.Tensor | None, causal: bool, length: int, dtype: torch.dtype,
                  device: torch.device, window: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``M`` ``[B|1, H|1, L, L]`` added to the scores, and a boolean "row sees nothing" map (or ``None``).

    Boolean masks (``True`` = attend) become ``0 / -inf``; float masks are additive already
    (eager adds them as they are, e.g. ``finfo.min`` on padding). Without a mask a causal call sees
    the tokens ``j <= i``, and only ``i - j < window`` for a local (sliding-window) attention.
    """
    if mask is None:
        if not causal:
            return None, None
        visible = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if window is not None:
            visible = visible.triu(-(window - 1))
        return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~visible, -math.inf), None
    mask = mask.to(device)[..., -length:, -length:]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, -math.inf)
        return bias, ~mask.any(dim=-1)
    return mask.to(dtype), None


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                            empty_rows: torch.Tensor | None) -> torch.Tensor:
    """``P [B, H, L, L] = softmax(scale * q k^T + bias)``; rows in ``empty_rows`` are 0 (SDPA's rule)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    if empty_rows is not None:
        probs = probs.masked_fill(empty_rows[..., None], 0.0)
    return probs


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, G, L, D]`` -> ``[B, G * groups, L, D]``: each key/value head serves ``groups`` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@dataclass
class AttentionFactors:
    """What one call of an attention module needs to rebuild its probabilities on demand.

    Attributes:
        q: ``[B, H, L, D]`` queries (rotary embeddings applied).
        k: ``[B, G, L, D]`` keys, one per key/value head (``H / G`` query heads share one).
        values: ``[B, L, H * D]`` values, key/value heads repeated to the query heads.
        scale: the score scale (``module.scaling``).
        mask: the mask the module received (``[B|1, 1|H, L, L]``, boolean or additive) or ``None``.
        causal: whether a missing mask means causal attention.
        token_mask: ``[B, L]`` 1 for real tokens.
        window: the sliding window of a local attention (``None``: global).
        gate: ``[B, L, H * D]`` an output gate applied before the output projection (``None``: none), the
            row scale of each channel: ``matrix_c = diag(gate_c) P_{h(c)}`` (Qwen3-Next's ``sigmoid`` of
            half of ``q_proj``, one per channel; LFM3's and Bailing's ``sigmoid(g_proj(h))``, one per head).
    """

    q: torch.Tensor
    k: torch.Tensor
    values: torch.Tensor
    scale: float
    mask: torch.Tensor | None
    causal: bool
    token_mask: torch.Tensor
    window: int | None = None
    gate: torch.Tensor | None = None

    def bias(self, length: int, dtype: torch.dtype, device: torch.device):
        """:func:`additive_mask` of this call."""
        return additive_mask(self.mask, self.causal, length, dtype, device, self.window)


def token_mask(bias: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """``[B, L]`` 1 for real tokens: a real token always sees itself, padding (masked as a key) never does."""
    if bias is None:
        return torch.ones(batch, length, dtype=dtype, device=device)
    visible = torch.isfinite(bias) & (bias > torch.finfo(bias.dtype).min / 2)
    diagonal = visible.diagonal(dim1=-2, dim2=-1)                          # [..., L]
    while diagonal.dim() > 2:
        diagonal = diagonal[:, 0]
    return diagonal.reshape(-1, length).expand(batch, length).to(dtype)
