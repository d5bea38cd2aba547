"""Mamba-1 mixers inside hybrid models: Jamba (``JambaMambaMixer``) and Zamba (``ZambaMambaMixer``).

Both are the Mamba (S6) mixer of :mod:`.mamba` with a twist; the operator is the same
(``shared/design/formulation.md``, Mamba section)::

    S_d[i, j] = sum_n C_i[n] exp(A[d, n] sum_{k=j+1..i} dt_k[d]) dt_j[d] B_j[n]
    unified:  A_d = diag(silu z_d) (S_d + D_d I) diag(sigmoid(c_d) mask) M_d,  conv bias in the offset

so these factor functions compute :class:`~implicit_attention.architectures.mamba.operator.MambaFactors`
and reuse :func:`~implicit_attention.architectures.mamba.operator.mamba_block`.

- **Jamba** puts RMS norms *with weights* on ``dt`` (before ``dt_proj``), ``B`` and ``C``:
  ``B_t = w_B * B~_t * rsqrt(mean(B~_t^2) + eps)`` and likewise; the per-token scales are
  data-controlled constants and are folded into ``dt``, ``B`` and ``C``. ``dt_proj``'s bias is
  added after the matrix product (as ``delta_bias``), rounded through float32 by the module.
- **Zamba** splits the inner width into ``n_mamba_heads`` heads of ``P`` channels with their own
  ``x_proj`` / ``dt_proj`` weights: ``B``, ``C`` (and ``dt``) differ per head, so there is one set of
  factors per head. Its ``in_proj`` output interleaves the two branches: channel ``d`` of ``x`` is
  output ``2d`` and channel ``d`` of ``z`` is output ``2d + 1``.

Where the module rounds through float32 whatever its dtype (``A_log.float()``, ``D.float()``,
the ``dt`` bias, the norms computed in float32, ``B.float()`` in the scan), the factors are
rounded the same way, so that float64 models reconstruct to float64 precision up to the
module's own float32 rounding of the scan input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerDecomposition
from .mamba import MambaLayerDecomposition
from .mamba.fast import matrix_rows, signed_mean
from .mamba.operator import EXACT_VARIANTS, VARIANTS, MambaFactors, mamba_block, values_for
from .registry import Architecture, CapturedLayer, register


def _f32(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter or activation the module rounds through float32 (``.float()``), in ``dtype``."""
    return t.detach().float().to(dtype)


def _rms_norm(x: torch.Tensor, norm: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``JambaRMSNorm``: computed in float32, cast back, times the weight; the scale is data-controlled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight.detach().to(dtype) * h.to(dtype)


def _masked_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype):
    batch, length, _ = hidden_states.shape
    h = hidden_states.detach().to(dtype)
    mask = torch.ones(batch, length, dtype=dtype, device=h.device) if attention_mask is None \
        else attention_mask.detach().to(device=h.device, dtype=dtype)
    return h * mask[..., None], mask


def _conv(x: torch.Tensor, conv: nn.Conv1d, dtype: torch.dtype):
    """The causal depthwise conv of ``x [B, L, E]``: ``(conv_out [B, L, E], taps [E, K], bias)``."""
    length, width = x.shape[1], conv.weight.shape[-1]
    weight = conv.weight.detach().to(dtype)[:, 0, :]
    bias = None if conv.bias is None else conv.bias.detach().to(dtype)
    out = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=width - 1,
                   groups=weight.shape[0])[..., :length].transpose(1, 2)
    return out, weight, bias


def _check_activation(mixer: nn.Module) -> None:
    if mixer.activation not in ("silu", "swish"):
        raise NotImplementedError(f"{type(mixer).__name__} with conv activation {mixer.activation!r}: "
                                  "only SiLU is written as a gate")


