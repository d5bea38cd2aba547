"""Reading Mamba mixers: every data-controlled factor recomputed from the module and its captured input.

Covered classes: ``MambaMixer`` and ``FalconMambaMixer`` (:func:`mamba_factors`), ``JambaMambaMixer``
(:func:`jamba_factors`) and ``ZambaMambaMixer`` (:func:`zamba_factors`). Each mirrors the module's
forward (the sequence path, no cache) step by step, in the compute dtype, and returns
:class:`~.operator.MambaFactors` for the operator of :mod:`.operator`::

    [x; z] = in_proj(h * mask),   c = M x + b,   u = silu(c) * mask
    [dt~; B; C] = x_proj(u),      dt = softplus(dt_proj(dt~) + dt_bias),   A = -exp(A_log)

The twists of each family are data-controlled constants folded into the factors:

- **FalconMamba** puts weightless RMS norms on ``dt~``, ``B`` and ``C``.
- **Jamba** puts RMS norms *with weights* on ``dt~`` (before ``dt_proj``), ``B`` and ``C``:
  ``B_t = w_B * B~_t * rsqrt(mean(B~_t^2) + eps)`` and likewise. ``dt_proj``'s bias is added after
  the matrix product (as ``delta_bias``), rounded through float32 by the module.
- **Zamba** splits the inner width into ``n_mamba_heads`` heads of ``P`` channels with their own
  ``x_proj`` / ``dt_proj`` weights: ``B``, ``C`` (and ``dt``) differ per head, so there is one set of
  factors per head. Its ``in_proj`` output interleaves the two branches: channel ``d`` of ``x`` is
  output ``2d`` and channel ``d`` of ``z`` is output ``2d + 1``.

Where a module rounds through float32 whatever its dtype (``A_log.float()``, ``D.float()``, the
``dt`` bias, the norms computed in float32, ``B.float()`` in the scan), the factors are rounded the
same way, so that float64 models reconstruct to float64 precision up to the module's own float32
rounding of the scan input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import causal_conv, masked_input
from .operator import MambaFactors


def _f32(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter or activation the module rounds through float32 (``.float()``), in ``dtype``."""
    return t.detach().float().to(dtype)


def _param(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype)


