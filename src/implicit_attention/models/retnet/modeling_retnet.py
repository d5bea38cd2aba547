"""RetNet (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models").

Glossary: ``B`` batch, ``L`` tokens, ``D`` hidden size, ``H`` heads, ``K`` key dim per head
(``D / H``), ``V`` value dim per head (``value_factor * D / H``).

Multi-scale retention, per head ``h`` with the fixed decay ``gamma_h = 1 - 2^(-5-h)``::

    q_n = rot(W_Q x_n, n),  k_n = rot(W_K x_n, n) / sqrt(K),  v_n = W_V x_n       (rot: rotary / xPos)
    recurrent:  S_n = gamma_h S_{n-1} + k_n^T v_n,   y_n = q_n S_n                 ([K, V] state)
    parallel:   Y = (Q K^T ⊙ D) V,   D[n, m] = gamma_h^(n-m) for n >= m, else 0
    MSR(X) = W_O (swish(W_G X) ⊙ GroupNorm_h(Y))

Padding (left): the keys of masked tokens are zeroed, so they enter no state. Departures from the
paper: the retention-score normalisations of section 3.2 (``D / sqrt(rowsum D)``, ``/ max(|R 1|, 1)``)
are left out: they are numerical stabilisers that the scale-invariant group norm cancels up to its
epsilon; the rotation is plain rotary (no xPos length extrapolation scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init

from .._scaffold import BlockStackModel, CausalLMHead, GatedMLP, PreNormBlock, RMSNorm
from .configuration_retnet import RetNetConfig


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The recurrence runs in at least float32 (half-precision models upcast)."""
    return torch.promote_types(dtype, torch.float32)


