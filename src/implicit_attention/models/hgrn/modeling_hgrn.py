"""HGRN (Qin et al. 2023, "Hierarchically Gated Recurrent Neural Network for Sequence Modeling").

Glossary: ``B`` batch, ``L`` tokens, ``D`` hidden size, ``E`` recurrence width
(``expand_ratio * D``), ``K`` short conv width, ``l`` the layer index.

The token mixer (HGRU, real-valued as in the authors' later releases), per channel::

    x_t = W_i h_t + b_i                   (0 on padding)
    c_t = sum_{s=0..K-1} w[K-1-s] x_{t-s} + b_conv      (optional short causal conv: the token-mixing input)
    i_t = silu(c_t)                       (0 on padding)
    f_t = lb_l + (1 - lb_l) sigmoid(W_f h_t + b_f)       (forget gate, lower bound lb_l per layer)
    h_t = f_t h_{t-1} + (1 - f_t) i_t
    g_t = sigmoid(W_g h_t + b_g)          (output gate)
    o_t = W_o RMSNorm(g_t ⊙ h_t)

The lower bounds rise with depth: ``P = softmax(Gamma, dim=layers)``, ``lb_l = sum_{m<=l} P_m - P_0``
(0 for the first layer), a model-level parameter passed to each layer.

Departure from the paper: the output norm is an RMS norm (no mean subtraction), so that every
channel stays its own recurrence (a mean over channels would mix them); the recurrence is real-valued
(no ``e^{i theta}`` rotation), as in the authors' HGRN code and flash-linear-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init

from .._scaffold import BlockStackModel, CausalLMHead, DecoderPreTrained, GatedMLP, PreNormBlock, RMSNorm, compute_dtype
from .configuration_hgrn import HGRNConfig


def chunked_scan(log_f: torch.Tensor, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, L, E]`` ``h_t = exp(log_f_t) h_{t-1} + x_t`` (``h_{-1} = 0``), chunk by chunk.

    Inside a chunk ``h_t = exp(b_t) h_prev + sum_{j<=t} exp(b_t - b_j) x_j`` with ``b`` the inclusive
    cumulative sum of ``log_f`` in the chunk: every exponent is ``<= 0``, nothing overflows.
    """
    batch, length, width = x.shape
    state = x.new_zeros(batch, width)
    outs = []
    for start in range(0, length, chunk_size):
        lf, xc = log_f[:, start:start + chunk_size], x[:, start:start + chunk_size]
        size = xc.shape[1]
        cum = lf.cumsum(dim=1)                                                  # [B, c, E]
        causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril()
        diff = (cum[:, :, None] - cum[:, None]).masked_fill(~causal[None, :, :, None], float("-inf"))
        h = torch.einsum("btje,bje->bte", diff.exp(), xc) + cum.exp() * state[:, None]
        state = h[:, -1]
        outs.append(h)
    return torch.cat(outs, dim=1)


class HGRNRMSNorm(RMSNorm):
    """The RMS norm of HGRN (:class:`~implicit_attention.models._scaffold.RMSNorm`)."""


