"""Mamba-2 mixers of Hugging Face ``transformers``: Mamba-2 and the Mamba-2 layers of hybrids.

Supported layer classes (all share one forward, the sequence path without a cache, eval mode):
``Mamba2Mixer`` (Mamba-2), ``BambaMixer`` (Bamba), ``Zamba2MambaMixer`` (Zamba2),
``NemotronHMamba2Mixer`` (NemotronH), ``GraniteMoeHybridMambaLayer`` (GraniteMoeHybrid) and
``FalconH1Mixer`` (FalconH1, which multiplies its input by ``ssm_in_multiplier`` and its projection
by the ``mup_vector`` buffer, and whose gated norm is optional and may come before the gate).

The factors are recomputed from the real module's parameters and the mixer input captured during
the model's own forward, in the compute dtype, mirroring ``Mamba2Mixer.forward``: mask the input,
``in_proj``, split ``[z, xBC, dt]``, causal conv + SiLU on ``xBC``, mask, split ``[x, B, C]``,
``dt = clamp(softplus(dt + dt_bias), time_step_limit)``, the chunked scan, and the gated RMS norm.
The equations are in :mod:`.operator`.

Where the module computes in float32 whatever its dtype (``A = -exp(A_log.float())``, the scan on
``x.float()``, the norm in float32), a float64 model's output carries float32 roundings; ``A`` is
rounded the same way here, the rest stays below the float64 tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...memory import channels_per_block, default_block_bytes
from ..base import LayerDecomposition
from ..registry import Architecture, CapturedLayer, register
from .operator import (EXACT_VARIANTS, VARIANTS, Mamba2Factors, mamba2_block, matrix_rows, signed_mean,
                       ssd_output, values_for)


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
    batch, length, _ = hidden_states.shape
    h = hidden_states.detach().to(dtype)
    mask = torch.ones(batch, length, dtype=dtype, device=h.device) if attention_mask is None \
        else attention_mask.detach().to(device=h.device, dtype=dtype)
    h = h * mask[..., None]
    if hasattr(mixer, "ssm_in_multiplier"):  # FalconH1's extra multipliers
        h = h * mixer.ssm_in_multiplier
    projected = F.linear(h, p(mixer.in_proj.weight), p(mixer.in_proj.bias))
    if hasattr(mixer, "mup_vector"):
        projected = projected * p(mixer.mup_vector)
    E, conv_dim, H = mixer.intermediate_size, mixer.conv_dim, mixer.num_heads
    G, N = mixer.n_groups, mixer.ssm_state_size
    z, xBC, dt_raw = projected.split([E, conv_dim, H], dim=-1)

    width = mixer.conv1d.weight.shape[-1]
    conv_weight = p(mixer.conv1d.weight)[:, 0, :]                           # [conv_dim, K]
    conv_bias = p(mixer.conv1d.bias)
    conv_all = F.conv1d(xBC.transpose(1, 2), conv_weight[:, None, :], conv_bias,
                        padding=width - 1, groups=conv_dim)[..., :length].transpose(1, 2)
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


class Mamba2LayerDecomposition(LayerDecomposition):
    """A Mamba-2 mixer as per-channel implicit attention over its inner width ``E``."""

    block_temporaries = 5

    def __init__(self, factors: Mamba2Factors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS,
                         values=values_for(factors, variant), offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return mamba2_block(self.factors, channels, self.variant)

    def aggregate(self, how="mean", channel=None):
        # the signed mean factorises over the heads (see operator.signed_mean)
        if how == "mean" and channel is None and "mean" not in self._aggregates:
            f = self.factors
            heads = channels_per_block(self.batch_size, self.length, f.num_heads, self.dtype.itemsize, 4,
                                       self.block_bytes)
            self._aggregates["mean"] = signed_mean(f, self.variant, heads)
        return super().aggregate(how, channel)

    def aggregate_rows(self, rows, how="mean"):
        # a few rows (raw / paper read the target row) cost O(R L E), never the [B, C, L, L] blocks
        rows = self._row_index(rows)
        if how in self._aggregates:
            return self._aggregates[how][:, rows]
        if how not in ("mean", "abs", "pos"):
            raise ValueError(f"how must be one of ('mean', 'abs', 'pos'), got {how!r}")
        per_channel = matrix_rows(self.factors, self.variant, rows)              # [B, R, E, L]
        if how == "abs":
            per_channel = per_channel.abs()
        elif how == "pos":
            per_channel = per_channel.clamp(min=0)
        return per_channel.mean(dim=2)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # "ssd": out = (w r silu z) * (S u + D u); "no_gate": out = silu(z) * (A x + offset).
        if self.variant == "ssd":
            return grad * self.factors.out_gate
        if self.variant == "no_gate":
            return grad * self.factors.gate
        return grad


def _build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> Mamba2LayerDecomposition:
    factors = mamba2_factors(captured.module, captured.inputs, captured.attention_mask, dtype,
                             default_block_bytes(captured.inputs.device))
    return Mamba2LayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                    output=captured.output.detach().to(dtype))


register(Architecture(
    name="mamba2",
    module_classes=(
        "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer",
        "transformers.models.bamba.modeling_bamba.BambaMixer",
        "transformers.models.zamba2.modeling_zamba2.Zamba2MambaMixer",
        "transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer",
        "transformers.models.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer",
        "transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer",
    ),
    model_classes=("Mamba2ForCausalLM", "Mamba2Model", "BambaForCausalLM", "Zamba2ForCausalLM",
                   "NemotronHForCausalLM", "GraniteMoeHybridForCausalLM", "FalconH1ForCausalLM"),
    variants=VARIANTS,
    output_module="out_proj",
    build=_build,
    channels=lambda mixer: mixer.intermediate_size,
))
