"""Reading Mamba-2 mixers: every data-controlled factor recomputed from the module and its captured input.

Supported layer classes (all share one forward, the sequence path without a cache, eval mode):
``Mamba2Mixer`` (Mamba-2), ``BambaMixer`` (Bamba), ``Zamba2MambaMixer`` (Zamba2),
``NemotronHMamba2Mixer`` (NemotronH), ``GraniteMoeHybridMambaLayer`` (GraniteMoeHybrid) and
``FalconH1Mixer`` (FalconH1, which multiplies its input by ``ssm_in_multiplier`` and its projection
by the ``mup_vector`` buffer, and whose gated norm is optional and may come before the gate).

The factors mirror ``Mamba2Mixer.forward`` in the compute dtype: mask the input, ``in_proj``, split
``[z, xBC, dt]``, causal conv + SiLU on ``xBC``, mask, split ``[x, B, C]``,
``dt = clamp(softplus(dt + dt_bias), time_step_limit)``, the scan, and the gated RMS norm. The
equations are in :mod:`.operator`.

Where the module computes in float32 whatever its dtype (``A = -exp(A_log.float())``, the scan on
``x.float()``, the norm in float32), a float64 model's output carries float32 roundings; ``A`` is
rounded the same way here, the rest stays below the float64 tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...memory import channels_per_block
from ..primitives import causal_conv, masked_input
from .operator import Mamba2Factors, ssd_output


def _gated_norm_scale(mixer: nn.Module, y: torch.Tensor, gate: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, L, E]`` ``w_d * r_i(g)`` of the mixer's gated RMS norm, or ``None`` where it has none.

    ``r_i(g) = rsqrt(mean_{d in g} v_d[i]^2 + eps)`` with ``v = y * silu(z)`` (norm after the gate,
    every class but FalconH1's default) or ``v = y`` (``norm_before_gate``).
    """
    norm = mixer.norm
    if not hasattr(norm, "variance_epsilon"):  # FalconH1 with mamba_rms_norm=False: nn.Identity
        return None
    batch, length, channels = y.shape
    size = norm.group_size if hasattr(norm, "group_size") else channels // norm.n_groups
    v = y if getattr(norm, "norm_before_gate", False) else y * gate
    v = v.view(batch, length, channels // size, size)
    r = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight.detach().to(dtype) * r.expand_as(v).reshape(batch, length, channels)


def mamba2_factors(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   dtype: torch.dtype, block_bytes: int | None = None) -> Mamba2Factors:
    """Recompute every data-controlled factor of ``mixer`` for its input ``hidden_states [B, L, H]``."""
    if mixer.activation not in ("silu", "swish"):
        raise NotImplementedError(f"{type(mixer).__name__} with conv activation {mixer.activation!r}: "
                                  "only SiLU is written as a gate")
    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h, mask = masked_input(hidden_states, attention_mask, dtype)
    batch, length, _ = h.shape
    if hasattr(mixer, "ssm_in_multiplier"):  # FalconH1's extra multipliers
        h = h * mixer.ssm_in_multiplier
    projected = F.linear(h, p(mixer.in_proj.weight), p(mixer.in_proj.bias))
    if hasattr(mixer, "mup_vector"):
        projected = projected * p(mixer.mup_vector)
    E, conv_dim, H = mixer.intermediate_size, mixer.conv_dim, mixer.num_heads
    G, N = mixer.n_groups, mixer.ssm_state_size
    z, xBC, dt_raw = projected.split([E, conv_dim, H], dim=-1)

    conv_weight = p(mixer.conv1d.weight)[:, 0, :]                           # [conv_dim, K]
    conv_bias = p(mixer.conv1d.bias)
    conv_all = causal_conv(xBC, conv_weight, conv_bias)
    activated = F.silu(conv_all) * mask[..., None]
    B = activated[..., E:E + G * N].reshape(batch, length, G, N)
    C = activated[..., E + G * N:].reshape(batch, length, G, N)

    dt = F.softplus(dt_raw + p(mixer.dt_bias))
    low, high = mixer.time_step_limit
    dt = dt.clamp(min=low, max=high)
    # The module rounds A through float32 (``-exp(A_log.float())``) whatever its dtype.
    A = -torch.exp(mixer.A_log.detach().float()).to(dtype)
    f = Mamba2Factors(x=xBC[..., :E], z=z, conv_out=conv_all[..., :E], mask=mask,
                      conv_weight=conv_weight[:E], conv_bias=None if conv_bias is None else conv_bias[:E],
                      dt=dt, B=B, C=C, A=A, D=p(mixer.D), head_dim=mixer.head_dim)
    heads = None
    if block_bytes is not None:  # the scan output needs [B, h, L, L] per block of heads
        heads = channels_per_block(batch, length, H, h.dtype.itemsize, 3, block_bytes)
    f.norm_scale = _gated_norm_scale(mixer, ssd_output(f, heads), f.gate, dtype)
    return f
