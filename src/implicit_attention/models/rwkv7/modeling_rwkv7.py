"""RWKV-7 ("Goose", Peng et al. 2025, arXiv 2503.14456), compact and faithful.

Glossary: ``B`` batch, ``T`` tokens, ``C`` model width (= time-mixing width), ``H`` heads, ``N`` head
size (key dim = value dim = ``N``), ``c`` tokens in a chunk.

Time mixing (``Rwkv7TimeMix``, the reference code's ``RWKV_Tmix_x070``), for a token ``t``::

    dx_t  = x_{t-1} - x_t;   x*_t = x_t + dx_t mu_*          for * in r, w, k, v, a, g
    r = W_r xr;  k0 = W_k xk;  v0 = W_v xv
    log w_t = -exp(-softplus(-(w_0 + tanh(xw W1) W2)) - 0.5)  (decay w_t in (exp(-e^-0.5), 1))
    v     = v0 (layer 0, which also returns v_first = v0), else
            v0 + (v_first - v0) sigmoid(v_0 + xv V1 V2)       (value residual)
    a_t   = sigmoid(a_0 + xa A1 A2)                            (in-context learning rate)
    g     = sigmoid(xg G1) G2                                  (output gate)
    kappa = normalize_per_head(k0 * k_k)                       (removal key)
    k     = k0 * (1 + (a - 1) * k_a)                           (replacement key)
    per head, S_t [N (value), N (key)]:
        S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t * kappa_t)) + v_t^T k_t,   o_t = S_t r_t
    out   = W_o ((groupnorm_per_head(o) + (sum_n r k r_k)_head v) * g)

That is the generalised delta rule with ``alpha = -kappa`` and ``beta = kappa * a``:
``S_t = S_{t-1} (diag(w_t) + alpha_t^T beta_t) + v_t^T k_t``. Channel mixing (``RWKV_CMix_x070``):
``W_v relu(W_k xk)^2``. Blocks are pre-norm (``ln1``/``ln2``; block 0 also normalises the
embeddings, ``ln0``); the value of layer 0 is passed to every later layer (``v_first``).

The wkv runs chunked in the WY / UT-transform form (:func:`wkv7_chunked`); derivation: with
``gamma_t = prod_{s<=t} w_s`` from the chunk start and ``z_t = S_{t-1} alpha_t``,

    S_t = S_0 diag(gamma_t) + sum_{s<=t} (z_s^T (beta_s gamma_t/gamma_s) + v_s^T (k_s gamma_t/gamma_s))
    z_t = S_0 (gamma_{t-1} alpha_t) + sum_{s<t} [z_s (beta_s gamma_{t-1}/gamma_s . alpha_t)
                                                + v_s (k_s gamma_{t-1}/gamma_s . alpha_t)]

so ``z`` solves a unit lower-triangular system per chunk and ``o_t = S_t r_t`` follows from it;
every ``gamma_t/gamma_s`` is ``exp`` of a directly summed segment of log-decays.
:func:`wkv7_recurrent` is the slow token-by-token reference (the reference code's naive loop).

Padding: with an ``attention_mask`` (left padding) the input of every token-mixing step is zeroed
on padding tokens: their ``k``, ``v`` and ``kappa`` are zero, so they add nothing to the state.

Simplifications against the reference: no inference-time state cache, plain normal init for the
linear layers (the reference uses orthogonal inits), ``ln_x`` initialised to ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init

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
    segsum,
    strict_segsum,
    token_shift,
    zero_padding,
)
from .configuration_rwkv7 import Rwkv7Config


def wkv7_chunked(r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
    """The RWKV-7 wkv in chunked WY form: ``[B, T, H, N]`` inputs -> ``o [B, T, H, N]``.

    ``S_t = S_{t-1} (diag(exp(log_w_t)) + a_t^T b_t) + v_t^T k_t``, ``o_t = S_t r_t`` (``a = -kappa``,
    ``b = kappa * a`` for RWKV-7).
    """
    batch, length, heads, size = r.shape
    r, log_w, k, v, a, b = (t.transpose(1, 2) for t in (r, log_w, k, v, a, b))  # [B, H, T, N]
    state = r.new_zeros(batch, heads, v.shape[-1], size)                       # [B, H, N(value), N(key)]
    outputs = []
    for start in range(0, length, chunk_size):
        rc, kc, vc, ac, bc = (t[:, :, start:start + chunk_size] for t in (r, k, v, a, b))
        lw = log_w[:, :, start:start + chunk_size].transpose(-1, -2)            # [B, H, N, c]
        incl = torch.exp(segsum(lw))                # [B, H, N, c, c] gamma_t / gamma_s, s <= t
        excl = torch.exp(strict_segsum(lw))         # gamma_{t-1} / gamma_s, s < t
        q_v = torch.einsum("bhtn,bhnts,bhsn->bhts", rc, incl, kc)
        q_z = torch.einsum("bhtn,bhnts,bhsn->bhts", rc, incl, bc)
        m_v = torch.einsum("bhtn,bhnts,bhsn->bhts", ac, excl, kc)
        m_z = torch.einsum("bhtn,bhnts,bhsn->bhts", ac, excl, bc)
        cum = lw.cumsum(-1)
        to_row = torch.exp(cum).transpose(-1, -2)                                  # gamma_t
        to_prev = torch.exp(F.pad(cum[..., :-1], (1, 0))).transpose(-1, -2)        # gamma_{t-1}
        to_end = torch.exp(F.pad(lw.flip(-1).cumsum(-1)[..., :-1], (1, 0)).flip(-1)).transpose(-1, -2)
        eye = torch.eye(rc.shape[2], dtype=r.dtype, device=r.device)
        rhs = (ac * to_prev) @ state.transpose(-1, -2) + m_v @ vc                  # [B, H, c, N(value)]
        z = torch.linalg.solve_triangular(eye - m_z, rhs, upper=False, unitriangular=True)
        outputs.append((rc * to_row) @ state.transpose(-1, -2) + q_z @ z + q_v @ vc)
        state = (state * torch.exp(lw.sum(-1))[..., None, :] + z.transpose(-1, -2) @ (bc * to_end)
                 + vc.transpose(-1, -2) @ (kc * to_end))
    return torch.cat(outputs, dim=2).transpose(1, 2)


def wkv7_recurrent(r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor) -> torch.Tensor:
    """The slow reference, one token at a time (same arguments as :func:`wkv7_chunked`)."""
    batch, length, heads, size = r.shape
    state = r.new_zeros(batch, heads, v.shape[-1], size)
    out = torch.empty_like(v)
    for t in range(length):
        sa = state @ a[:, t, :, :, None]                                          # S a^T  [B, H, N, 1]
        state = (state * torch.exp(log_w[:, t])[:, :, None, :] + sa * b[:, t, :, None, :]
                 + v[:, t, :, :, None] * k[:, t, :, None, :])
        out[:, t] = (state @ r[:, t, :, :, None])[..., 0]
    return out


class Rwkv7TimeMix(RwkvTimeMix):
    """RWKV-7 time mixing (token mixing): the generalised delta rule with value residual."""

    wkv_chunked, wkv_recurrent = staticmethod(wkv7_chunked), staticmethod(wkv7_recurrent)

    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__(config, layer_id)
        C, H, N = self.hidden_size, self.num_heads, self.head_size
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.empty(C)))
        self.w1 = nn.Parameter(torch.empty(C, config.decay_low_rank_dim))
        self.w2 = nn.Parameter(torch.empty(config.decay_low_rank_dim, C))
        self.a1 = nn.Parameter(torch.empty(C, config.a_low_rank_dim))
        self.a2 = nn.Parameter(torch.empty(config.a_low_rank_dim, C))
        if layer_id > 0:  # layer 0 defines v_first and has no value residual
            self.v0 = nn.Parameter(torch.empty(C))
            self.v1 = nn.Parameter(torch.empty(C, config.v_low_rank_dim))
            self.v2 = nn.Parameter(torch.empty(config.v_low_rank_dim, C))
        self.g1 = nn.Parameter(torch.empty(C, config.gate_low_rank_dim))
        self.g2 = nn.Parameter(torch.empty(config.gate_low_rank_dim, C))
        self.r_k = nn.Parameter(torch.empty(H, N))

    def forward(self, hidden_states: torch.Tensor, v_first: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, C] -> ([B, T, C], v_first [B, T, C])``; ``attention_mask [B, T]`` zeroes padding."""
        x = zero_padding(hidden_states, attention_mask)
        batch, length, C = x.shape
        heads = (batch, length, self.num_heads, self.head_size)
        dx = token_shift(x) - x
        xr, xw, xk, xv, xa, xg = (x + dx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5   # soft-clamped below -0.5
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(heads), dim=-1, p=2.0).view(batch, length, C)
        k = k * (1 + (a - 1) * self.k_a)
        log_w = -torch.exp(w)
        y = self._normed_wkv((r, log_w, k, v, -kk, kk * a), x.dtype)
        bonus = (r.view(heads) * k.view(heads) * self.r_k).sum(-1, keepdim=True) * v.view(heads)
        return self.output((y + bonus.view(batch, length, C)) * g), v_first

    def reference_init(self, ramps: RwkvLayerInit) -> None:
        ratio_0_to_1, ratio_1_to_0, ddd, n = ramps
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            init_to(getattr(self, name), 1.0 - ddd ** (power * ratio_1_to_0))
        init_to(self.w0, -7 + 5 * n ** (0.85 + ratio_0_to_1 ** 0.5) + 0.5)
        init.zeros_(self.a0)
        init.constant_(self.k_k, 0.85)
        init.ones_(self.k_a)
        init.zeros_(self.r_k)
        init_low_rank(self, ("w1", "w2"), ("a1", "a2"), ("g1", "g2"), ("v1", "v2"))
        if hasattr(self, "v0"):
            init.ones_(self.v0)