def log_gammas(num_heads: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``[H]`` ``log(1 - 2^(-5-h))``: the per-head decays of multi-scale retention."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=dtype, device=device)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """``[B, L, H, K]`` rotate the pairs ``(x[:K/2], x[K/2:])`` of token ``n`` by ``n * base^(-2i/K)``.

    ``rot(q_n) . rot(k_m)`` depends on ``n - m`` only (the ``e^{i n theta}`` of the paper).
    """
    length, dim = x.shape[1], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=x.dtype, device=x.device) / dim)    # [K/2]
    angles = torch.arange(length, dtype=x.dtype, device=x.device)[:, None] * inv_freq       # [L, K/2]
    angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]
    return x * angles.cos() + rotate_half(x) * angles.sin()


def retention_matrices(q: torch.Tensor, k: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, L]`` ``A[n, m] = gamma_h^(n-m) (q_n . k_m)`` for ``m <= n``, 0 above the diagonal.

    Args:
        q, k: ``[B, L, H, K]`` rotated queries and scaled keys; log_gamma: ``[H]``.
    """
    length = q.shape[1]
    idx = torch.arange(length, device=q.device)
    distance = idx[:, None] - idx[None, :]                                                   # n - m
    decay = torch.exp(distance.clamp(min=0).to(q.dtype) * log_gamma[:, None, None])        # [H, L, L]
    decay = decay.masked_fill(distance < 0, 0)
    return torch.einsum("bnhk,bmhk->bhnm", q, k) * decay


class RetNetRMSNorm(RMSNorm):
    """The RMS norm of RetNet (:class:`~implicit_attention.models._scaffold.RMSNorm`)."""


class RetNetHeadNorm(nn.Module):
    """GroupNorm with one group per head (a LayerNorm over each head's ``V`` values), affine."""

    def __init__(self, num_heads: int, width: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def scale(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, L, H, 1]`` ``1 / sqrt(var_h + eps)`` of ``y [B, L, H, V]``."""
        centred = y - y.mean(-1, keepdim=True)
        return torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, L, H, V] -> [B, L, H * V]``."""
        normed = ((y - y.mean(-1, keepdim=True)) * self.scale(y)).flatten(2)
        return normed * self.weight.to(y.dtype) + self.bias.to(y.dtype)


class RetNetRetention(nn.Module):
    """Multi-scale retention (the token mixer). ``forward`` is the parallel form; ``recurrent_forward``
    the paper's token-by-token recurrence (slow reference)."""

    def __init__(self, config: RetNetConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.key_dim = config.hidden_size
        self.value_dim = int(config.value_factor * config.hidden_size)
        self.head_k = self.key_dim // self.num_heads
        self.head_v = self.value_dim // self.num_heads
        self.rotary_base = config.rotary_base
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.key_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.key_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.value_dim, bias=bias)
        self.g_proj = nn.Linear(config.hidden_size, self.value_dim, bias=bias)
        self.group_norm = RetNetHeadNorm(self.num_heads, self.value_dim, config.group_norm_eps)
        self.o_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)
        #: route ``forward`` to :meth:`recurrent_forward` (tests compare the two).
        self.use_recurrent_reference = False

    def _project(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
        batch, length, _ = hidden_states.shape
        dtype = compute_dtype(hidden_states.dtype)
        q = self.q_proj(hidden_states).to(dtype).view(batch, length, self.num_heads, self.head_k)
        k = self.k_proj(hidden_states).to(dtype).view(batch, length, self.num_heads, self.head_k)
        v = self.v_proj(hidden_states).to(dtype).view(batch, length, self.num_heads, self.head_v)
        g = self.g_proj(hidden_states).to(dtype)
        q = rotary(q, self.rotary_base)
        k = rotary(k, self.rotary_base) * self.head_k ** -0.5
        if attention_mask is not None:  # padding tokens write nothing into the state
            k = k * attention_mask.to(dtype)[:, :, None, None]
        return q, k, v, g

    def _output(self, y: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = F.silu(g) * self.group_norm(y)
        return self.o_proj(out.to(dtype))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``[B, L, D] -> [B, L, D]`` by the parallel form ``(Q K^T ⊙ D) V``."""
        if self.use_recurrent_reference:
            return self.recurrent_forward(hidden_states, attention_mask)
        q, k, v, g = self._project(hidden_states, attention_mask)
        log_gamma = log_gammas(self.num_heads, q.dtype, q.device)
        y = torch.einsum("bhnm,bmhv->bnhv", retention_matrices(q, k, log_gamma), v)
        return self._output(y, g, hidden_states.dtype)

    def recurrent_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The paper's recurrence ``S_n = gamma S_{n-1} + k_n^T v_n, y_n = q_n S_n``, one token at a time."""
        q, k, v, g = self._project(hidden_states, attention_mask)
        batch, length = q.shape[:2]
        gamma = 1 - torch.pow(2.0, -5.0 - torch.arange(self.num_heads, dtype=q.dtype, device=q.device))
        state = q.new_zeros(batch, self.num_heads, self.head_k, self.head_v)
        ys = []
        for n in range(length):
            state = gamma[:, None, None] * state + k[:, n, :, :, None] * v[:, n, :, None, :]
            ys.append(torch.einsum("bhk,bhkv->bhv", q[:, n], state))
        return self._output(torch.stack(ys, dim=1), g, hidden_states.dtype)


class RetNetMLP(GatedMLP):
    """GLU: ``W_down (silu(W_gate x) ⊙ W_up x)``."""


class RetNetBlock(PreNormBlock):
    """Pre-norm block: ``x + MSR(norm(x))``, then ``x + MLP(norm(x))``."""

    norm_class, mixer_class, mlp_class = RetNetRMSNorm, RetNetRetention, RetNetMLP


class RetNetPreTrainedModel(PreTrainedModel):
    config_class = RetNetConfig
    base_model_prefix = "model"
    _no_split_modules = ["RetNetBlock"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RetNetHeadNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class RetNetModel(BlockStackModel, RetNetPreTrainedModel):
    block_class = RetNetBlock

    def _final_norm(self, config: RetNetConfig) -> nn.Module:
        return RetNetRMSNorm(config.hidden_size, config.rms_norm_eps)


class RetNetForCausalLM(CausalLMHead, RetNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    model_class = RetNetModel


__all__ = ["RetNetForCausalLM", "RetNetModel", "RetNetPreTrainedModel", "RetNetRetention"]
