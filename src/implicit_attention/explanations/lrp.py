"""LRP as gradient x input of a backward pass under the LRP rules: MambaLRP (Jafari et al. 2024) for
Mamba mixers, AttnLRP (Achtibat et al. 2024) for softmax attention and the Transformer blocks around it.

Every rule keeps the model's forward values and changes only the backward pass, so that
``embedding * gradient`` redistributes the score layer by layer and conserves it where the model
has no biases (``sum_t R_t == score``):

- **identity rule** through SiLU: ``silu(x) = x * sigmoid(x)`` with the sigmoid detached;
- **norms**: the RMS norm's scale ``rsqrt(mean(x^2) + eps)`` detached (a linear map of ``x``);
- **selective scan**: ``dt``, ``B``, ``C`` (so the discretised ``A`` and ``B``) detached, which makes
  the scan linear in its input ``u``: ``y = S(u) + D u``;
- **gate**: the product ``y * silu(z)`` halved between its factors (the uniform rule), written
  ``0.5 (y g) + 0.5 (y g).detach()`` for each factor's path;
- **attention** (AttnLRP): the products ``q k^T`` and ``P v`` by the uniform rule, the softmax by its
  own gradient (which is AttnLRP's softmax rule ``R_i = x_i (R_i - s_i sum_j R_j)`` in gradient x
  input form); LayerNorm's and RMSNorm's scales detached (the identity rule on the normalisation,
  LayerNorm's centring kept as the linear map it is); element-wise activations (GELU, SiLU, tanh)
  by the identity rule ``x * (act(x) / x).detach()``; a gated MLP's product by the uniform rule.
  Attention runs through an attention function registered with ``transformers``'
  ``AttentionInterface`` for the duration of the call (the model's own setting is restored).

Each rule is a forward hook that returns ``output.detach() + (r - r.detach())`` where ``r`` is a
recomputation of the module's output with the rule's detaches: the forward value is the module's
own, the gradient is the rule's. The recomputation is compared with the module's output, so a
module that computes something else is refused instead of explained with a wrong rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures.mamba.factors import jamba_factors, mamba_factors
from ..architectures.primitives import causal_conv, padding_mask
from ..architectures.registry import model_layers
from ..inputs import ModelInputs
from .target import Target

#: The token-mixing architectures (registry names) whose layers have an LRP rule here.
MIXER_RULES = {"mamba": mamba_factors, "jamba_mamba": jamba_factors}
#: Softmax attention, explained through the registered attention function.
ATTENTION_ARCHITECTURES = ("attention", "attention_gpt2", "attention_bert")
#: Model types explained end to end: every module with a non-linearity has a rule.
SUPPORTED_MODEL_TYPES = ("mamba", "falcon_mamba", "gpt2", "llama", "bert")
#: The name of the attention function with the AttnLRP rules.
ATTENTION_FUNCTION = "implicit_attention_lrp"
#: Element-wise activation modules (no parameters) that take the identity rule.
ACTIVATIONS = ("GELU", "SiLU", "Tanh", "ReLU", "GELUActivation", "NewGELUActivation", "FastGELUActivation",
               "QuickGELUActivation", "GELUTanh", "SiLUActivation", "PytorchGELUTanh", "AccurateGELUActivation")


def lrp_relevance(model: nn.Module, inputs: ModelInputs, target: Target) -> tuple[torch.Tensor, dict]:
    """``([B, L], {"conservation_delta": [B]})``: LRP relevance of each token for ``target``'s score."""
    refuse_unsupported(model)
    embeds = inputs.embed(model).detach().requires_grad_(True)
    with torch.enable_grad(), lrp_rules(model):
        logits = inputs.call(model, embeds).logits
        score = target.score(logits)
        (grad,) = torch.autograd.grad(score.sum(), embeds)
    with torch.no_grad():   # the rules change the backward only: the forward must be the model's own
        plain = inputs.call(model, embeds.detach()).logits
    # compared on the logits of the real tokens, at their scale: a contrast near zero would make any
    # rounding look large (padding positions' logits mean nothing and are left out)
    difference, scale = (plain - logits.detach()).abs(), plain.abs()
    if plain.dim() == 3 and inputs.attention_mask is not None:
        real = inputs.attention_mask.bool()
        difference, scale = difference[real], scale[real]
    gap = float(difference.max()) / (float(scale.max()) + 1e-30)
    if gap > (1e-6 if embeds.dtype == torch.float64 else 1e-3):
        raise RuntimeError(f"under the LRP rules {type(model).__name__} computes another score (relative "
                           f"difference {gap:.1e}): a module of this model has no faithful rule here")
    relevance = (grad.double() * embeds.detach().double()).sum(dim=-1)
    relevance = inputs.to_tokens(relevance)
    delta = score.detach().double() - relevance.sum(dim=-1)
    return relevance, {"conservation_delta": delta}