class Rwkv7ChannelMix(RwkvMixing):
    """RWKV-7 channel mixing: ``W_v relu(W_k xk)^2`` with a static token shift."""

    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__(config, layer_id)
        self.x_k = nn.Parameter(torch.empty(config.hidden_size))
        self.key = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = zero_padding(hidden_states, attention_mask)
        k = torch.relu(self.key(x + (token_shift(x) - x) * self.x_k)) ** 2
        return self.value(k)

    def reference_init(self, ramps: RwkvLayerInit) -> None:
        init_to(self.x_k, 1.0 - ramps.ddd ** (ramps.ratio_1_to_0 ** 4))


class Rwkv7Block(RwkvBlock):
    """Pre-norm block: ``x + TimeMix(ln1 x, v_first)``, then ``x + ChannelMix(ln2 x)`` (block 0: ``ln0`` first)."""

    time_mix_class, channel_mix_class = Rwkv7TimeMix, Rwkv7ChannelMix

    def forward(self, hidden_states: torch.Tensor, v_first: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = self._block_input(hidden_states)
        mixed, v_first = self.attention(self.ln1(hidden_states), v_first=v_first, attention_mask=attention_mask)
        hidden_states = hidden_states + mixed
        return hidden_states + self.feed_forward(self.ln2(hidden_states), attention_mask=attention_mask), v_first


class Rwkv7PreTrainedModel(RwkvReferenceInit, PreTrainedModel):
    config_class = Rwkv7Config


class Rwkv7Model(RwkvStack, Rwkv7PreTrainedModel):
    """Embeddings, RWKV-7 blocks and the final layer norm: ``input_ids [B, T] -> [B, T, C]``."""

    block_class = Rwkv7Block

    def _run_block(self, index: int, block: nn.Module, hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None, v_first: torch.Tensor | None):
        """The carry is ``v_first``: ``None`` into block 0, which returns its values."""
        return block(hidden_states, v_first=v_first, attention_mask=attention_mask)


class Rwkv7ForCausalLM(RwkvLMHead, Rwkv7PreTrainedModel, GenerationMixin):
    """:class:`Rwkv7Model` with a linear LM head: ``logits [B, T, V]``."""

    _tied_weights_keys = {"head.weight": "rwkv.embeddings.weight"}
    model_class = Rwkv7Model


__all__ = ["Rwkv7Block", "Rwkv7ChannelMix", "Rwkv7ForCausalLM", "Rwkv7Model", "Rwkv7PreTrainedModel",
           "Rwkv7TimeMix", "wkv7_chunked", "wkv7_recurrent"]
