"""Reading delta-rule mixers: every data-controlled factor from the module and its captured input.

Gated DeltaNet classes (one forward up to the projections, see :mod:`.operator`):

- ``Qwen3NextGatedDeltaNet``: fused ``in_proj_qkvz`` and ``in_proj_ba``, split per key-head group by
  the module's own ``fix_query_key_value_ordering`` (a reshape); ``norm``, ``out_proj``.
- ``Qwen3_5GatedDeltaNet``, ``Qwen3_5MoeGatedDeltaNet``, ``LaraMiniGatedDeltaNet``,
  ``Qwen4ExpTextGatedDeltaNet``: ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``; ``norm``
  (Qwen4-Exp's gate activation is ``output_gate_type``), ``out_proj``.
- ``OlmoHybridGatedDeltaNet``: ``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj``, ``g_proj``;
  ``beta`` doubled with ``allow_neg_eigval``; ``o_norm``, ``o_proj``.

Kimi Delta Attention (``KimiLinearDeltaAttention``, ``Glm5NextTextLinearAttention``,
``BailingHybridDeltaAttention``): ``q_proj``, ``k_proj``, ``v_proj``, per-channel log-decays from the
module's ``forget_gate`` submodule (three different gates: softplus, lower-bounded sigmoid), the
output gate ``g_b_proj(g_a_proj(h))`` or ``g_proj(h)``, ``o_norm`` with a sigmoid gate, ``o_proj``; and
``l2norm`` as ``x / sqrt(sum x^2 + eps)`` instead of ``x rsqrt(sum x^2 + eps)``.

All of them zero the padding tokens of their input, run a causal depthwise conv + SiLU over
``[q; k; v]``, repeat ``q, k`` to the value heads where there are fewer key heads, and run the
recurrence in float32 (rounded the same way here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..primitives import causal_conv, masked_input
from ..registry import CapturedLayer
from .operator import CHUNK_SIZE, DeltaFactors, delta_attention


def _f32(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded through float32 (as the modules' kernels cast it), in ``dtype``."""
    return t.float().to(dtype)


def gated_deltanet_inputs(module: nn.Module, h: torch.Tensor, dtype: torch.dtype):
    """``(qkv [B, L, 2 Kd + V], z [B, L, V], beta [B, L, H], log_decay [B, L, H, 1])`` of a Gated DeltaNet."""
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    lin = lambda proj, x=h: F.linear(x, p(proj.weight), None if proj.bias is None else p(proj.bias))  # noqa: E731
    batch, length, _ = h.shape
    if hasattr(module, "in_proj_qkvz"):                                        # Qwen3-Next
        q, k, v, z, b, a = module.fix_query_key_value_ordering(lin(module.in_proj_qkvz), lin(module.in_proj_ba))
        qkv = torch.cat([t.reshape(batch, length, -1) for t in (q, k, v)], dim=-1)
        z = z.reshape(batch, length, -1)
    elif hasattr(module, "in_proj_qkv"):                                       # Qwen3.5, Qwen3.5-MoE, LaraMini, Qwen4-Exp
        qkv, z, b, a = lin(module.in_proj_qkv), lin(module.in_proj_z), lin(module.in_proj_b), lin(module.in_proj_a)
    else:                                                                      # OLMo-Hybrid
        qkv = torch.cat([lin(module.q_proj), lin(module.k_proj), lin(module.v_proj)], dim=-1)
        z, b, a = lin(module.g_proj), lin(module.b_proj), lin(module.a_proj)
    beta = torch.sigmoid(b)
    if getattr(module, "allow_neg_eigval", False):
        beta = beta * 2.0
    # g = -exp(A_log.float()) * softplus(a.float() + dt_bias), as the module rounds it
    g = -torch.exp(module.A_log.detach().float()).to(dtype) * F.softplus(_f32(a, dtype) + p(module.dt_bias))
    return qkv, z, beta, g[..., None]


