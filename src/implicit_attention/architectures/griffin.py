"""Griffin / RecurrentGemma (HF ``RecurrentGemmaRecurrentBlock`` and ``RecurrentGemmaAttention``).

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

**Local attention** (``RecurrentGemmaAttention``) is ordinary softmax attention: per channel ``c``
of head ``h(c)``, ``A_c = P_h`` (the head's attention probabilities) and the values are the value
states of ``c``'s key/value head (GQA heads repeated), exactly as the module multiplies them; the
output is the input of ``o_proj``. The probabilities are the module's own when it returns them
(eager attention); otherwise they are recomputed from ``q``, ``k`` (rotary embeddings of the
captured ``position_ids``), the scaling and the mask the module received (boolean: rows with no
allowed key give zeros, as SDPA does; additive: added to the scores; none: causal, as SDPA's
``is_causal``). Attention layers accept every recurrent variant name and stay exact under all of
them, so that a whole RecurrentGemma model decomposes with any variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerDecomposition
from .mamba.operator import conv_right, segment_sums
from .registry import Architecture, CapturedLayer, register
from .tiled import DiagonalDecomposition, DiagonalOperator

#: The formulations offered for the recurrent block; ``unified`` is the exact default.
VARIANTS: tuple[str, ...] = ("unified", "rglru", "no_conv", "no_gate")
EXACT_VARIANTS: frozenset[str] = frozenset({"unified", "no_conv"})


# ----------------------------------------------------------------------------------- recurrent block
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
    conv = block.conv_1d
    width = conv.weight.shape[-1]
    conv_weight, conv_bias = p(conv.weight)[:, 0, :], p(conv.bias)
    conv_out = F.conv1d(x.transpose(1, 2), conv_weight[:, None, :], conv_bias, padding=width - 1,
                        groups=conv_weight.shape[0])[..., :length].transpose(1, 2)

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
    """``variant``'s matrices as a :class:`~.tiled.DiagonalOperator` (decays ``a``, columns ``m i``,
    rows ``y``, the conv taps, the resets), for the factorised channel aggregates."""
    # a reset at the first token crosses nothing: only later ones (packed documents) need the masks
    reset = f.reset if bool(f.reset[:, 1:].any()) else None
    return DiagonalOperator(log_decay=f.log_a, col=f.column_scale,
                            row=f.gate if variant in ("unified", "no_conv") else None,
                            taps=f.conv_weight if variant in ("unified", "no_gate") else None,
                            reset=reset)


def values_for(f: GriffinFactors, variant: str) -> torch.Tensor:
    """``[B, L, E]`` the value stream that ``variant``'s matrices multiply."""
    return f.conv_out if variant in ("rglru", "no_conv") else f.x


