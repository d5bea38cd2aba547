"""xLSTM's mLSTM layers (HF ``xLSTMLayer``, native torch kernels) as exact implicit attention: the math.

Glossary: ``B`` batch, ``L`` tokens, ``nh`` heads, ``d`` the query/key head width, ``C`` the value
width (``v_dim``, channels of the operator; channel ``c`` belongs to head ``c // (C / nh)``), ``c``
also a block of channels.

The layer (``transformers.models.xlstm.modeling_xlstm.xLSTMLayer``, without a state)::

    q, k, v, o~ = projections of x;  i~ = softcap(W_i x + b_i),  f~ = softcap(W_f x + b_f)   (per head)
    log f = logsigmoid(f~),   F[t, j] = sum_{s=j+1..t} log f_s,   G_t = sum_{s<=t} log f_s
    m_t = max(G_t, max_{j<=t} F[t, j] + i~_j)           (the stabiliser; the initial state has m = 0)
    S[t, j] = (q_t . k_j) / sqrt(d) * exp(F[t, j] + i~_j - m_t)                       (j <= t)
    n_t = sum_j S[t, j],   A[t, j] = S[t, j] / (max(|n_t|, exp(-m_t)) + eps)            (per head)
    h_t = sum_j A[t, j] v_j
    out = sigmoid(o~) * (w * LN_head(h) + b)           (out: the input of ``out_proj``)

``LN_head`` is the multi-head layer norm over each head's value channels:
``(h - mean_head h) * rsqrt(var_head h + eps_norm)``. The module computes ``h`` either with its
recurrent kernel (token by token, ``mode="inference"`` below ``chunk_size`` tokens) or its chunkwise
kernel (chunks of ``chunk_size``, ``mode="train"`` or long inputs); both evaluate the same stabiliser
``m_t`` and normaliser, which the closed form above reproduces.

**Unified operator (exact).** The head mean of ``h`` is the matrix applied to the head mean of
``v`` (``A`` is shared by a head's channels), so the centring moves onto the values; the norm's
per-token scale ``s_t = rsqrt(var_head h_t + eps_norm)`` and the output gate are data-controlled
row scales::

    A_c = diag(sigmoid(o~_c) * w_c * s_{head(c)}) A_{head(c)},   values  v_c - mean_head(v),
    offset_c = sigmoid(o~_c) * b_c

The values are ``v`` centred within each head: still a function of token ``j`` alone. The module
rounds its state, numerator and denominator to float32 (``inference_state_dtype``) and runs the
norm in float32 (``norm_reduction_force_float32``), which bounds float64 reconstructions at about
1e-7. ``xLSTMModel`` takes no attention mask (it ignores one): every token is read, and the
layer's ``mask`` is all ones.

Variants: ``unified`` (exact); ``no_gate`` (drops the output gate; not exact); ``mlstm`` (the cell
alone, ``A`` on the raw ``v``: ``h = A v`` before norm and gate; not exact). Their
:meth:`~XlstmLayerDecomposition.matrix_gradient` carries the left-out factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..primitives import segment_sums

#: The formulations offered; ``unified`` is the exact default.
VARIANTS: tuple[str, ...] = ("unified", "no_gate", "mlstm")
EXACT_VARIANTS: frozenset[str] = frozenset({"unified"})


@dataclass
class XlstmFactors:
    """Every data-controlled quantity of one mLSTM layer for one input, in the compute dtype.

    Attributes:
        attention: ``[B, nh, L, L]`` the normalised mLSTM matrix ``A`` of each head.
        value: ``[B, L, C]`` ``v``, the cell's values.
        centred: ``[B, L, C]`` ``v`` minus its head mean, the values of the unified operator.
        norm_scale: ``[B, L, C]`` ``w_c * s_t``, the layer norm's weight times its per-token scale.
        norm_bias: ``[C]`` or ``None``, the layer norm's bias.
        out_gate: ``[B, L, C]`` ``sigmoid(o~)``.
        heads: number of heads ``nh``.
        mask: ``[B, L]`` all ones (the model takes no attention mask).
    """

    attention: torch.Tensor
    value: torch.Tensor
    centred: torch.Tensor
    norm_scale: torch.Tensor
    norm_bias: torch.Tensor | None
    out_gate: torch.Tensor
    heads: int
    mask: torch.Tensor

    @property
    def head_width(self) -> int:
        return self.value.shape[-1] // self.heads

    def heads_of(self, channels: slice) -> torch.Tensor:
        """``[c]`` the head of each channel in ``channels``."""
        return torch.arange(channels.start, channels.stop, device=self.value.device) // self.head_width

    def head_mean(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, C]`` ``x`` averaged within each head, broadcast back to the head's channels."""
        grouped = x.unflatten(-1, (self.heads, -1))
        return grouped.mean(dim=-1, keepdim=True).expand_as(grouped).flatten(-2)

    def values(self, variant: str) -> torch.Tensor:
        """``[B, L, C]`` the value stream of ``variant``: ``v`` for ``mlstm``, else ``v`` centred per head."""
        return self.value if variant == "mlstm" else self.centred


def mlstm_matrices(q: torch.Tensor, k: torch.Tensor, igate: torch.Tensor, fgate: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """``[B, nh, L, L]`` the normalised mLSTM matrix ``A`` with the module's stabiliser and normaliser.

    Args:
        q, k: ``[B, nh, L, d]``; igate, fgate: ``[B, nh, L]`` pre-activations (after the soft cap).
    """
    length = q.shape[2]
    log_f = F.logsigmoid(fgate)
    decay = segment_sums(log_f)                                          # [B, nh, L, L] F[t, j]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    log_d = (decay + igate[..., None, :]).masked_fill(~causal, float("-inf"))
    # the state starts at m = 0 with an empty memory: G_t competes in the max
    stabiliser = torch.maximum(log_f.cumsum(dim=-1), log_d.amax(dim=-1))  # [B, nh, L]
    S = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 * torch.exp(log_d - stabiliser[..., None])
    denominator = torch.maximum(S.sum(dim=-1).abs(), torch.exp(-stabiliser)) + eps
    return S / denominator[..., None]


def row_scale(f: XlstmFactors, variant: str) -> torch.Tensor | None:
    """``[B, L, C]`` the per-channel row scale of ``variant``'s matrices (``None`` for ``mlstm``)."""
    if variant == "mlstm":
        return None
    return f.norm_scale * f.out_gate if variant == "unified" else f.norm_scale


def xlstm_block(f: XlstmFactors, channels: slice, variant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a channel block."""
    matrices = f.attention.index_select(1, f.heads_of(channels))
    if variant == "mlstm":
        return matrices, None
    scale = row_scale(f, variant)[..., channels]
    matrices = matrices * scale.transpose(1, 2)[..., None]
    offset = None
    if f.norm_bias is not None:
        offset = f.norm_bias[channels].expand_as(scale)
        if variant == "unified":
            offset = offset * f.out_gate[..., channels]
    return matrices, offset
