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

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init

from .._scaffold import BlockStackModel, CausalLMHead, WithoutStateCache
from .configuration_rwkv6 import Rwkv6Config


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]``: ``x_{t-1}``, zero at ``t = 0``."""
    return F.pad(x, (0, 0, 1, -1))


def segsum(x: torch.Tensor) -> torch.Tensor:
    """``[..., T] -> [..., T, T]``: ``out[i, j] = sum_{s=j+1..i} x[s]`` for ``j <= i``, ``-inf`` above.

    The segments are summed directly (masked cumulative sums), so ``exp(out)`` is accurate even
    where the cumulative sum of ``x`` is huge.
    """
    length = x.shape[-1]
    lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    rows = x.unsqueeze(-1).expand(*x.shape, length).masked_fill(~lower, 0).cumsum(dim=-2)
    return rows.masked_fill(~torch.ones_like(lower).tril(), -math.inf)


def strict_segsum(x: torch.Tensor) -> torch.Tensor:
    """``[..., T] -> [..., T, T]``: ``out[i, j] = sum_{s=j+1..i-1} x[s]`` for ``j < i``, ``-inf`` elsewhere."""
    return F.pad(segsum(x)[..., :-1, :], (0, 0, 1, 0), value=-math.inf)


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


class Rwkv6TimeMix(nn.Module):
    """RWKV-6 time mixing (token mixing): ddlerp token shift, data-dependent decay, multi-head wkv."""

    def __init__(self, config: Rwkv6Config, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.num_heads, self.head_size, self.hidden_size = H, N, C
        self.chunk_size = config.chunk_size
        self.wkv_mode = config.wkv_mode
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
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=config.group_norm_epsilon)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, C] -> [B, T, C]``; ``attention_mask [B, T]`` zeroes padding tokens' input."""
        x = hidden_states
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
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

        heads = (batch, length, self.num_heads, self.head_size)
        compute = torch.promote_types(x.dtype, torch.float32)  # half precision: run the wkv in float32
        args = [t.view(heads).to(compute) for t in (r, k, v, log_w)] + [self.time_faaaa.to(compute)]
        if self.wkv_mode == "recurrent":
            y = wkv6_recurrent(*args)
        else:
            y = wkv6_chunked(*args, chunk_size=self.chunk_size)
        y = self.ln_x(y.reshape(batch * length, C).to(x.dtype)).view(batch, length, C)
        return self.output(y * g)


class Rwkv6ChannelMix(nn.Module):
    """RWKV-6 channel mixing: ``sigmoid(W_r xr) * W_v relu(W_k xk)^2`` with a static token shift."""

    def __init__(self, config: Rwkv6Config, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        C, Fw = config.hidden_size, config.intermediate_size
        self.time_maa_k = nn.Parameter(torch.empty(C))
        self.time_maa_r = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, Fw, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fw, C, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        dx = token_shift(x) - x
        k = torch.relu(self.key(x + dx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + dx * self.time_maa_r)) * self.value(k)


class Rwkv6Block(nn.Module):
    """Pre-norm block: ``x + TimeMix(ln1 x)``, then ``x + ChannelMix(ln2 x)`` (block 0: ``ln0`` first)."""

    def __init__(self, config: Rwkv6Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        eps = config.layer_norm_epsilon
        if layer_id == 0:
            self.pre_ln = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = Rwkv6TimeMix(config, layer_id)
        self.feed_forward = Rwkv6ChannelMix(config, layer_id)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer_id == 0:
            hidden_states = self.pre_ln(hidden_states)
        hidden_states = hidden_states + self.attention(self.ln1(hidden_states), attention_mask=attention_mask)
        return hidden_states + self.feed_forward(self.ln2(hidden_states), attention_mask=attention_mask)


class Rwkv6PreTrainedModel(PreTrainedModel):
    config_class = Rwkv6Config
    base_model_prefix = "rwkv"
    _no_split_modules = ["Rwkv6Block"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module):
        """The reference's layer-dependent init of the mixing parameters; normal init elsewhere."""
        super()._init_weights(module)
        if isinstance(module, (Rwkv6TimeMix, Rwkv6ChannelMix)):
            layers, C = module.config.num_hidden_layers, module.config.hidden_size
            ratio_0_to_1 = module.layer_id / max(layers - 1, 1)
            ratio_1_to_0 = 1.0 - module.layer_id / layers
            ddd = torch.arange(C, dtype=torch.float64) / C
            like = lambda t, p: init.copy_(p, t.to(p.dtype))  # noqa: E731
            if isinstance(module, Rwkv6ChannelMix):
                like(1.0 - ddd ** ratio_1_to_0, module.time_maa_k)
                like(1.0 - ddd ** ratio_1_to_0, module.time_maa_r)
                return
            for p in (module.time_maa_x, module.time_maa_w, module.time_maa_k):
                like(1.0 - ddd ** ratio_1_to_0, p)
            like(1.0 - (ddd ** ratio_1_to_0 + 0.3 * ratio_0_to_1), module.time_maa_v)
            like(1.0 - ddd ** (0.5 * ratio_1_to_0), module.time_maa_r)
            like(1.0 - ddd ** (0.5 * ratio_1_to_0), module.time_maa_g)
            n = torch.arange(C, dtype=torch.float64) / max(C - 1, 1)
            like(-6 + 5 * n ** (0.7 + 1.3 * ratio_0_to_1), module.time_decay)
            zigzag = ((torch.arange(C) + 1) % 3 - 1).to(torch.float64) * 0.1
            like((ratio_0_to_1 * (1 - n) + zigzag).view(module.num_heads, module.head_size), module.time_faaaa)
            init.zeros_(module.time_maa_w1)
            init.uniform_(module.time_maa_w2, -0.01, 0.01)
            init.zeros_(module.time_decay_w1)
            init.uniform_(module.time_decay_w2, -0.01, 0.01)


class Rwkv6Model(BlockStackModel, Rwkv6PreTrainedModel):
    """Embeddings, RWKV-6 blocks and the final layer norm: ``input_ids [B, T] -> [B, T, C]``."""

    block_class = Rwkv6Block
    embed_attr, layers_attr, norm_attr = "embeddings", "blocks", "ln_out"

    def _final_norm(self, config: Rwkv6Config) -> nn.Module:
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class Rwkv6ForCausalLM(WithoutStateCache, CausalLMHead, Rwkv6PreTrainedModel, GenerationMixin):
    """:class:`Rwkv6Model` with a linear LM head: ``logits [B, T, V]``."""

    _tied_weights_keys = {"head.weight": "rwkv.embeddings.weight"}
    model_class = Rwkv6Model
    head_attr = "head"
    loss_in_float32 = False  # float64 logits keep a float64 loss


__all__ = ["Rwkv6ChannelMix", "Rwkv6Block", "Rwkv6ForCausalLM", "Rwkv6Model", "Rwkv6PreTrainedModel",
           "Rwkv6TimeMix", "wkv6_chunked", "wkv6_recurrent"]
