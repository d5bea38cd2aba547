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
from .configuration_retnet import RetNetConfig


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


class RetNetHeadNorm(HeadGroupNorm):
    """The per-head group norm of RetNet (:class:`~implicit_attention.models._scaffold.HeadGroupNorm`)."""


class RetNetRetention(HeadGatedMixer):
    """Multi-scale retention (the token mixer). ``forward`` is the parallel form; ``recurrent_forward``
    the paper's token-by-token recurrence (slow reference)."""

    head_norm_class = RetNetHeadNorm

    def __init__(self, config: RetNetConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx, config.hidden_size, int(config.value_factor * config.hidden_size))
        self.rotary_base = config.rotary_base

    def _project(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
        """Rotated ``q``, rotated and scaled ``k`` (0 on padding), ``v``, ``g``; no ``extra`` (``None``)."""
        dtype = compute_dtype(hidden_states.dtype)
        heads = (*hidden_states.shape[:2], self.num_heads, -1)
        q, k, v = (proj(hidden_states).to(dtype).view(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        g = self.g_proj(hidden_states).to(dtype)
        q = rotary(q, self.rotary_base)
        k = rotary(k, self.rotary_base) * self.head_k ** -0.5
        return q, self._mask_keys(k, attention_mask), v, g, None

    def _parallel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: None) -> torch.Tensor:
        """``(Q K^T ⊙ D) V``."""
        log_gamma = log_gammas(self.num_heads, q.dtype, q.device)
        return torch.einsum("bhnm,bmhv->bnhv", retention_matrices(q, k, log_gamma), v)

    def _decay(self, q: torch.Tensor, extra: None) -> torch.Tensor:
        """``[H, 1]`` ``gamma_h = 1 - 2^(-5-h)``, the same for every key row."""
        gamma = 1 - torch.pow(2.0, -5.0 - torch.arange(self.num_heads, dtype=q.dtype, device=q.device))
        return gamma[:, None]


class RetNetBlock(PreNormBlock):
    """Pre-norm block: ``x + MSR(norm(x))``, then ``x + MLP(norm(x))``."""

    norm_class, mixer_class, mlp_class = RetNetRMSNorm, RetNetRetention, GatedMLP


class RetNetPreTrainedModel(HeadNormInit, PreTrainedModel):
    config_class = RetNetConfig


class RetNetModel(BlockStackModel, RetNetPreTrainedModel):
    block_class = RetNetBlock


class RetNetForCausalLM(CausalLMHead, RetNetPreTrainedModel, GenerationMixin):
    model_class = RetNetModel


__all__ = ["RetNetForCausalLM", "RetNetModel", "RetNetPreTrainedModel", "RetNetRetention"]