# ---------------------------------------------------------------------------------------- Jamba
def jamba_factors(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> MambaFactors:
    """Every data-controlled factor of a ``JambaMambaMixer`` for its input ``hidden_states [B, L, H]``."""
    _check_activation(mixer)
    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h, mask = _masked_input(hidden_states, attention_mask, dtype)
    x, z = F.linear(h, p(mixer.in_proj.weight), p(mixer.in_proj.bias)).chunk(2, dim=-1)
    conv_out, conv_weight, conv_bias = _conv(x, mixer.conv1d, dtype)
    u = F.silu(conv_out) * mask[..., None]

    rank, state = mixer.time_step_rank, mixer.ssm_state_size
    time_step, B, C = torch.split(F.linear(u, p(mixer.x_proj.weight)), [rank, state, state], dim=-1)
    time_step = _rms_norm(time_step, mixer.dt_layernorm, dtype)
    B = _rms_norm(B, mixer.b_layernorm, dtype)
    C = _rms_norm(C, mixer.c_layernorm, dtype)
    dt = F.linear(time_step, p(mixer.dt_proj.weight))
    if mixer.dt_proj.bias is not None:
        dt = dt + _f32(mixer.dt_proj.bias, dtype)
    return MambaFactors(x=x, z=z, conv_out=conv_out, mask=mask, conv_weight=conv_weight, conv_bias=conv_bias,
                        dt=F.softplus(dt), B=_f32(B, dtype), C=C,
                        A=-torch.exp(mixer.A_log.detach().float()).to(dtype), D=_f32(mixer.D, dtype))


def _build_jamba(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> MambaLayerDecomposition:
    factors = jamba_factors(captured.module, captured.inputs, captured.attention_mask, dtype)
    return MambaLayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                   output=captured.output.detach().to(dtype))


# ---------------------------------------------------------------------------------------- Zamba
def zamba_factors(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> list[MambaFactors]:
    """One :class:`MambaFactors` per head of a ``ZambaMambaMixer`` (head ``k`` holds channels ``[kP, (k+1)P)``)."""
    _check_activation(mixer)
    p = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    h, mask = _masked_input(hidden_states, attention_mask, dtype)
    projected = F.linear(h, p(mixer.in_proj.weight), p(mixer.in_proj.bias))
    x, z = projected[..., 0::2], projected[..., 1::2]      # the module's view(B, E, 2, L) split
    conv_out, conv_weight, conv_bias = _conv(x, mixer.conv1d, dtype)
    u = F.silu(conv_out) * mask[..., None]

    heads, size = mixer.n_mamba_heads, mixer.mamba_head_dim
    rank, state = mixer.time_step_rank, mixer.ssm_state_size
    A = -torch.exp(mixer.A_log.detach().float()).to(dtype)                # [heads, P, N]
    factors = []
    for k in range(heads):  # a handful of heads, each with its own projections
        ch = slice(k * size, (k + 1) * size)
        time_step, B, C = torch.split(F.linear(u[..., ch], p(mixer.x_proj_weight[k])), [rank, state, state], dim=-1)
        dt = F.linear(time_step, p(mixer.dt_proj_weight[k])) + _f32(mixer.dt_proj_bias[k], dtype)
        factors.append(MambaFactors(
            x=x[..., ch], z=z[..., ch], conv_out=conv_out[..., ch], mask=mask, conv_weight=conv_weight[ch],
            conv_bias=None if conv_bias is None else conv_bias[ch], dt=F.softplus(dt), B=_f32(B, dtype), C=C,
            A=A[k], D=_f32(mixer.D[k], dtype)))
    return factors


class ZambaLayerDecomposition(LayerDecomposition):
    """A Zamba mixer as per-channel implicit attention: the Mamba operator of each head, side by side."""

    block_temporaries = 5

    def __init__(self, heads: list[MambaFactors], *, variant: str, **kwargs):
        self.heads = heads
        self.head_dim = heads[0].x.shape[-1]
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS,
                         values=torch.cat([values_for(f, variant) for f in heads], dim=-1),
                         offset=None, mask=heads[0].mask, **kwargs)

    def _block(self, channels: slice):
        matrices, offsets = [], []
        for k, f in enumerate(self.heads):  # only the heads this block of channels touches
            start = max(channels.start, k * self.head_dim)
            stop = min(channels.stop, (k + 1) * self.head_dim)
            if start >= stop:
                continue
            matrix, offset = mamba_block(f, slice(start - k * self.head_dim, stop - k * self.head_dim), self.variant)
            matrices.append(matrix)
            offsets.append(offset)
        if all(offset is None for offset in offsets):
            return torch.cat(matrices, dim=1), None
        offsets = [o if o is not None else torch.zeros_like(m[..., 0]).transpose(1, 2)
                   for o, m in zip(offsets, matrices)]
        return torch.cat(matrices, dim=1), torch.cat(offsets, dim=-1)

    def aggregate(self, how="mean", channel=None):
        # heads are equally wide: the channel mean is the mean of the heads' factorised signed means
        if how == "mean" and channel is None and "mean" not in self._aggregates:
            self._aggregates["mean"] = torch.stack(
                [signed_mean(f, self.variant, chunk_bytes=self.block_bytes) for f in self.heads]).mean(dim=0)
        return super().aggregate(how, channel)

    def aggregate_rows(self, rows, how="mean"):
        rows = self._row_index(rows)
        if how in self._aggregates:
            return self._aggregates[how][:, rows]
        if how not in ("mean", "abs", "pos"):
            raise ValueError(f"how must be one of ('mean', 'abs', 'pos'), got {how!r}")
        per_channel = torch.cat([matrix_rows(f, self.variant, rows) for f in self.heads], dim=2)  # [B, R, E, L]
        if how == "abs":
            per_channel = per_channel.abs()
        elif how == "pos":
            per_channel = per_channel.clamp(min=0)
        return per_channel.mean(dim=2)

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # as for Mamba: the gate that "s6" / "no_gate" leave out multiplies their matrix's gradient
        if self.variant in ("s6", "no_gate"):
            return grad * torch.cat([f.out_gate for f in self.heads], dim=-1)
        return grad


def _build_zamba(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> ZambaLayerDecomposition:
    heads = zamba_factors(captured.module, captured.inputs, captured.attention_mask, dtype)
    return ZambaLayerDecomposition(heads, variant=variant, index=index, name=captured.name,
                                   output=captured.output.detach().to(dtype))


register(Architecture(
    name="jamba_mamba",
    module_classes=("transformers.models.jamba.modeling_jamba.JambaMambaMixer",),
    model_classes=("JambaForCausalLM", "JambaModel", "JambaForSequenceClassification"),
    variants=VARIANTS,
    output_module="out_proj",
    build=_build_jamba,
    channels=lambda mixer: mixer.intermediate_size,
))

register(Architecture(
    name="zamba_mamba",
    module_classes=("transformers.models.zamba.modeling_zamba.ZambaMambaMixer",),
    model_classes=("ZambaForCausalLM", "ZambaModel", "ZambaForSequenceClassification"),
    variants=VARIANTS,
    output_module="out_proj",
    build=_build_zamba,
    channels=lambda mixer: mixer.intermediate_size,
))
