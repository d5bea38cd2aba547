"""Building blocks shared by several architectures' factors and operators.

Glossary: ``B`` batch, ``L`` tokens, ``E`` channels, ``K`` conv width, ``c`` a block of channels.

- reading a layer's input: :func:`padding_mask`, :func:`masked_input`, :func:`causal_conv`;
- operators: :func:`segment_sums` (decay exponents of scalar-decay recurrences) and
  :func:`conv_right` (a causal depthwise conv as a banded matrix on the right of ``T``);
- the slow references' :func:`naive_conv_matrix`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def no_in_proj_bias(module) -> bool:
    """Whether a Mamba-style mixer's ``in_proj`` has no (non-zero) bias: with one, the zeroed input
    of a padding token still projects to the bias, which the causal conv carries into real tokens."""
    bias = getattr(getattr(module, "in_proj", None), "bias", None)
    return bias is None or not bool(bias.detach().any())


def padding_mask(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` 1 for real tokens, 0 for padding, in the dtype and on the device of ``like [B, L, ...]``."""
    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=like.dtype, device=like.device)
    return attention_mask.detach().to(device=like.device, dtype=like.dtype)


def masked_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [B, L, H], mask [B, L])``: the layer input in ``dtype`` with padding tokens zeroed, as the
    mixers that mask their input see it, and the padding mask."""
    h = hidden_states.detach().to(dtype)
    mask = padding_mask(attention_mask, h)
    return h * mask[..., None], mask


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, E]`` the causal depthwise conv of ``x [B, L, E]`` with taps ``weight [E, K]`` (``w[K-1]``
    on the current token) and ``bias [E]``: ``c_i = sum_s w[K-1-s] x_{i-s} + b``."""
    length, width = x.shape[1], weight.shape[-1]
    out = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=width - 1, groups=weight.shape[0])
    return out[..., :length].transpose(1, 2)


def segment_sums(dt: torch.Tensor) -> torch.Tensor:
    """``[..., L] -> [..., L, L]``: ``out[i, j] = sum_{k=j+1..i} dt[k]`` for ``j <= i``, 0 above.

    Summing the masked copies directly (rather than differencing one cumulative sum) keeps the
    exponent accurate in float32 for long sequences.
    """
    length = dt.shape[-1]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=dt.device).tril(-1)
    rows = dt.unsqueeze(-1).expand(*dt.shape, length).masked_fill(~strictly_lower, 0)
    return rows.cumsum(dim=-2)


def conv_right(T: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[B, c, L, L]``: ``T @ M`` with ``M`` the causal depthwise conv of taps ``weight [c, K]``.

    ``(T M)[i, j] = sum_s w[K-1-s] T[i, j+s]``: K shifted, scaled copies of ``T``.
    """
    width = weight.shape[1]
    length = T.shape[-1]
    out = T * weight[None, :, width - 1, None, None]
    for shift in range(1, min(width, length)):
        out[..., :, : length - shift] += T[..., :, shift:] * weight[None, :, width - 1 - shift, None, None]
    return out


def naive_conv_matrix(conv_weight: torch.Tensor, channel: int, length: int) -> torch.Tensor:
    """``[L, L]`` the causal depthwise conv of one channel as a matrix, entry by entry (slow references):
    ``M[i, j] = w[K-1-(i-j)]`` for ``0 <= i-j < K``, with ``conv_weight [E, K]``."""
    width = conv_weight.shape[1]
    M = torch.zeros(length, length, dtype=conv_weight.dtype)
    for i in range(length):
        for j in range(length):
            if 0 <= i - j <= width - 1:
                M[i, j] = conv_weight[channel, width - 1 - (i - j)]
    return M


def to_batch(tensor: torch.Tensor, inputs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, ...]``: a layer tensor recorded for the real tokens only (``[1, T, ...]``, the batch unpadded
    into one sequence as ``flash-linear-attention`` runs it) put back in the batch layout of ``inputs [B, L, D]``,
    zero on padding; a tensor already in that layout is returned as it is."""
    batch, length = inputs.shape[:2]
    if tensor.shape[:2] == (batch, length):
        return tensor
    real = padding_mask(attention_mask, inputs).bool()
    if tensor.shape[0] != 1 or tensor.shape[1] != int(real.sum()):
        raise ValueError(f"a layer tensor of shape {tuple(tensor.shape)} fits neither the batch {batch} x {length} "
                         f"nor its {int(real.sum())} real tokens")
    out = tensor.new_zeros(batch, length, *tensor.shape[2:])
    out[real] = tensor[0]
    return out
