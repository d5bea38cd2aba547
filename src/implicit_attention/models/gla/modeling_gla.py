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
from transformers import initialization as init

from .._scaffold import BlockStackModel, CausalLMHead, GatedMLP, PreNormBlock, RMSNorm
from .configuration_gla import GLAConfig


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The recurrence runs in at least float32 (half-precision models upcast)."""
    return torch.promote_types(dtype, torch.float32)


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


class GLAHeadNorm(nn.Module):
    """GroupNorm with one group per head (a LayerNorm over each head's ``V`` values), affine."""

    def __init__(self, num_heads: int, width: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, L, H, V] -> [B, L, H * V]``."""
        centred = y - y.mean(-1, keepdim=True)
        normed = (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(2)
        return normed * self.weight.to(y.dtype) + self.bias.to(y.dtype)


class GLAAttention(nn.Module):
    """Gated linear attention (the token mixer). ``forward`` is the chunkwise parallel form;
    ``recurrent_forward`` the paper's token-by-token recurrence (slow reference)."""

    def __init__(self, config: GLAConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.key_dim = int(config.expand_k * config.hidden_size)
        self.value_dim = int(config.expand_v * config.hidden_size)
        self.head_k = self.key_dim // self.num_heads
        self.head_v = self.value_dim // self.num_heads
        self.gate_logit_normalizer = config.gate_logit_normalizer
        self.chunk_size = config.chunk_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.key_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.key_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.value_dim, bias=bias)
        self.g_proj = nn.Linear(config.hidden_size, self.value_dim, bias=bias)
        self.gk_proj = nn.Sequential(nn.Linear(config.hidden_size, config.gate_low_rank_dim, bias=False),
                                     nn.Linear(config.gate_low_rank_dim, self.key_dim, bias=True))
        self.group_norm = GLAHeadNorm(self.num_heads, self.value_dim, config.group_norm_eps)
        self.o_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)
        #: route ``forward`` to :meth:`recurrent_forward` (tests compare the two).
        self.use_recurrent_reference = False

    def _project(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
        """``q, k [B, L, H, K]``, ``v [B, L, H, V]``, ``g [B, L, H V]``, gate logits ``[B, L, H, K]``."""
        batch, length, _ = hidden_states.shape
        dtype = compute_dtype(hidden_states.dtype)
        heads = (batch, length, self.num_heads, -1)
        q = self.q_proj(hidden_states).to(dtype).view(heads) * self.head_k ** -0.5
        k = self.k_proj(hidden_states).to(dtype).view(heads)
        v = self.v_proj(hidden_states).to(dtype).view(heads)
        g = self.g_proj(hidden_states).to(dtype)
        gate_logits = self.gk_proj(hidden_states).to(dtype).view(heads)
        if attention_mask is not None:  # padding tokens write nothing into the state
            k = k * attention_mask.to(dtype)[:, :, None, None]
        return q, k, v, g, gate_logits

    def _output(self, y: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.o_proj((F.silu(g) * self.group_norm(y)).to(dtype))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``[B, L, D] -> [B, L, D]`` by the chunkwise parallel form."""
        if self.use_recurrent_reference:
            return self.recurrent_forward(hidden_states, attention_mask)
        q, k, v, g, gate_logits = self._project(hidden_states, attention_mask)
        log_alpha = F.logsigmoid(gate_logits) / self.gate_logit_normalizer
        y = chunked_gla(q, k, v, log_alpha, self.chunk_size)
        return self._output(y, g, hidden_states.dtype)

    def recurrent_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The paper's ``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t``, one token at a time."""
        q, k, v, g, gate_logits = self._project(hidden_states, attention_mask)
        alpha = torch.sigmoid(gate_logits) ** (1 / self.gate_logit_normalizer)
        batch, length = q.shape[:2]
        state = q.new_zeros(batch, self.num_heads, self.head_k, self.head_v)
        ys = []
        for t in range(length):
            state = alpha[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
            ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
        return self._output(torch.stack(ys, dim=1), g, hidden_states.dtype)


class GLAMLP(GatedMLP):
    """GLU: ``W_down (silu(W_gate x) ⊙ W_up x)``."""


class GLABlock(PreNormBlock):
    """Pre-norm block: ``x + GLA(norm(x))``, then ``x + MLP(norm(x))``."""

    norm_class, mixer_class, mlp_class = GLARMSNorm, GLAAttention, GLAMLP


class GLAPreTrainedModel(PreTrainedModel):
    config_class = GLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["GLABlock"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GLAHeadNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class GLAModel(BlockStackModel, GLAPreTrainedModel):
    block_class = GLABlock

    def _final_norm(self, config: GLAConfig) -> nn.Module:
        return GLARMSNorm(config.hidden_size, config.rms_norm_eps)


class GLAForCausalLM(CausalLMHead, GLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    model_class = GLAModel


__all__ = ["GLAForCausalLM", "GLAModel", "GLAPreTrainedModel", "GLAAttention"]