def kda_inputs(module: nn.Module, h: torch.Tensor, dtype: torch.dtype):
    """``(qkv, z, beta, log_decay [B, L, H, Dk])`` of a Kimi Delta Attention layer.

    The log-decays are the module's own ``forget_gate`` applied to the layer's (masked) input in the
    model's dtype: it computes in float32 whatever its dtype, so this is the tensor the module used.
    """
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    lin = lambda proj, x=h: F.linear(x, p(proj.weight), None if proj.bias is None else p(proj.bias))  # noqa: E731
    batch, length, _ = h.shape
    qkv = torch.cat([lin(module.q_proj), lin(module.k_proj), lin(module.v_proj)], dim=-1)
    z = lin(module.g_b_proj, lin(module.g_a_proj)) if hasattr(module, "g_b_proj") else lin(module.g_proj)
    beta = torch.sigmoid(lin(module.b_proj))
    model_dtype = module.q_proj.weight.dtype
    with torch.no_grad():
        g = module.forget_gate(h.to(model_dtype)).to(dtype)
    return qkv, z, beta, g.view(batch, length, module.num_heads, module.head_dim)


def _l2norm_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _l2norm_div(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


@dataclass
class DeltaInputs:
    """What a delta-rule mixer computes from its input before the shared math (in the compute dtype).

    Attributes:
        qkv: ``[B, L, 2 Kd + V]`` the projections ``[q; k; v]`` at the conv input.
        z: ``[B, L, V]`` the output gate's pre-activation, or ``None`` (no gate).
        beta: ``[B, L, Hv]``; log_decay: ``[B, L, Hv, 1 or Dk]``.
        conv_weight: ``[2 Kd + V, K]`` and conv_bias ``[2 Kd + V]`` (or ``None``) of the causal conv over
            ``[q; k; v]`` (one tap of weight 1 where the module has no conv).
        k_heads, v_heads, dk, dv: head counts and sizes; l2norm: the module's L2 norm of ``q, k``.
        gate_activation: ``act(z)`` of the gated norm (float32 in, float32 out).
        norm: the gated norm (``weight`` per ``Dv``, or ``None``) and its ``eps``.
    """

    qkv: torch.Tensor
    z: torch.Tensor | None
    beta: torch.Tensor
    log_decay: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    k_heads: int
    v_heads: int
    dk: int
    dv: int
    l2norm: Callable[[torch.Tensor], torch.Tensor]
    gate_activation: Callable[[torch.Tensor], torch.Tensor]
    norm_weight: torch.Tensor | None
    norm_eps: float


def transformers_inputs(module: nn.Module, h: torch.Tensor, dtype: torch.dtype) -> DeltaInputs:
    """:class:`DeltaInputs` of the ``transformers`` delta-rule mixers (module docstring)."""
    kda = hasattr(module, "forget_gate")
    if module.activation not in ("silu", "swish"):
        raise NotImplementedError(f"{type(module).__name__} with conv activation {module.activation!r}: "
                                  "only SiLU is written as a gate")
    qkv, z, beta, g = (kda_inputs if kda else gated_deltanet_inputs)(module, h, dtype)
    if kda:
        k_heads = v_heads = module.num_heads
        dk = dv = module.head_dim
    else:
        k_heads, v_heads, dk, dv = module.num_k_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim
    norm = module.o_norm if hasattr(module, "o_norm") else module.norm
    return DeltaInputs(qkv=qkv, z=z, beta=beta, log_decay=g, conv_weight=module.conv1d.weight.detach().to(dtype)[:, 0, :],
                       conv_bias=None if module.conv1d.bias is None else module.conv1d.bias.detach().to(dtype),
                       k_heads=k_heads, v_heads=v_heads, dk=dk, dv=dv, l2norm=_l2norm_div if kda else _l2norm_rsqrt,
                       gate_activation=ACT2FN[norm.activation], norm_weight=norm.weight.detach(),
                       norm_eps=norm.variance_epsilon)


def delta_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype, core: torch.Tensor | None = None, chunk_size: int = CHUNK_SIZE,
                  read_inputs: Callable[[nn.Module, torch.Tensor, torch.dtype], DeltaInputs] = transformers_inputs
                  ) -> DeltaFactors:
    """Recompute every data-controlled factor of a delta-rule mixer for its input ``[B, L, D]``.

    ``read_inputs`` reads the module's projections (:func:`transformers_inputs`, or the adapters of
    :mod:`..fla`). ``core`` (``[B * L, Dv]`` or ``[B, L, H, Dv]``, optional) is the input the module's
    gated norm received (recorded by :func:`record_core`): the norm scale is read from it, in float32 as
    the module computes it. Without it, the recurrence's output is recomputed as ``A_h u``.
    """
    h, mask = masked_input(hidden_states, attention_mask, dtype)
    batch, length, _ = h.shape
    inputs = read_inputs(module, h, dtype)
    qkv, k_heads, v_heads, dk, dv = inputs.qkv, inputs.k_heads, inputs.v_heads, inputs.dk, inputs.dv
    key_dim = k_heads * dk
    conv_weight, conv_bias = inputs.conv_weight, inputs.conv_bias
    conv_all = causal_conv(qkv, conv_weight, conv_bias)
    activated = F.silu(conv_all)
    q = activated[..., :key_dim].reshape(batch, length, k_heads, dk)
    k = activated[..., key_dim:2 * key_dim].reshape(batch, length, k_heads, dk)
    if v_heads != k_heads:
        q, k = (t.repeat_interleave(v_heads // k_heads, dim=2) for t in (q, k))
    # the kernel: cast to float32, L2-normalise in float32, scale the queries by Dk^-1/2
    q = (inputs.l2norm(q.float()) * dk ** -0.5).to(dtype)
    k = inputs.l2norm(k.float()).to(dtype)
    beta, g = _f32(inputs.beta, dtype), _f32(inputs.log_decay, dtype)
    # the gated norm: rsqrt(mean o^2 + eps) and the gate act(z) in float32, as the module computes them
    value_width = v_heads * dv
    gate = (inputs.gate_activation(inputs.z.float()).to(dtype) if inputs.z is not None
            else h.new_ones(batch, length, value_width))
    weight = inputs.norm_weight if inputs.norm_weight is not None else h.new_ones(dv)
    f = DeltaFactors(x=qkv[..., 2 * key_dim:], conv_out=conv_all[..., 2 * key_dim:],
                     conv_weight=conv_weight[2 * key_dim:],
                     conv_bias=None if conv_bias is None else conv_bias[2 * key_dim:],
                     q=q, k=k, beta=beta, log_decay=g, gate=gate,
                     norm_weight=weight.to(dtype).repeat(v_heads), norm_scale=None, attention=None, mask=mask)
    f.attention = delta_attention(q, k, beta, g, chunk_size)
    if core is None or core.numel() != batch * length * value_width:
        u = f.u.view(batch, length, v_heads, dv)
        core = torch.einsum("bhij,bjhp->bihp", f.attention, u)
    core = core.reshape(batch, length, v_heads, dv).float()
    f.norm_scale = torch.rsqrt(core.pow(2).mean(-1) + inputs.norm_eps).to(dtype)
    return f


def record_core(module: nn.Module, record: CapturedLayer):
    """Hook recording the recurrence's output (the input of the gated norm) as ``extra["core"]``."""
    norm = module.o_norm if hasattr(module, "o_norm") else module.norm

    def hook(_, args):
        record.extra["core"] = args[0].detach()
    return [norm.register_forward_pre_hook(hook)]


def read_factors(captured: CapturedLayer, dtype: torch.dtype) -> DeltaFactors:
    """``read_factors`` of the registry: :func:`delta_factors` with the recorded norm input."""
    return delta_factors(captured.module, captured.inputs, captured.attention_mask, dtype,
                         core=captured.extra.get("core"))