def supports_lrp(model: nn.Module) -> bool:
    """Whether every part of ``model`` with a non-linearity has an LRP rule here."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mixers = {arch.name for _, _, arch in model_layers(model)}
    return model_type in SUPPORTED_MODEL_TYPES and mixers <= set(MIXER_RULES) | set(ATTENTION_ARCHITECTURES)


def refuse_unsupported(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` unless :func:`supports_lrp`."""
    if not supports_lrp(model):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise NotImplementedError(
            f"method 'lrp' has rules for {', '.join(SUPPORTED_MODEL_TYPES)} models (MambaLRP, AttnLRP); "
            f"{type(model).__name__} (model type {model_type!r}) has layers without one: use 'grad_x_input', "
            "'integrated_gradients' or a matrix method")


@contextmanager
def lrp_rules(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s mixers, attention, norms, activations and gated MLPs backpropagate by
    the LRP rules (forward values unchanged)."""
    handles, inside_mixers = [], set()
    layers = model_layers(model)
    uses_attention = any(arch.name in ATTENTION_ARCHITECTURES for _, _, arch in layers)
    original = getattr(getattr(model, "config", None), "_attn_implementation", None)
    try:
        for _, module, arch in layers:
            if arch.name in MIXER_RULES:
                handles.append(module.register_forward_hook(_mixer_hook(MIXER_RULES[arch.name]), with_kwargs=True))
                # a mixer's own norms (on dt, B, C) feed detached factors: its recomputation covers them
                inside_mixers |= {id(m) for m in module.modules()}
        for module in model.modules():
            if id(module) in inside_mixers:
                continue
            kind = type(module).__name__
            if isinstance(module, nn.LayerNorm):
                handles.append(module.register_forward_hook(_layer_norm_hook))
            elif kind.endswith("RMSNorm") and hasattr(module, "weight"):
                handles.append(module.register_forward_hook(_rms_norm_hook))
            elif kind in ACTIVATIONS:
                handles.append(module.register_forward_hook(_identity_hook))
            elif all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                handles.append(module.register_forward_hook(_gated_mlp_hook))
        if uses_attention:
            _register_attention_function()
            model.set_attn_implementation(ATTENTION_FUNCTION)
        yield
    finally:
        for handle in handles:
            handle.remove()
        if uses_attention and original is not None:
            model.set_attn_implementation(original)


# ----------------------------------------------------------------------------------------- rules
def identity_silu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x)`` whose backward is the identity rule: ``x * sigmoid(x).detach()``."""
    return x * torch.sigmoid(x).detach()


def uniform_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` whose backward gives each factor half of the product's relevance (the uniform rule)."""
    product = a * b
    return 0.5 * product + 0.5 * product.detach()


def linear_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``[B, L, E]``: the selective scan with detached coefficients, differentiable in ``u`` only.

    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t h_t``, for ``u, dt [B, L, E]``,
    ``A [E, N]``, ``B, C [B, L, N]``: a linear map of ``u`` (its backward is the adjoint scan).
    """
    return _LinearScan.apply(u, dt.detach(), A.detach(), B.detach(), C.detach())


class _LinearScan(torch.autograd.Function):
    """The scan and its adjoint, so that autograd keeps ``[B, L, E]`` tensors instead of every state."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        ctx.save_for_backward(dt, A, B, C)
        state = u.new_zeros(u.shape[0], u.shape[2], A.shape[-1])                          # [B, E, N]
        out = []
        for t in range(u.shape[1]):
            state = torch.exp(dt[:, t, :, None] * A) * state + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
            out.append((state * C[:, t, None, :]).sum(dim=-1))
        return torch.stack(out, dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        dt, A, B, C = ctx.saved_tensors
        # adjoint: lam_t = C_t g_t + exp(dt_{t+1} A) lam_{t+1};  du_t = dt_t <B_t, lam_t>
        lam = grad_out.new_zeros(grad_out.shape[0], grad_out.shape[2], A.shape[-1])
        grad_u = torch.empty_like(grad_out)
        for t in reversed(range(grad_out.shape[1])):
            if t + 1 < grad_out.shape[1]:
                lam = torch.exp(dt[:, t + 1, :, None] * A) * lam
            lam = lam + grad_out[:, t, :, None] * C[:, t, None, :]
            grad_u[:, t] = dt[:, t] * (lam * B[:, t, None, :]).sum(dim=-1)
        return grad_u, None, None, None, None


def _same_value(recomputed: torch.Tensor, output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``output`` with ``recomputed``'s gradient, after checking that the two agree."""
    # float64 modules still round A, D and the scan input through float32
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-3}.get(output.dtype, 5e-2)
    scale = float(output.detach().abs().max()) + 1e-30
    error = float((recomputed.detach().to(output.dtype) - output.detach()).abs().max()) / scale
    if error > tolerance:
        raise NotImplementedError(f"the LRP rule for {type(module).__name__} recomputes its output with relative "
                                  f"error {error:.1e}: this module computes something else, and has no rule here")
    return output.detach() + (recomputed - recomputed.detach()).to(output.dtype)


def _rms_norm_hook(module: nn.Module, args, output):
    """``w * x * rsqrt(mean(x^2) + eps)`` with the scale detached."""
    x = args[0]
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    h = x if x.dtype == torch.float64 else x.float()   # at least float32, as the module; float64 kept
    scale = torch.rsqrt(h.detach().pow(2).mean(-1, keepdim=True) + eps)
    return _same_value(module.weight * (h * scale).to(x.dtype), output, module)


def _layer_norm_hook(module: nn.LayerNorm, args, output):
    """``(x - mean(x)) * rsqrt(var(x) + eps) * w + b`` with the scale detached (centring is linear)."""
    x = args[0]
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + module.eps)
    recomputed = centred * scale
    if module.weight is not None:
        recomputed = recomputed * module.weight
    if module.bias is not None:
        recomputed = recomputed + module.bias
    return _same_value(recomputed, output, module)


def _identity_hook(module: nn.Module, args, output):
    """The identity rule for an element-wise activation: ``x * (act(x) / x).detach()`` (0 where ``x = 0``)."""
    x = args[0]
    ratio = torch.where(x == 0, torch.zeros_like(output), output / torch.where(x == 0, torch.ones_like(x), x))
    return _same_value(x * ratio.detach(), output, module)


def _gated_mlp_hook(module: nn.Module, args, output):
    """``down(act(gate(x)) * up(x))`` with the product by the uniform rule (``act`` by its own hook)."""
    x = args[0]
    recomputed = module.down_proj(uniform_product(module.act_fn(module.gate_proj(x)), module.up_proj(x)))
    return _same_value(recomputed, output, module)


def lrp_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager softmax attention with AttnLRP's rules, for ``AttentionInterface``.

    ``query [B, H, Lq, D]``, ``key, value [B, Hkv, Lk, D]``; returns ``([B, Lq, H, D], P [B, H, Lq, Lk])``.
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("AttnLRP here covers plain softmax attention (no soft-capping, no sinks)")
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (0.5 * (query @ key.detach().transpose(-1, -2)) + 0.5 * (query.detach() @ key.transpose(-1, -2)))
    scores = scores * scaling
    length = key.shape[-2]
    if attention_mask is not None:
        mask = attention_mask[..., :length]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    elif getattr(module, "is_causal", False) and query.shape[-2] > 1:
        future = torch.ones(query.shape[-2], length, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = 0.5 * (probs @ value.detach()) + 0.5 * (probs.detach() @ value)
    return out.transpose(1, 2).contiguous(), probs


def _register_attention_function() -> None:
    """Register :func:`lrp_attention` (and the eager mask format it reads) with ``transformers``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if ATTENTION_FUNCTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_FUNCTION, lrp_attention)
        AttentionMaskInterface.register(ATTENTION_FUNCTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _linear(h: torch.Tensor, layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """``layer(h)`` with its parameters in ``dtype`` (differentiable in ``h``)."""
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(h, layer.weight.to(dtype), bias)


def _mixer_hook(factors_of):
    """A forward hook recomputing a Mamba mixer's output under the MambaLRP rules."""
    def hook(module: nn.Module, args, kwargs, output):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        attention_mask = kwargs.get("attention_mask")
        dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        factors = factors_of(module, hidden_states, attention_mask, dtype)     # detached dt, B, C, A, D
        mask = padding_mask(attention_mask, hidden_states).to(dtype)[..., None]
        h = hidden_states.to(dtype) * mask
        x, z = _linear(h, module.in_proj, dtype).chunk(2, dim=-1)
        c = causal_conv(x, factors.conv_weight, factors.conv_bias)       # the factors hold the taps in dtype
        u = identity_silu(c) * mask
        y = linear_scan(u, factors.dt, factors.A, factors.B, factors.C) + factors.D * u
        recomputed = _linear(uniform_product(y, identity_silu(z)), module.out_proj, dtype)
        return _same_value(recomputed, output, module)
    return hook


__all__ = ["ATTENTION_FUNCTION", "MIXER_RULES", "SUPPORTED_MODEL_TYPES", "identity_silu", "linear_scan", "lrp_attention",
           "lrp_relevance", "lrp_rules",
           "refuse_unsupported", "supports_lrp", "uniform_product"]
