"""Reading a Vision Mamba mixer (our ``implicit_attention.models.vim.VimMixer``): the factors of both scans.

Mirrors :meth:`VimMixer.forward` step by step in the compute dtype::

    [x; z] = in_proj(h)
    forward branch on (x, z):              conv1d,   x_proj,   dt_proj,   A_log,   D
    backward branch on (flip x, flip z):   conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b

Each branch is a Mamba scan, so each is read into :class:`~..mamba.operator.MambaFactors` (the
backward one in flipped token order, as the module runs it). Images carry no padding: the mask is
all ones (a mask would be ambiguous for the backward scan, and the model takes none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..mamba.operator import MambaFactors
from ..primitives import causal_conv


@dataclass
class VimFactors:
    """Both scans of one mixer.

    Attributes:
        forward: the forward scan's factors (token order).
        backward: the backward scan's factors in flipped token order (its token ``t`` is token ``L-1-t``).
        scale: ``1/2`` (``divide_out``) or 1: ``out = scale * (y_f + flip(y_b))``.
    """

    forward: MambaFactors
    backward: MambaFactors
    scale: float

    @property
    def mask(self) -> torch.Tensor:
        return self.forward.mask

    @property
    def x(self) -> torch.Tensor:
        """``[B, L, E]`` the in-projection's value half, shared by both scans (token order)."""
        return self.forward.x

    @property
    def out_gate(self) -> torch.Tensor:
        """``[B, L, E]`` ``silu(z)`` in token order: both scans' gate at each token."""
        return self.forward.out_gate


def _branch(mixer: nn.Module, x: torch.Tensor, z: torch.Tensor, suffix: str, dtype: torch.dtype) -> MambaFactors:
    p = mixer.branch(suffix)
    conv = p["conv1d"]
    weight = conv.weight.detach().to(dtype)[:, 0, :]
    bias = None if conv.bias is None else conv.bias.detach().to(dtype)
    conv_out = causal_conv(x, weight, bias)
    u = F.silu(conv_out)
    rank, state = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(F.linear(u, p["x_proj"].weight.detach().to(dtype)), [rank, state, state], dim=-1)
    dt = F.softplus(F.linear(dt, p["dt_proj"].weight.detach().to(dtype), p["dt_proj"].bias.detach().to(dtype)))
    mask = torch.ones(x.shape[:2], dtype=dtype, device=x.device)
    return MambaFactors(x=x, z=z, conv_out=conv_out, mask=mask, conv_weight=weight, conv_bias=bias, dt=dt, B=B, C=C,
                        A=-torch.exp(p["A_log"].detach().to(dtype)), D=p["D"].detach().to(dtype))


def vim_factors(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                dtype: torch.dtype) -> VimFactors:
    """Both scans' factors of a ``VimMixer`` for its input ``hidden_states [B, L, D]``."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise NotImplementedError("Vision Mamba takes no padding (its backward scan would read it)")
    h = hidden_states.detach().to(dtype)
    weight = mixer.in_proj.weight.detach().to(dtype)
    bias = None if mixer.in_proj.bias is None else mixer.in_proj.bias.detach().to(dtype)
    x, z = F.linear(h, weight, bias).chunk(2, dim=-1)
    return VimFactors(forward=_branch(mixer, x, z, "", dtype),
                      backward=_branch(mixer, x.flip(1), z.flip(1), "_b", dtype),
                      scale=0.5 if mixer.divide_out else 1.0)
