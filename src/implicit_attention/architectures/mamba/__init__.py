"""Mamba mixers of Hugging Face ``transformers`` (``MambaMixer``, ``FalconMambaMixer``).

The factors are recomputed from the real module's parameters and the mixer input captured during
the model's own forward, in the compute dtype, mirroring the module's forward step by step
(``transformers.models.mamba.modeling_mamba.MambaMixer.forward``, the sequence path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import LayerDecomposition
from ..registry import Architecture, CapturedLayer, register
from .fast import matrix_rows, signed_mean
from .operator import EXACT_VARIANTS, VARIANTS, MambaFactors, mamba_block, values_for


def _weightless_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """FalconMamba's weightless RMS norm; its per-token scale is a data-controlled constant."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def mamba_factors(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> MambaFactors:
    """Recompute every data-controlled factor of ``mixer`` for its input ``hidden_states [B, L, H]``."""
    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    batch, length, _ = hidden_states.shape
    h = hidden_states.detach().to(dtype)
    mask = torch.ones(batch, length, dtype=dtype, device=h.device) if attention_mask is None \
        else attention_mask.detach().to(device=h.device, dtype=dtype)
    h = h * mask[..., None]
    x, z = F.linear(h, p(mixer.in_proj.weight), p(mixer.in_proj.bias)).chunk(2, dim=-1)

    conv = mixer.conv1d
    width = conv.weight.shape[-1]
    conv_weight = p(conv.weight)[:, 0, :]                                  # [E, K]
    conv_bias = p(conv.bias)
    conv_out = F.conv1d(x.transpose(1, 2), conv_weight[:, None, :], conv_bias,
                        padding=width - 1, groups=conv_weight.shape[0])[..., :length].transpose(1, 2)
    u = F.silu(conv_out) * mask[..., None]

    rank, state = mixer.time_step_rank, mixer.ssm_state_size
    time_step, B, C = torch.split(F.linear(u, p(mixer.x_proj.weight)), [rank, state, state], dim=-1)
    if hasattr(mixer, "b_layernorm"):  # FalconMamba
        eps = mixer.rms_eps
        time_step, B, C = (_weightless_rms(t, eps) for t in (time_step, B, C))
    dt = F.softplus(F.linear(time_step, p(mixer.dt_proj.weight), p(mixer.dt_proj.bias)))
    # The module rounds A and D through float32 (``A_log.float()``, ``D.float()``) whatever its
    # dtype: use the same parameter values so that float64 models reconstruct exactly.
    A = -torch.exp(mixer.A_log.detach().float()).to(dtype)
    D = mixer.D.detach().float().to(dtype)
    return MambaFactors(x=x, z=z, conv_out=conv_out, mask=mask, conv_weight=conv_weight,
                        conv_bias=conv_bias, dt=dt, B=B, C=C, A=A, D=D)


class MambaLayerDecomposition(LayerDecomposition):
    """A Mamba mixer as per-channel implicit attention over its inner width ``E``."""

    block_temporaries = 5

    def __init__(self, factors: MambaFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS,
                         values=values_for(factors, variant), offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return mamba_block(self.factors, channels, self.variant)

    def aggregate(self, how="mean", channel=None):
        # the signed mean factorises: never builds per-channel blocks (see fast.py)
        if how == "mean" and channel is None and "mean" not in self._aggregates:
            self._aggregates["mean"] = signed_mean(self.factors, self.variant, chunk_bytes=self.block_bytes)
        return super().aggregate(how, channel)

    def aggregate_rows(self, rows, how="mean"):
        rows = self._row_index(rows)
        if how in self._aggregates:
            return self._aggregates[how][:, rows]
        per_channel = matrix_rows(self.factors, self.variant, rows)          # [B, R, E, L]
        if how == "abs":
            per_channel = per_channel.abs()
        elif how == "pos":
            per_channel = per_channel.clamp(min=0)
        elif how != "mean":
            raise ValueError(f"how must be one of ('mean', 'abs', 'pos'), got {how!r}")
        return per_channel.mean(dim=2)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # out = silu(z) * (S u + D u) for "s6", silu(z) * (A x + offset) for "no_gate": the gate
        # the variant leaves out multiplies the gradient reaching its matrix.
        if self.variant in ("s6", "no_gate"):
            return grad * self.factors.out_gate
        return grad


def _build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> MambaLayerDecomposition:
    factors = mamba_factors(captured.module, captured.inputs, captured.attention_mask, dtype)
    return MambaLayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                   output=captured.output.detach().to(dtype))


register(Architecture(
    name="mamba",
    module_classes=(
        "transformers.models.mamba.modeling_mamba.MambaMixer",
        "transformers.models.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer",
    ),
    model_classes=("MambaForCausalLM", "MambaModel", "FalconMambaForCausalLM", "FalconMambaModel"),
    variants=VARIANTS,
    output_module="out_proj",
    build=_build,
    channels=lambda mixer: mixer.intermediate_size,
))
