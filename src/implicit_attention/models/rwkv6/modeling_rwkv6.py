"""RWKV-6 ("Finch", Peng et al. 2024, "Eagle and Finch", arXiv 2404.05892), compact and faithful.

Glossary: ``B`` batch, ``T`` tokens, ``C`` model width (= time-mixing width), ``H`` heads, ``N`` head
size (key dim = value dim = ``N``), ``F`` channel-mixing width, ``c`` tokens in a chunk.

Time mixing (``Rwkv6TimeMix``, the reference code's ``RWKV_Tmix_x060``), for a token ``t``::

    dx_t   = x_{t-1} - x_t                                    (token shift, x_{-1} = 0)
    m_*    = tanh((x_t + dx_t mu_x) W1) W2_*                  (LoRA of the data-dependent lerp)
    x*_t   = x_t + dx_t (mu_* + m_*)        for * in w, k, v, r, g   ("ddlerp")
    r, k, v = W_r xr, W_k xk, W_v xv;  g = silu(W_g xg)
    w_t    = exp(-exp(d_0 + tanh(xw D1) D2))                  (per-channel, data-dependent decay)
    per head:  o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),   S_t = diag(w_t) S_{t-1} + k_t^T v_t
    out    = W_o (groupnorm_per_head(o) * g)

``S_t`` is ``[N (key), N (value)]`` per head, ``u`` the per-channel bonus (``time_faaaa``).
Channel mixing (``RWKV_CMix_x060``): ``sigmoid(W_r xr) * W_v relu(W_k xk)^2`` with a static token
shift. Blocks are pre-norm (``ln1``/``ln2``; block 0 also normalises the embeddings, ``ln0``).

The wkv runs chunked (:func:`wkv6_chunked`): inside a chunk the pairwise decay
``prod_{s=j+1..i-1} w_s`` is ``exp`` of a directly summed segment of log-decays (never a ratio of
cumulative products, which under/overflows), across chunks the ``[N, N]`` state is carried.
:func:`wkv6_recurrent` is the slow token-by-token reference.

Padding: with an ``attention_mask`` (left padding) the input of every token-mixing step is zeroed
on padding tokens, so they feed nothing into the token shift or the state (linear layers have no
bias) and the real tokens see exactly what they see without padding.

Simplifications against the reference: no inference-time state cache (every call runs the whole
sequence), no ``head_size_divisor`` pre-scaling of ``r`` (it only rescales the group norm's eps,
which is a config field here), plain normal init for the linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from .._scaffold import (
    RwkvBlock,
    RwkvLayerInit,
    RwkvLMHead,
    RwkvMixing,
    RwkvReferenceInit,
    RwkvStack,
    RwkvTimeMix,
    init_low_rank,
    init_to,
    strict_segsum,
    token_shift,
    zero_padding,
)
from .configuration_rwkv6 import Rwkv6Config


def wkv6_chunked(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor,
                 chunk_size: int = 32) -> torch.Tensor:
    """The RWKV-6 wkv, chunked: ``[B, T, H, N]`` inputs -> ``o [B, T, H, N]``.

    Args:
        r, k, v: receptance, key, value ``[B, T, H, N]``.
        log_w: ``log w_t = -exp(...)`` (``<= 0``) ``[B, T, H, N]``, per key channel.
        u: bonus ``[H, N]``.
    """
    batch, length, heads, size = r.shape
    r, k, v, log_w = (t.transpose(1, 2) for t in (r, k, v, log_w))           # [B, H, T, N]
    state = r.new_zeros(batch, heads, size, v.shape[-1])                      # [B, H, N(key), N(value)]
    outputs = []
    for start in range(0, length, chunk_size):
        rc, kc, vc = (t[:, :, start:start + chunk_size] for t in (r, k, v))
        lw = log_w[:, :, start:start + chunk_size].transpose(-1, -2)          # [B, H, N, c]
        decay = torch.exp(strict_segsum(lw))                                  # [B, H, N, c, c] prod_{j<s<i} w_s
        attn = torch.einsum("bhik,bhkij,bhjk->bhij", rc, decay, kc)
        attn = attn + torch.diag_embed((rc * u[:, None] * kc).sum(-1))        # bonus on the diagonal
        # decay from the chunk start to i-1 (exclusive cumsum), from j+1 to the chunk end (reverse)
        to_row = torch.exp(F.pad(lw.cumsum(-1)[..., :-1], (1, 0))).transpose(-1, -2)
        to_end = torch.exp(F.pad(lw.flip(-1).cumsum(-1)[..., :-1], (1, 0)).flip(-1)).transpose(-1, -2)
        outputs.append(attn @ vc + (rc * to_row) @ state)
        state = torch.exp(lw.sum(-1))[..., None] * state + (kc * to_end).transpose(-1, -2) @ vc
    return torch.cat(outputs, dim=2).transpose(1, 2)


def wkv6_recurrent(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor,
                   u: torch.Tensor) -> torch.Tensor:
    """The slow reference: the paper's recurrence one token at a time (same arguments as :func:`wkv6_chunked`)."""
    batch, length, heads, size = r.shape
    state = r.new_zeros(batch, heads, size, v.shape[-1])
    out = torch.empty_like(v)
    for t in range(length):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]                        # k_t^T v_t  [B, H, N, N]
        out[:, t] = (r[:, t, :, :, None] * (state + u[None, :, :, None] * kv)).sum(-2)
        state = torch.exp(log_w[:, t])[..., None] * state + kv
    return out


