"""LRP as gradient x input of a backward pass under the LRP rules (MambaLRP, Jafari et al. 2024).

Every rule keeps the model's forward values and changes only the backward pass, so that
``embedding * gradient`` redistributes the score layer by layer and conserves it where the model
has no biases (``sum_t R_t == score``):

- **identity rule** through SiLU: ``silu(x) = x * sigmoid(x)`` with the sigmoid detached;
- **norms**: the RMS norm's scale ``rsqrt(mean(x^2) + eps)`` detached (a linear map of ``x``);
- **selective scan**: ``dt``, ``B``, ``C`` (so the discretised ``A`` and ``B``) detached, which makes
  the scan linear in its input ``u``: ``y = S(u) + D u``;
- **gate**: the product ``y * silu(z)`` halved between its factors (the uniform rule), written
  ``0.5 (y g) + 0.5 (y g).detach()`` for each factor's path.

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
#: Model types explained end to end: every module with a non-linearity has a rule.
SUPPORTED_MODEL_TYPES = ("mamba", "falcon_mamba")


def lrp_relevance(model: nn.Module, inputs: ModelInputs, target: Target) -> tuple[torch.Tensor, dict]:
    """``([B, L], {"conservation_delta": [B]})``: LRP relevance of each token for ``target``'s score."""
    refuse_unsupported(model)
    embeds = inputs.embed(model).detach().requires_grad_(True)
    with torch.enable_grad(), lrp_rules(model):
        score = target.score(inputs.call(model, embeds).logits)
        (grad,) = torch.autograd.grad(score.sum(), embeds)
    relevance = (grad.double() * embeds.detach().double()).sum(dim=-1)
    relevance = inputs.to_tokens(relevance)
    delta = score.detach().double() - relevance.sum(dim=-1)
    return relevance, {"conservation_delta": delta}


def supports_lrp(model: nn.Module) -> bool:
    """Whether every part of ``model`` with a non-linearity has an LRP rule here."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mixers = {arch.name for _, _, arch in model_layers(model)}
    return model_type in SUPPORTED_MODEL_TYPES and mixers <= set(MIXER_RULES)


def refuse_unsupported(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` unless :func:`supports_lrp`."""
    if not supports_lrp(model):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise NotImplementedError(
            f"method 'lrp' has rules for {', '.join(SUPPORTED_MODEL_TYPES)} models (MambaLRP); "
            f"{type(model).__name__} (model type {model_type!r}) has layers without one: use 'grad_x_input', "
            "'integrated_gradients' or a matrix method")


@contextmanager
def lrp_rules(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s Mamba mixers and RMS norms backpropagate by the LRP rules."""
    handles, inside_mixers = [], set()
    try:
        for _, module, arch in model_layers(model):
            if arch.name in MIXER_RULES:
                handles.append(module.register_forward_hook(_mixer_hook(MIXER_RULES[arch.name]), with_kwargs=True))
                # a mixer's own norms (on dt, B, C) feed detached factors: its recomputation covers them
                inside_mixers |= {id(m) for m in module.modules()}
        for module in model.modules():
            if id(module) not in inside_mixers and type(module).__name__.endswith("RMSNorm") \
                    and hasattr(module, "weight"):
                handles.append(module.register_forward_hook(_rms_norm_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    h = x.float()
    scale = torch.rsqrt(h.detach().pow(2).mean(-1, keepdim=True) + eps)
    return _same_value(module.weight * (h * scale).to(x.dtype), output, module)


def _mixer_hook(factors_of):
    """A forward hook recomputing a Mamba mixer's output under the MambaLRP rules."""
    def hook(module: nn.Module, args, kwargs, output):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        attention_mask = kwargs.get("attention_mask")
        dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        factors = factors_of(module, hidden_states, attention_mask, dtype)     # detached dt, B, C, A, D
        mask = padding_mask(attention_mask, hidden_states).to(dtype)[..., None]
        h = hidden_states.to(dtype) * mask
        weight = module.in_proj.weight.to(dtype)
        bias = None if module.in_proj.bias is None else module.in_proj.bias.to(dtype)
        x, z = F.linear(h, weight, bias).chunk(2, dim=-1)
        conv_bias = None if module.conv1d.bias is None else module.conv1d.bias.to(dtype)
        c = causal_conv(x, module.conv1d.weight.to(dtype)[:, 0, :], conv_bias)
        u = identity_silu(c) * mask
        y = linear_scan(u, factors.dt, factors.A, factors.B, factors.C) + factors.D * u
        gated = uniform_product(y, identity_silu(z))
        out_bias = None if module.out_proj.bias is None else module.out_proj.bias.to(dtype)
        recomputed = F.linear(gated, module.out_proj.weight.to(dtype), out_bias)
        return _same_value(recomputed, output, module)
    return hook


__all__ = ["MIXER_RULES", "SUPPORTED_MODEL_TYPES", "identity_silu", "linear_scan", "lrp_relevance", "lrp_rules",
           "refuse_unsupported", "supports_lrp", "uniform_product"]