class GriffinLayerDecomposition(DiagonalDecomposition):
    """A Griffin recurrent block as per-channel implicit attention over its width ``E``.

    The signed channel mean (and single rows) come from hierarchical tiles (:mod:`.tiled`), never
    from per-channel blocks; ``rglru``'s ``alpha >= 0`` makes its ``abs`` and ``pos`` maps the mean.
    """

    block_temporaries = 5

    def __init__(self, factors: GriffinFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=values_for(factors, variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return griffin_block(self.factors, channels, self.variant)

    def diagonal_operator(self) -> DiagonalOperator:
        return griffin_operator(self.factors, self.variant)

    @property
    def nonnegative(self) -> bool:
        return self.variant == "rglru"          # decays, m = sqrt(1 - a^2) and sigmoid(.) are >= 0

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # out = y * (alpha c): the gate that "rglru" and "no_gate" leave out multiplies the gradient.
        return grad * self.factors.gate if self.variant in ("rglru", "no_gate") else grad


def _build_recurrent(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int):
    factors = griffin_factors(captured.module, captured.inputs, captured.kwargs, dtype)
    return GriffinLayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                     output=captured.output.detach().to(dtype))


# ------------------------------------------------------------------------------------ local attention
@dataclass
class AttentionFactors:
    """One softmax-attention layer: probabilities per head and values per channel.

    Attributes:
        probs: ``[B, nh, L, L]`` attention probabilities (rows of padding queries may be zero).
        values: ``[B, L, C]`` value states repeated to query heads, ``C = nh * head_dim``.
        head_dim: channels per head (channel ``c`` belongs to head ``c // head_dim``).
        mask: ``[B, L]`` 1 where a token may attend to itself (real tokens), 0 for padding.
    """

    probs: torch.Tensor
    values: torch.Tensor
    head_dim: int
    mask: torch.Tensor


def _attention_mask_parts(mask, batch: int, length: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The mask as the module used it (``[B, 1|nh, L, L]`` or ``None``) and the ``[B, L]`` padding mask."""
    if mask is None:
        return None, torch.ones(batch, length, device=device)
    mask = mask[..., :length, :length].to(device)
    diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    real = diagonal if mask.dtype == torch.bool else diagonal == 0
    return mask, real.expand(batch, length)


def attention_factors(attn: nn.Module, hidden: torch.Tensor, kwargs: dict, module_output,
                      dtype: torch.dtype) -> AttentionFactors:
    """Probabilities and values of ``attn`` (``RecurrentGemmaAttention``) for ``hidden [B, L, H]``."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import apply_rotary_pos_emb, repeat_kv

    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h = hidden.detach().to(dtype)
    batch, length, _ = h.shape
    head_dim, groups = attn.head_dim, attn.num_key_value_groups
    split = lambda t: t.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # noqa: E731  [B, heads, L, hd]
    value = repeat_kv(split(F.linear(h, p(attn.v_proj.weight), p(attn.v_proj.bias))), groups)
    mask, real = _attention_mask_parts(kwargs.get("attention_mask"), batch, length, h.device)

    weights = module_output[1] if isinstance(module_output, (tuple, list)) and len(module_output) > 1 else None
    if isinstance(weights, torch.Tensor):
        probs = weights.to(dtype)                       # eager attention returned its own probabilities
    else:
        query = split(F.linear(h, p(attn.q_proj.weight), p(attn.q_proj.bias)))
        key = split(F.linear(h, p(attn.k_proj.weight), p(attn.k_proj.bias)))
        position_ids = _position_ids(kwargs, batch, length, h.device)
        # the rotary tables as the module builds them: float32 angles, cast to the model's dtype
        probe = hidden.detach()[..., :1]
        cos, sin = attn.rotary_emb(probe, position_ids)
        query, key = apply_rotary_pos_emb(query, key, cos.to(dtype), sin.to(dtype))
        scores = query @ repeat_kv(key, groups).transpose(-2, -1) * attn.scaling
        if mask is None:
            causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        elif mask.dtype == torch.bool:
            # SDPA returns zeros for a query with no allowed key (padding rows)
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        else:
            probs = torch.softmax(scores + mask.to(dtype), dim=-1)
    return AttentionFactors(probs=probs, values=value.transpose(1, 2).flatten(-2), head_dim=head_dim,
                            mask=real.to(dtype))


class AttentionLayerDecomposition(LayerDecomposition):
    """A softmax attention layer: channel ``c`` carries its head's probabilities (exact)."""

    block_temporaries = 2

    def __init__(self, factors: AttentionFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=True, values=factors.values,
                         offset=torch.zeros_like(factors.values), mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        heads = torch.arange(channels.start, channels.stop, device=self.device) // self.factors.head_dim
        return self.factors.probs.index_select(1, heads), None

    def aggregate(self, how="mean", channel=None):
        # every head covers head_dim channels: the channel mean is the head mean (no [C, L, L] tensor)
        if channel is not None or how not in ("mean", "abs", "pos"):
            return super().aggregate(how, channel)
        if how not in self._aggregates:
            P = self.factors.probs.to(self.dtype)
            part = P if how == "mean" else P.abs() if how == "abs" else P.clamp(min=0)
            self._aggregates[how] = part.mean(dim=1)
        return self._aggregates[how]

    def aggregate_rows(self, rows, how="mean"):
        # the per-head aggregate is a few [L, L] maps: read the rows off it
        rows = torch.as_tensor(rows, device=self.device).long().reshape(-1)
        if ((rows < -self.length) | (rows >= self.length)).any():
            raise IndexError(f"rows {rows.tolist()} out of range for {self.length} tokens")
        return self.aggregate(how)[:, rows % self.length]


def _build_attention(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int):
    factors = attention_factors(captured.module, captured.inputs, captured.kwargs, captured.module_output, dtype)
    return AttentionLayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                       output=captured.output.detach().to(dtype))


register(Architecture(
    name="griffin",
    module_classes=("transformers.models.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRecurrentBlock",),
    model_classes=("RecurrentGemmaForCausalLM", "RecurrentGemmaModel"),
    variants=VARIANTS,
    output_module="linear_out",
    build=_build_recurrent,
    channels=lambda block: block.lru_width,
))

register(Architecture(
    name="griffin_attention",
    module_classes=("transformers.models.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaAttention",),
    model_classes=(),
    variants=VARIANTS,
    output_module="o_proj",
    build=_build_attention,
    channels=lambda attn: attn.num_attention_heads * attn.head_dim,
))