class HGRNRecurrence(nn.Module):
    """The HGRU token mixer. ``forward`` is the chunked parallel scan; ``recurrent_forward`` the
    paper's token-by-token recurrence (slow reference)."""

    def __init__(self, config: HGRNConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.expand_dim = int(config.expand_ratio * config.hidden_size)
        self.chunk_size = config.chunk_size
        bias = config.attention_bias
        self.i_proj = nn.Linear(config.hidden_size, self.expand_dim, bias=bias)
        self.f_proj = nn.Linear(config.hidden_size, self.expand_dim, bias=bias)
        self.g_proj = nn.Linear(config.hidden_size, self.expand_dim, bias=bias)
        self.conv1d = nn.Conv1d(self.expand_dim, self.expand_dim, config.conv_size, groups=self.expand_dim,
                                padding=config.conv_size - 1, bias=config.conv_bias) if config.use_short_conv else None
        self.g_norm = HGRNRMSNorm(self.expand_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(self.expand_dim, config.hidden_size, bias=False)
        #: route ``forward`` to :meth:`recurrent_forward` (tests compare the two).
        self.use_recurrent_reference = False

    def _gates(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
               lower_bound: torch.Tensor | None):
        """``i`` (recurrence input), ``f``, ``1 - f`` and ``g``, each ``[B, L, E]`` in the compute dtype."""
        length = hidden_states.shape[1]
        dtype = compute_dtype(hidden_states.dtype)
        mask = None if attention_mask is None else attention_mask.to(dtype)[..., None]
        x = self.i_proj(hidden_states).to(dtype)
        if mask is not None:  # padding tokens enter neither the conv nor the recurrence
            x = x * mask
        if self.conv1d is not None:
            weight = self.conv1d.weight.to(dtype)
            bias = None if self.conv1d.bias is None else self.conv1d.bias.to(dtype)
            x = F.conv1d(x.transpose(1, 2), weight, bias, padding=weight.shape[-1] - 1,
                         groups=self.expand_dim)[..., :length].transpose(1, 2)
        i = F.silu(x)
        if mask is not None:
            i = i * mask
        z = self.f_proj(hidden_states).to(dtype)
        lb = 0.0 if lower_bound is None else lower_bound.to(dtype)
        f = lb + (1 - lb) * torch.sigmoid(z)
        one_minus_f = (1 - lb) * torch.sigmoid(-z)   # = 1 - f without the cancellation near f = 1
        g = torch.sigmoid(self.g_proj(hidden_states).to(dtype))
        return i, f, one_minus_f, g

    def _output(self, h: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.o_proj(self.g_norm(g * h).to(dtype))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lower_bound: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; ``lower_bound [E]`` is this layer's forget-gate floor."""
        if self.use_recurrent_reference:
            return self.recurrent_forward(hidden_states, attention_mask, lower_bound)
        i, f, one_minus_f, g = self._gates(hidden_states, attention_mask, lower_bound)
        h = chunked_scan(torch.log(f), one_minus_f * i, self.chunk_size)
        return self._output(h, g, hidden_states.dtype)

    def recurrent_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          lower_bound: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's ``h_t = f_t h_{t-1} + (1 - f_t) i_t``, one token at a time."""
        i, f, _, g = self._gates(hidden_states, attention_mask, lower_bound)
        h = torch.zeros_like(i[:, 0])
        hs = []
        for t in range(i.shape[1]):
            h = f[:, t] * h + (1 - f[:, t]) * i[:, t]
            hs.append(h)
        return self._output(torch.stack(hs, dim=1), g, hidden_states.dtype)


class HGRNBlock(PreNormBlock):
    """Pre-norm block: ``x + HGRU(norm(x))``, then ``x + MLP(norm(x))``."""

    norm_class, mixer_class, mlp_class = HGRNRMSNorm, HGRNRecurrence, GatedMLP

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lower_bound: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(hidden_states, attention_mask, lower_bound=lower_bound)


class HGRNPreTrainedModel(DecoderPreTrained, PreTrainedModel):
    config_class = HGRNConfig

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, HGRNModel) and module.lower_bounds is not None:
            init.zeros_(module.lower_bounds)


class HGRNModel(BlockStackModel, HGRNPreTrainedModel):
    block_class = HGRNBlock

    def _build_extra(self, config: HGRNConfig) -> None:
        width = int(config.expand_ratio * config.hidden_size)
        self.lower_bounds = nn.Parameter(torch.zeros(config.num_hidden_layers, width)) \
            if config.use_lower_bound else None

    def layer_lower_bounds(self) -> torch.Tensor | None:
        """``[layers, E]`` ``cumsum(softmax(Gamma, 0)) - softmax(Gamma, 0)[0]``: 0 for the first layer, rising."""
        if self.lower_bounds is None:
            return None
        p = self.lower_bounds.softmax(dim=0)
        return p.cumsum(dim=0) - p[0]

    def _initial_carry(self) -> torch.Tensor | None:
        return self.layer_lower_bounds()

    def _run_block(self, index: int, block: nn.Module, hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None, bounds: torch.Tensor | None):
        lower_bound = None if bounds is None else bounds[index]
        return block(hidden_states, attention_mask=attention_mask, lower_bound=lower_bound), bounds


class HGRNForCausalLM(CausalLMHead, HGRNPreTrainedModel, GenerationMixin):
    model_class = HGRNModel


__all__ = ["HGRNForCausalLM", "HGRNModel", "HGRNPreTrainedModel", "HGRNRecurrence"]