class Rwkv6TimeMix(RwkvTimeMix):
    """RWKV-6 time mixing (token mixing): ddlerp token shift, data-dependent decay, multi-head wkv."""

    linear_names = ("receptance", "key", "value", "gate", "output")
    wkv_chunked, wkv_recurrent = staticmethod(wkv6_chunked), staticmethod(wkv6_recurrent)

    def __init__(self, config: Rwkv6Config, layer_id: int):
        super().__init__(config, layer_id)
        C, H, N = self.hidden_size, self.num_heads, self.head_size
        self.time_maa_x = nn.Parameter(torch.empty(C))
        self.time_maa_w = nn.Parameter(torch.empty(C))
        self.time_maa_k = nn.Parameter(torch.empty(C))
        self.time_maa_v = nn.Parameter(torch.empty(C))
        self.time_maa_r = nn.Parameter(torch.empty(C))
        self.time_maa_g = nn.Parameter(torch.empty(C))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * config.time_mix_extra_dim))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, config.time_mix_extra_dim, C))
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, config.time_decay_extra_dim))
        self.time_decay_w2 = nn.Parameter(torch.empty(config.time_decay_extra_dim, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, C] -> [B, T, C]``; ``attention_mask [B, T]`` zeroes padding tokens' input."""
        x = zero_padding(hidden_states, attention_mask)
        batch, length, C = x.shape
        dx = token_shift(x) - x
        lora = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1).view(batch, length, 5, -1)
        mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", lora, self.time_maa_w2).unbind(0)
        xw = x + dx * (self.time_maa_w + mw)
        xk = x + dx * (self.time_maa_k + mk)
        xv = x + dx * (self.time_maa_v + mv)
        xr = x + dx * (self.time_maa_r + mr)
        xg = x + dx * (self.time_maa_g + mg)
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        log_w = -torch.exp(self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2)
        return self.output(self._normed_wkv((r, k, v, log_w), x.dtype, self.time_faaaa) * g)

    def reference_init(self, ramps: RwkvLayerInit) -> None:
        ratio_0_to_1, ratio_1_to_0, ddd, n = ramps
        for p in (self.time_maa_x, self.time_maa_w, self.time_maa_k):
            init_to(p, 1.0 - ddd ** ratio_1_to_0)
        init_to(self.time_maa_v, 1.0 - (ddd ** ratio_1_to_0 + 0.3 * ratio_0_to_1))
        init_to(self.time_maa_r, 1.0 - ddd ** (0.5 * ratio_1_to_0))
        init_to(self.time_maa_g, 1.0 - ddd ** (0.5 * ratio_1_to_0))
        init_to(self.time_decay, -6 + 5 * n ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = ((torch.arange(self.hidden_size) + 1) % 3 - 1).to(torch.float64) * 0.1
        init_to(self.time_faaaa, (ratio_0_to_1 * (1 - n) + zigzag).view(self.num_heads, self.head_size))
        init_low_rank(self, ("time_maa_w1", "time_maa_w2"), ("time_decay_w1", "time_decay_w2"))


class Rwkv6ChannelMix(RwkvMixing):
    """RWKV-6 channel mixing: ``sigmoid(W_r xr) * W_v relu(W_k xk)^2`` with a static token shift."""

    def __init__(self, config: Rwkv6Config, layer_id: int):
        super().__init__(config, layer_id)
        C, Fw = config.hidden_size, config.intermediate_size
        self.time_maa_k = nn.Parameter(torch.empty(C))
        self.time_maa_r = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, Fw, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fw, C, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = zero_padding(hidden_states, attention_mask)
        dx = token_shift(x) - x
        k = torch.relu(self.key(x + dx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + dx * self.time_maa_r)) * self.value(k)

    def reference_init(self, ramps: RwkvLayerInit) -> None:
        init_to(self.time_maa_k, 1.0 - ramps.ddd ** ramps.ratio_1_to_0)
        init_to(self.time_maa_r, 1.0 - ramps.ddd ** ramps.ratio_1_to_0)


class Rwkv6Block(RwkvBlock):
    """Pre-norm block: ``x + TimeMix(ln1 x)``, then ``x + ChannelMix(ln2 x)`` (block 0: ``ln0`` first)."""

    time_mix_class, channel_mix_class = Rwkv6TimeMix, Rwkv6ChannelMix

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self._block_input(hidden_states)
        hidden_states = hidden_states + self.attention(self.ln1(hidden_states), attention_mask=attention_mask)
        return hidden_states + self.feed_forward(self.ln2(hidden_states), attention_mask=attention_mask)


class Rwkv6PreTrainedModel(RwkvReferenceInit, PreTrainedModel):
    config_class = Rwkv6Config


class Rwkv6Model(RwkvStack, Rwkv6PreTrainedModel):
    """Embeddings, RWKV-6 blocks and the final layer norm: ``input_ids [B, T] -> [B, T, C]``."""

    block_class = Rwkv6Block


class Rwkv6ForCausalLM(RwkvLMHead, Rwkv6PreTrainedModel, GenerationMixin):
    """:class:`Rwkv6Model` with a linear LM head: ``logits [B, T, V]``."""

    _tied_weights_keys = {"head.weight": "rwkv.embeddings.weight"}
    model_class = Rwkv6Model


__all__ = ["Rwkv6ChannelMix", "Rwkv6Block", "Rwkv6ForCausalLM", "Rwkv6Model", "Rwkv6PreTrainedModel",
           "Rwkv6TimeMix", "wkv6_chunked", "wkv6_recurrent"]
