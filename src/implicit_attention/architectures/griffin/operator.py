"""Griffin / RecurrentGemma recurrent blocks (HF ``RecurrentGemmaRecurrentBlock``): the math.

Glossary: ``B`` batch, ``L`` tokens, ``E`` the recurrent width (``lru_width``, channels of the
recurrent operator), ``K`` conv width, ``nh`` heads (the RG-LRU gates are block-diagonal over
them), ``c`` a block of channels; for the local attention ``C = nh * head_dim``.

**Recurrent block** (``transformers.models.recurrent_gemma.modeling_recurrent_gemma``, no cache)::

    y = act(linear_y(h))                      gate (GeLU-tanh), [B, L, E]
    x = linear_x(h)                           the values, [B, L, E]
    c = M x + b                               causal depthwise conv, M[i, j] = w[K-1-(i-j)]
    i_t = sigmoid(c_t W_i + b_i),  r_t = sigmoid(c_t W_a + b_a)        (block-diagonal over heads)
    log a_t = -8 r_t softplus(Lambda),  m_t = sqrt(1 - a_t^2)
    reset_t = (position_ids_t == 0):  a_t = 0 and m_t = 1 there
    s_t = a_t s_{t-1} + m_t i_t c_t,   out_t = s_t * y_t              (out: the input of linear_out)

so per channel ``alpha[t, j] = (prod_{s=j+1..t} a_s) m_j i_j`` (``j <= t``) and

    unified:  A = diag(y) alpha M,     offset = diag(y) alpha (b 1)

The multiplier ``m`` is part of the model and is kept (a published implementation sets ``m = 1``,
which changes the operator). Resets come from the ``position_ids`` the block receives (RecurrentGemma
passes ``arange(L)``, so only the first token resets; packed documents reset at every 0). The block
ignores the attention mask: padding tokens are read like any other, and the matrices mirror that
(the layer's ``mask`` is all ones). The products of ``a`` are ``exp`` of segment sums of
``log a`` (zeroed across a reset), never a ``[c, L, L, N]`` tensor. The module runs its scan in
float32 whatever its dtype, which bounds float64 reconstructions at about 1e-7.

Variants: ``unified`` (exact); ``no_conv`` (exact, ``diag(y) alpha`` on the conv output ``c``, the
conv bias inside the values); ``rglru`` (``alpha`` alone on ``c``: the RG-LRU recurrence without
gate and conv; not exact); ``no_gate`` (``alpha M`` on ``x`` with offset ``alpha b``: drops the
output gate; not exact). Ablations carry the left-out gate in :meth:`matrix_gradient`.

**Local attention** (``RecurrentGemmaAttention``) is ordinary softmax attention within a sliding
window; it is decomposed by :mod:`..attention` (``q, k`` rotated by the module's own rotary
embedding of the call's ``position_ids``, the mask the module received). Attention layers accept
every recurrent variant name and stay exact under all of them, so that a whole RecurrentGemma model
decomposes with any variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..primitives import conv_right, segment_sums
from ..tiled import DiagonalOperator

#: The formulations offered for the recurrent block; ``unified`` is the exact default.
VARIANTS: tuple[str, ...] = ("unified", "rglru", "no_conv", "no_gate")
EXACT_VARIANTS: frozenset[str] = frozenset({"unified", "no_conv"})


@dataclass
class GriffinFactors:
    """Every data-controlled quantity of one recurrent block for one input, in the compute dtype.

    Attributes:
        x: ``[B, L, E]`` ``linear_x(h)``, the conv input and the values of the unified operator.
        conv_out: ``[B, L, E]`` ``c = M x + b``, the RG-LRU input.
        gate: ``[B, L, E]`` ``y = act(linear_y(h))``, the output gate.
        input_gate: ``[B, L, E]`` ``i``.
        log_a: ``[B, L, E]`` ``log a = -8 r softplus(Lambda)`` (finite; resets are separate).
        multiplier: ``[B, L, E]`` ``m = sqrt(1 - a^2)``, 1 where the state resets.
        reset: ``[B, L]`` bool, ``position_ids == 0``.
        conv_weight: ``[E, K]`` (``w[K-1]`` multiplies the current token); conv_bias: ``[E]`` or ``None``.
        mask: ``[B, L]`` all ones (the block reads every token).
    """

    x: torch.Tensor
    conv_out: torch.Tensor
    gate: torch.Tensor
    input_gate: torch.Tensor
    log_a: torch.Tensor
    multiplier: torch.Tensor
    reset: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    mask: torch.Tensor

    @property
    def column_scale(self) -> torch.Tensor:
        """``[B, L, E]`` ``m_j i_j``, what each token's input is scaled by before it enters the state."""
        return self.multiplier * self.input_gate

    def values(self, variant: str) -> torch.Tensor:
        """``[B, L, E]`` the value stream that ``variant``'s matrices multiply."""
        return self.conv_out if variant in ("rglru", "no_conv") else self.x


def rglru_matrices(log_a: torch.Tensor, column: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """``[B, c, L, L]`` ``alpha[t, j] = (prod_{s=j+1..t} a_s) column_j``, zero across a reset.

    Args:
        log_a: ``[B, L, c]``; column: ``[B, L, c]`` (``m i``); reset: ``[B, L]`` bool.
    """
    length = log_a.shape[1]
    decay = torch.exp(segment_sums(log_a.transpose(1, 2)))                    # [B, c, L, L]
    resets = reset.to(torch.long).cumsum(dim=1)                              # resets up to and at t
    crossed = resets[:, :, None] != resets[:, None, :]                       # a reset in (j, t]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_a.device).tril()
    keep = (causal & ~crossed)[:, None]                                      # [B, 1, L, L]
    return decay.mul_(column.transpose(1, 2)[:, :, None, :]).masked_fill_(~keep, 0)


def griffin_block(f: GriffinFactors, channels: slice, variant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    alpha = rglru_matrices(f.log_a[..., channels], f.column_scale[..., channels], f.reset)
    if variant == "rglru":
        return alpha, None
    offset = None
    if variant != "no_conv":
        if f.conv_bias is not None:
            offset = alpha.sum(dim=-1) * f.conv_bias[channels][None, :, None]   # [B, c, L]
        alpha = conv_right(alpha, f.conv_weight[channels])
    if variant != "no_gate":
        row = f.gate[..., channels].transpose(1, 2)                              # [B, c, L]
        alpha.mul_(row[..., None])
        if offset is not None:
            offset = offset * row
    return alpha, None if offset is None else offset.transpose(1, 2)


def griffin_operator(f: GriffinFactors, variant: str) -> DiagonalOperator:
    """``variant``'s matrices as a :class:`~..tiled.DiagonalOperator` (decays ``a``, columns ``m i``,
    rows ``y``, the conv taps, the resets), for the factorised channel aggregates."""
    # a reset at the first token crosses nothing: only later ones (packed documents) need the masks
    reset = f.reset if bool(f.reset[:, 1:].any()) else None
    return DiagonalOperator(log_decay=f.log_a, col=f.column_scale,
                            row=f.gate if variant in ("unified", "no_conv") else None,
                            taps=f.conv_weight if variant in ("unified", "no_gate") else None,
                            reset=reset)
