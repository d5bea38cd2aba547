"""GLA (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training").

Glossary: ``B`` batch, ``L`` tokens, ``D`` hidden size, ``H`` heads, ``K`` key dim per head
(``expand_k * D / H``), ``V`` value dim per head (``expand_v * D / H``), ``r`` gate rank.

Gated linear attention, per head with a data-dependent decay per key dim::

    q_t = W_Q x_t / sqrt(K),  k_t = W_K x_t,  v_t = W_V x_t                       (k = 0 on padding)
    alpha_t = sigmoid(W_a2 W_a1 x_t + b_a)^(1/tau)                                 ([K], low-rank gate)
    recurrent:  S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t           ([K, V] state)
    parallel:   o_i = sum_{j<=i} (sum_k q_i[k] k_j[k] prod_{s=j+1..i} alpha_s[k]) v_j
    output:     W_O (swish(W_r x_t + b_r) ⊙ GroupNorm_h(o_t))

``forward`` uses the chunkwise form of the paper (section 4): inside a chunk the decays are
re-referenced to the chunk start (all exponents ``<= 0``), across chunks the ``[K, V]`` state is
carried. Departure: the group norm is affine per channel (weight and bias), as a LayerNorm per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from .._scaffold import (
    BlockStackModel,
    CausalLMHead,
    GatedMLP,
    HeadGatedMixer,
    HeadGroupNorm,
    HeadNormInit,
    PreNormBlock,
    RMSNorm,
    compute_dtype,
)
from .configuration_gla import GLAConfig


def chunked_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
    """``[B, L, H, V]`` gated linear attention by chunks.

    Args:
        q, k, log_alpha: ``[B, L, H, K]``; v: ``[B, L, H, V]``; chunk_size: tokens per chunk.

    In a chunk with ``b_t`` the inclusive cumulative sum of ``log_alpha`` from the chunk start:
    ``o_t = (q_t ⊙ e^{b_t}) S + sum_{j<=t} (sum_k q_t[k] k_j[k] e^{b_t[k] - b_j[k]}) v_j`` and
    ``S <- diag(e^{b_last}) S + sum_j (k_j ⊙ e^{b_last - b_j})^T v_j``.
    """
    batch, length, heads, key_dim = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    outs = []
    for start in range(0, length, chunk_size):
        qc, kc, vc = (t[:, start:start + chunk_size] for t in (q, k, v))
        cum = log_alpha[:, start:start + chunk_size].cumsum(dim=1)               # [B, c, H, K]
        size = qc.shape[1]
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        diff = (cum[:, :, None] - cum[:, None]).masked_fill(~causal[None, :, :, None, None], float("-inf"))
        scores = torch.einsum("bthk,bjhk,btjhk->bhtj", qc, kc, diff.exp())     # [B, H, c, c]
        out = torch.einsum("bhtj,bjhv->bthv", scores, vc)
        out = out + torch.einsum("bthk,bhkv->bthv", qc * cum.exp(), state)
        last = cum[:, -1]                                                       # [B, H, K]
        state = last.exp()[..., None] * state + torch.einsum(
            "bjhk,bjhv->bhkv", kc * (last[:, None] - cum).exp(), vc)
        outs.append(out)
    return torch.cat(outs, dim=1)


class GLARMSNorm(RMSNorm):
    """The RMS norm of GLA (:class:`~implicit_attention.models._scaffold.RMSNorm`)."""


class GLAHeadNorm(HeadGroupNorm):
    """The per-head group norm of GLA (:class:`~implicit_attention.models._scaffold.HeadGroupNorm`)."""


class GLAAttention(HeadGatedMixer):
    """Gated linear attention (the token mixer). ``forward`` is the chunkwise parallel form;
    ``recurrent_forward`` the paper's token-by-token recurrence (slow reference)."""

    head_norm_class = GLAHeadNorm

    def __init__(self, config: GLAConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx, int(config.expand_k * config.hidden_size),
                         int(config.expand_v * config.hidden_size))
        self.gate_logit_normalizer = config.gate_logit_normalizer
        self.chunk_size = config.chunk_size

    def _build_extra(self, config: GLAConfig) -> None:
        """The low-rank forget-gate projection ``W_a2 W_a1 x + b_a``."""
        self.gk_proj = nn.Sequential(nn.Linear(config.hidden_size, config.gate_low_rank_dim, bias=False),
                                     nn.Linear(config.gate_low_rank_dim, self.key_dim, bias=True))

    def _project(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
        """``q`` (scaled), ``k`` (0 on padding), ``v``, ``g`` and the gate logits ``[B, L, H, K]``."""
        dtype = compute_dtype(hidden_states.dtype)
        heads = (*hidden_states.shape[:2], self.num_heads, -1)
        q = self.q_proj(hidden_states).to(dtype).view(heads) * self.head_k ** -0.5
        k = self.k_proj(hidden_states).to(dtype).view(heads)
        v = self.v_proj(hidden_states).to(dtype).view(heads)
        g = self.g_proj(hidden_states).to(dtype)
        gate_logits = self.gk_proj(hidden_states).to(dtype).view(heads)
        return q, self._mask_keys(k, attention_mask), v, g, gate_logits

    def _parallel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  gate_logits: torch.Tensor) -> torch.Tensor:
        """The chunkwise form, ``log alpha = logsigmoid(.) / tau``."""
        log_alpha = F.logsigmoid(gate_logits) / self.gate_logit_normalizer
        return chunked_gla(q, k, v, log_alpha, self.chunk_size)

    def _decay(self, q: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        """``[B, L, H, K]`` ``alpha = sigmoid(.)^(1/tau)``."""
        return torch.sigmoid(gate_logits) ** (1 / self.gate_logit_normalizer)


class GLABlock(PreNormBlock):
    """Pre-norm block: ``x + GLA(norm(x))``, then ``x + MLP(norm(x))``."""

    norm_class, mixer_class, mlp_class = GLARMSNorm, GLAAttention, GatedMLP


class GLAPreTrainedModel(HeadNormInit, PreTrainedModel):
    config_class = GLAConfig


class GLAModel(BlockStackModel, GLAPreTrainedModel):
    block_class = GLABlock


class GLAForCausalLM(CausalLMHead, GLAPreTrainedModel, GenerationMixin):
    model_class = GLAModel


__all__ = ["GLAForCausalLM", "GLAModel", "GLAPreTrainedModel", "GLAAttention"]