def _state_matrix(A_log: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A = -exp(A_log)`` as the module computes it: in float32 whatever its dtype."""
    return -torch.exp(A_log.detach().float()).to(dtype)


def _weightless_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """FalconMamba's weightless RMS norm; its per-token scale is a data-controlled constant."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm(x: torch.Tensor, norm: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``JambaRMSNorm``: computed in float32, cast back, times the weight; the scale is data-controlled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight.detach().to(dtype) * h.to(dtype)


def _conv(x: torch.Tensor, conv: nn.Conv1d, dtype: torch.dtype):
    """The mixer's causal depthwise conv of ``x [B, L, E]``: ``(conv_out [B, L, E], taps [E, K], bias)``."""
    weight, bias = conv.weight.detach().to(dtype)[:, 0, :], _param(conv.bias, dtype)
    return causal_conv(x, weight, bias), weight, bias


def _check_activation(mixer: nn.Module) -> None:
    if getattr(mixer, "activation", "silu") not in ("silu", "swish"):
        raise NotImplementedError(f"{type(mixer).__name__} with conv activation {mixer.activation!r}: "
                                  "only SiLU is written as a gate")


def _scan_inputs(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                 dtype: torch.dtype):
    """``x, z [B, L, E]``, ``mask [B, L]``, the conv ``(c, taps, bias)`` and ``x_proj(silu(c) mask)`` split
    into ``(dt~ [B, L, R], B, C [B, L, N])``: the steps Mamba and Jamba mixers share."""
    h, mask = masked_input(hidden_states, attention_mask, dtype)
    x, z = F.linear(h, _param(mixer.in_proj.weight, dtype), _param(mixer.in_proj.bias, dtype)).chunk(2, dim=-1)
    conv = _conv(x, mixer.conv1d, dtype)
    u = F.silu(conv[0]) * mask[..., None]
    rank, state = mixer.time_step_rank, mixer.ssm_state_size
    projections = torch.split(F.linear(u, _param(mixer.x_proj.weight, dtype)), [rank, state, state], dim=-1)
    return x, z, mask, conv, projections


def mamba_factors(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> MambaFactors:
    """Every data-controlled factor of a ``MambaMixer`` / ``FalconMambaMixer`` for ``hidden_states [B, L, H]``."""
    x, z, mask, (conv_out, conv_weight, conv_bias), (time_step, B, C) = _scan_inputs(
        mixer, hidden_states, attention_mask, dtype)
    if hasattr(mixer, "b_layernorm"):  # FalconMamba
        time_step, B, C = (_weightless_rms(t, mixer.rms_eps) for t in (time_step, B, C))
    dt = F.softplus(F.linear(time_step, _param(mixer.dt_proj.weight, dtype), _param(mixer.dt_proj.bias, dtype)))
    # The module rounds A and D through float32 (``A_log.float()``, ``D.float()``) whatever its
    # dtype: use the same parameter values so that float64 models reconstruct exactly.
    return MambaFactors(x=x, z=z, conv_out=conv_out, mask=mask, conv_weight=conv_weight, conv_bias=conv_bias,
                        dt=dt, B=B, C=C, A=_state_matrix(mixer.A_log, dtype), D=_f32(mixer.D, dtype))


def jamba_factors(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> MambaFactors:
    """Every data-controlled factor of a ``JambaMambaMixer`` for its input ``hidden_states [B, L, H]``."""
    _check_activation(mixer)
    x, z, mask, (conv_out, conv_weight, conv_bias), (time_step, B, C) = _scan_inputs(
        mixer, hidden_states, attention_mask, dtype)
    time_step = _rms_norm(time_step, mixer.dt_layernorm, dtype)
    B = _rms_norm(B, mixer.b_layernorm, dtype)
    C = _rms_norm(C, mixer.c_layernorm, dtype)
    dt = F.linear(time_step, _param(mixer.dt_proj.weight, dtype))
    if mixer.dt_proj.bias is not None:
        dt = dt + _f32(mixer.dt_proj.bias, dtype)
    return MambaFactors(x=x, z=z, conv_out=conv_out, mask=mask, conv_weight=conv_weight, conv_bias=conv_bias,
                        dt=F.softplus(dt), B=_f32(B, dtype), C=C,
                        A=_state_matrix(mixer.A_log, dtype), D=_f32(mixer.D, dtype))


def zamba_factors(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> list[MambaFactors]:
    """One :class:`~.operator.MambaFactors` per head of a ``ZambaMambaMixer`` (head ``k`` holds channels ``[kP, (k+1)P)``)."""
    _check_activation(mixer)
    h, mask = masked_input(hidden_states, attention_mask, dtype)
    projected = F.linear(h, _param(mixer.in_proj.weight, dtype), _param(mixer.in_proj.bias, dtype))
    x, z = projected[..., 0::2], projected[..., 1::2]      # the module's view(B, E, 2, L) split
    conv_out, conv_weight, conv_bias = _conv(x, mixer.conv1d, dtype)
    u = F.silu(conv_out) * mask[..., None]

    heads, size = mixer.n_mamba_heads, mixer.mamba_head_dim
    rank, state = mixer.time_step_rank, mixer.ssm_state_size
    A = _state_matrix(mixer.A_log, dtype)                             # [heads, P, N]
    factors = []
    for k in range(heads):  # a handful of heads, each with its own projections
        ch = slice(k * size, (k + 1) * size)
        time_step, B, C = torch.split(F.linear(u[..., ch], _param(mixer.x_proj_weight[k], dtype)),
                                      [rank, state, state], dim=-1)
        dt = F.linear(time_step, _param(mixer.dt_proj_weight[k], dtype)) + _f32(mixer.dt_proj_bias[k], dtype)
        factors.append(MambaFactors(
            x=x[..., ch], z=z[..., ch], conv_out=conv_out[..., ch], mask=mask, conv_weight=conv_weight[ch],
            conv_bias=None if conv_bias is None else conv_bias[ch], dt=F.softplus(dt), B=_f32(B, dtype), C=C,
            A=A[k], D=_f32(mixer.D[k], dtype)))
    return factors
