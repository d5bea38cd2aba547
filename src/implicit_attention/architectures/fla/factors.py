"""Reading ``flash-linear-attention`` layers into the factors of our own architectures.

``fla`` (PyPI ``flash-linear-attention``) writes the same mixers as separate ``q_proj``, ``k_proj``,
``v_proj`` with one ``ShortConvolution`` (a depthwise causal ``nn.Conv1d`` with a SiLU) each, runs the
recurrences in Triton kernels in float32, and feeds a padded batch to them unpadded (one long
sequence, ``cu_seqlens``): the recorded norm input is then ``[1, T, H, Dv]``, which the delta-rule
factors recompute as ``A_h u`` instead (see :func:`..gated_deltanet.factors.delta_factors`).

- ``GatedDeltaNet``: ``beta = sigmoid(b)`` (doubled with ``allow_neg_eigval``),
  ``g = -exp(A_log) softplus(a + dt_bias)``, ``q, k`` L2-normalised as ``x / sqrt(sum x^2 + 1e-6)``,
  value heads ``num_v_heads`` sharing key heads ``num_heads``; ``o_norm`` a gated RMS norm
  (``FusedRMSNormGated``, SiLU or sigmoid gate) or a plain ``RMSNorm`` without ``use_gate``.
- ``DeltaNet``: the delta rule without decay (``g = 0``), ``beta = sigmoid(b)`` or 1 (``use_beta``);
  the default ``qk_activation="silu"``, ``qk_norm="l2"`` (others are refused).
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..gated_deltanet.factors import DeltaInputs, _f32, _l2norm_div

_GATES = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid}


def _short_convs(module: nn.Module, widths: tuple[int, ...], dtype: torch.dtype):
    """``(weight [sum widths, K], bias or None)`` of the q, k, v short convolutions as one conv; one tap
    of weight 1 (the identity) where the module has none."""
    if not getattr(module, "use_short_conv", False):
        return torch.ones(sum(widths), 1, dtype=dtype, device=module.q_proj.weight.device), None
    convs = (module.q_conv1d, module.k_conv1d, module.v_conv1d)
    for conv in convs:
        if conv.activation not in ("silu", "swish"):
            raise NotImplementedError(f"{type(module).__name__} with a short convolution activated by "
                                      f"{conv.activation!r}: only SiLU is written as a gate")
    weight = torch.cat([conv.weight.detach()[:, 0, :] for conv in convs]).to(dtype)
    bias = None if convs[0].bias is None else torch.cat([conv.bias.detach() for conv in convs]).to(dtype)
    return weight, bias


def _norm(module: nn.Module):
    """``(gate activation, weight or None, eps)`` of the output norm ``o_norm``."""
    norm = module.o_norm
    activation = getattr(norm, "activation", "swish")
    if activation not in _GATES:
        raise NotImplementedError(f"{type(module).__name__}: output gate {activation!r} is not written here")
    weight = getattr(norm, "weight", None)
    return _GATES[activation], None if weight is None else weight.detach(), norm.eps


def _projections(h: torch.Tensor, dtype: torch.dtype):
    """``lin(proj)``: the linear layer ``proj`` applied to ``h`` in ``dtype``."""
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    return lambda proj: F.linear(h, p(proj.weight), None if proj.bias is None else p(proj.bias))


def fla_gated_deltanet_inputs(module: nn.Module, h: torch.Tensor, dtype: torch.dtype) -> DeltaInputs:
    """:class:`~..gated_deltanet.factors.DeltaInputs` of ``fla.layers.GatedDeltaNet``."""
    lin = _projections(h, dtype)
    qkv = torch.cat([lin(module.q_proj), lin(module.k_proj), lin(module.v_proj)], dim=-1)
    weight, bias = _short_convs(module, (module.key_dim, module.key_dim, module.value_dim), dtype)
    beta = torch.sigmoid(lin(module.b_proj))
    if module.allow_neg_eigval:
        beta = beta * 2.0
    # the kernel's gate, in float32: -exp(A_log) * softplus(a + dt_bias)
    g = -torch.exp(module.A_log.detach().float()).to(dtype) * F.softplus(
        _f32(lin(module.a_proj), dtype) + module.dt_bias.detach().float().to(dtype))
    gate, norm_weight, eps = _norm(module)
    return DeltaInputs(qkv=qkv, z=lin(module.g_proj) if module.use_gate else None, beta=beta, log_decay=g[..., None],
                       conv_weight=weight, conv_bias=bias, k_heads=module.num_heads, v_heads=module.num_v_heads,
                       dk=module.head_k_dim, dv=module.head_v_dim, l2norm=_l2norm_div, gate_activation=gate,
                       norm_weight=norm_weight, norm_eps=eps)


def fla_deltanet_inputs(module: nn.Module, h: torch.Tensor, dtype: torch.dtype) -> DeltaInputs:
    """:class:`~..gated_deltanet.factors.DeltaInputs` of ``fla.layers.DeltaNet`` (no decay)."""
    if module.qk_activation != "silu" or module.qk_norm != "l2":
        raise NotImplementedError(f"DeltaNet with qk_activation={module.qk_activation!r} and qk_norm="
                                  f"{module.qk_norm!r}: only the default silu and l2 are written here")
    lin = _projections(h, dtype)
    qkv = torch.cat([lin(module.q_proj), lin(module.k_proj), lin(module.v_proj)], dim=-1)
    weight, bias = _short_convs(module, (module.key_dim, module.key_dim, module.value_dim), dtype)
    batch, length, _ = h.shape
    beta = torch.sigmoid(lin(module.b_proj)) if module.use_beta else h.new_ones(batch, length, module.num_heads)
    if module.allow_neg_eigval:
        beta = beta * 2.0
    gate, norm_weight, eps = _norm(module)
    return DeltaInputs(qkv=qkv, z=lin(module.g_proj) if module.use_gate else None, beta=beta,
                       log_decay=h.new_zeros(batch, length, module.num_heads, 1), conv_weight=weight, conv_bias=bias,
                       k_heads=module.num_heads, v_heads=module.num_heads, dk=module.head_k_dim,
                       dv=module.head_v_dim, l2norm=_l2norm_div, gate_activation=gate, norm_weight=norm_weight,
                       norm_eps=eps)


def _short_conv_qkv(module: nn.Module, q, k, v, dtype: torch.dtype):
    """``q, k, v`` through the module's SiLU short convolutions, when it has them."""
    from ..primitives import causal_conv

    if not module.use_short_conv:
        return q, k, v
    convs = (module.q_conv1d, module.k_conv1d, module.v_conv1d)
    if any(conv.activation not in ("silu", "swish") for conv in convs):
        raise NotImplementedError(f"{type(module).__name__} with a short convolution not activated by SiLU")
    return tuple(F.silu(causal_conv(x, conv.weight.detach()[:, 0, :].to(dtype),
                                    None if conv.bias is None else conv.bias.detach().to(dtype)))
                 for x, conv in zip((q, k, v), convs))


def _masked_qkv(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                dtype: torch.dtype):
    """``(h, mask, lin, (q, k, v))``: the input in ``dtype`` with padding zeroed, the padding mask, the
    projection helper, and ``q, k, v`` ``[B, L, width]`` after the module's short convolutions."""
    from ..primitives import padding_mask

    h = hidden_states.detach().to(dtype)
    mask = padding_mask(attention_mask, h)
    h = h * mask[..., None]
    lin = _projections(h, dtype)
    return h, mask, lin, _short_conv_qkv(module, lin(module.q_proj), lin(module.k_proj), lin(module.v_proj), dtype)


def _rms_norm_weight(module: nn.Module, norm: nn.Module, width: int, like: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """``[width]`` the RMS norm's weight in ``dtype`` (ones without one); a non-zero bias is refused."""
    bias = getattr(norm, "bias", None)
    if bias is not None and bool(bias.detach().any()):
        raise NotImplementedError(f"{type(module).__name__} with an RMS norm bias is not written here")
    weight = getattr(norm, "weight", None)
    return like.new_ones(width) if weight is None else weight.detach().to(dtype)


def _fused_norm_eps(module: nn.Module) -> float:
    """The eps of fla's fused ``rms_norm_linear`` as the module's forward calls it (without the norm's own eps:
    that function's default applies)."""
    fused = getattr(sys.modules[type(module).__module__], "rms_norm_linear")
    return inspect.signature(fused).parameters["eps"].default


def _head_gated(module: nn.Module, h: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, q, k, v, log_alpha):
    """:class:`~..gla.operator.GLAFactors` from per-head ``q [B, L, H, K]`` (scaled here by ``K^-1/2``),
    ``k``, ``log_alpha [B, L, H, K]`` and ``v [B, L, H, V]``, with the output side fla's GLA and RetNet share:
    a per-head RMS norm (no centring, no bias) and an output gate (``swish`` when fused with the norm)."""
    from ...models.gla.modeling_gla import chunked_gla  # lazy: the model package registers Auto classes
    from ..gla.operator import GLAFactors
    from ..heads import head_norm_scale

    batch, length, heads, _ = q.shape
    q = q * module.head_k_dim ** -0.5
    k = k * mask[:, :, None, None]                        # padding never enters the state (fla drops it)
    v = v * mask[:, :, None, None]
    y = chunked_gla(q, k, v, log_alpha, 64)
    if module.use_output_gate:
        g = _projections(h, dtype)(module.g_proj)
        gate = F.silu(g) if module.fuse_norm_and_gate else module.gate_fn(g)
    else:
        gate = h.new_ones(batch, length, heads * module.head_v_dim)
    norm = module.g_norm_swish_gate if module.fuse_norm_and_gate else module.g_norm
    weight = _rms_norm_weight(module, norm, module.head_v_dim, h, dtype)
    return GLAFactors(v=v, gate=gate, norm_scale=head_norm_scale(y, norm.eps, centred=False),
                      norm_weight=weight.repeat(heads), norm_bias=h.new_zeros(heads * module.head_v_dim), mask=mask,
                      centred=False, q=q, k=k, log_alpha=log_alpha)


def fla_gla_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                    dtype: torch.dtype):
    """:class:`~..gla.operator.GLAFactors` of ``fla.layers.GatedLinearAttention``.

    As our GLA, with: keys, decays and values shared by ``num_kv_groups`` query heads; optional short
    convolutions (SiLU) on ``q, k, v``, whose outputs are the values (the conv is not folded into the
    matrices); an optional feature map on ``q, k``; the decay clamped below by ``clamp_min``; and a
    per-head RMS norm (no centring, no bias) before the output gate (``swish`` when fused).
    """
    h, mask, lin, (q, k, v) = _masked_qkv(module, hidden_states, attention_mask, dtype)
    batch, length, _ = h.shape
    low, up = module.gk_proj
    gk = F.linear(lin(low), up.weight.detach().to(dtype), None if up.bias is None else up.bias.detach().to(dtype))
    heads, groups = module.num_heads, module.num_kv_groups
    split = lambda x, d: x.view(batch, length, -1, d).repeat_interleave(groups, dim=2)  # noqa: E731
    q = q.view(batch, length, heads, module.head_k_dim)
    k, gk, v = split(k, module.head_k_dim), split(gk, module.head_k_dim), split(v, module.head_v_dim)
    log_alpha = F.logsigmoid(gk) / module.gate_logit_normalizer
    if module.clamp_min is not None:
        log_alpha = log_alpha.clamp_min(module.clamp_min)
    if module.feature_map_fn is not None:
        q, k = module.feature_map_fn(q), module.feature_map_fn(k)
    return _head_gated(module, h, mask, dtype, q, k, v, log_alpha)


def _rotary(rotary: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``fla``'s non-interleaved rotary embedding of ``x [B, L, H, K]`` at ``positions [B, L]`` (float32 angles)."""
    if rotary.scale_base is not None or rotary.interleaved:
        raise NotImplementedError("an xPos (scale_base) or interleaved rotary embedding is not written here")
    inv_freq = rotary._compute_inv_freq(device=x.device)                                 # [R/2], float32
    angles = positions.float()[..., None] * inv_freq                                    # [B, L, R/2]
    cos, sin = (t.to(x.dtype).repeat(1, 1, 2)[:, :, None] for t in (angles.cos(), angles.sin()))
    rotated = x[..., :rotary.dim]
    half = rotated.shape[-1] // 2
    turned = torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1)
    return torch.cat([rotated * cos + turned * sin, x[..., rotary.dim:]], dim=-1)


def fla_retnet_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                       dtype: torch.dtype):
    """:class:`~..gla.operator.GLAFactors` of ``fla.layers.MultiScaleRetention`` (RetNet): GLA with the fixed
    decay ``gamma_h = 1 - 2^(-5 - h)`` of head ``h`` on every key dim, rotary embeddings on ``q, k`` (each
    sequence's positions counted from its first real token, as fla's unpadded batch does), keys and
    values shared by ``num_kv_groups`` query heads, and fla's RMS-normed, gated output."""
    h, mask, _, (q, k, v) = _masked_qkv(module, hidden_states, attention_mask, dtype)
    batch, length, _ = h.shape
    heads, groups = module.num_heads, module.num_kv_groups
    q = q.view(batch, length, heads, module.head_k_dim)
    k = k.view(batch, length, -1, module.head_k_dim)
    if module.feature_map_fn is not None:
        q, k = module.feature_map_fn(q), module.feature_map_fn(k)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    q, k = _rotary(module.rotary, q, positions), _rotary(module.rotary, k, positions)
    k = k.repeat_interleave(groups, dim=2)
    v = v.view(batch, length, -1, module.head_v_dim).repeat_interleave(groups, dim=2)
    gamma = (1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float32, device=h.device))).log().to(dtype)
    log_alpha = gamma[None, None, :, None].expand(batch, length, heads, module.head_k_dim)
    return _head_gated(module, h, mask, dtype, q, k, v, log_alpha)


def fla_hgrn_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                     lower_bound: torch.Tensor | None, dtype: torch.dtype):
    """:class:`~..hgrn.operator.HGRNFactors` of ``fla.layers.HGRNAttention``.

    As our HGRN (``h_t = f_t h_{t-1} + (1 - f_t) silu(c_t)``, the forget gate lower-bounded by the model's
    ``lower_bound`` from the second layer on), with fla's differences: the optional short convolutions
    (no activation) run on both the input and the forget branch, and the output is ``RMSNorm(h) w silu(g)``
    (the swish gate after the norm, not a sigmoid gate inside it).
    """
    from ...models.hgrn.modeling_hgrn import chunked_scan  # lazy: the model package registers Auto classes
    from ..hgrn.operator import HGRNFactors
    from ..primitives import causal_conv, padding_mask

    h = hidden_states.detach().to(dtype)
    mask = padding_mask(attention_mask, h)
    lin = _projections(h, dtype)
    x = lin(module.i_proj) * mask[..., None]
    z = lin(module.f_proj) * mask[..., None]
    conv_out, conv_weight, conv_bias = x, None, None
    if module.use_short_conv:
        conv = lambda t, c: causal_conv(t, c.weight.detach()[:, 0, :].to(dtype),  # noqa: E731
                                        None if c.bias is None else c.bias.detach().to(dtype))
        if module.i_conv1d.activation is not None or module.f_conv1d.activation is not None:
            raise NotImplementedError("HGRNAttention with activated short convolutions is not written here")
        conv_weight = module.i_conv1d.weight.detach()[:, 0, :].to(dtype)
        conv_bias = None if module.i_conv1d.bias is None else module.i_conv1d.bias.detach().to(dtype)
        conv_out, z = conv(x, module.i_conv1d), conv(z, module.f_conv1d)
    bound = 0.0 if lower_bound is None or not module.layer_idx else lower_bound.detach().to(dtype)
    forget = bound + (1 - bound) * torch.sigmoid(z)
    one_minus_f = (1 - bound) * torch.sigmoid(-z)
    state = chunked_scan(torch.log(forget), one_minus_f * F.silu(conv_out) * mask[..., None], 64)
    norm = module.g_norm
    weight = getattr(norm, "weight", None)
    weight = h.new_ones(module.input_dim) if weight is None else weight.detach().to(dtype)
    return HGRNFactors(x=x, conv_out=conv_out, conv_weight=conv_weight, conv_bias=conv_bias, forget=forget,
                       one_minus_f=one_minus_f, out_gate=F.silu(lin(module.g_proj)),
                       norm_scale=torch.rsqrt(state.pow(2).mean(-1) + norm.eps), norm_weight=weight, mask=mask)


def fla_hgrn2_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                      lower_bound: torch.Tensor | None, dtype: torch.dtype):
    """:class:`~..gla.operator.GLAFactors` of ``fla.layers.HGRN2Attention``.

    HGRN2 is GLA with tied keys: per head, ``S_t = Diag(f_t) S_{t-1} + (1 - f_t) i_t^T`` and
    ``o_t = S_t^T swish(q_t) / sqrt(K)``, with ``log f = logsigmoid(f_proj h)`` (lower-bounded from the
    second layer on, as HGRN: ``log(b + (1 - b) f)``), optional short convolutions (no activation) on
    ``q, f, i``; then one RMS norm over every head's channels (a row scale per token, the same for all
    heads) and the output projection, which fla applies in one fused call (``rms_norm_linear``, with
    that function's default eps, not the norm module's): the layer is captured at its output and
    decomposed through ``o_proj`` (``projection``).
    """
    from ...models.gla.modeling_gla import chunked_gla  # lazy: the model package registers Auto classes
    from ..gla.operator import GLAFactors
    from ..primitives import causal_conv, padding_mask

    h = hidden_states.detach().to(dtype)
    mask = padding_mask(attention_mask, h)
    h = h * mask[..., None]
    lin = _projections(h, dtype)
    q, f, i = lin(module.q_proj), lin(module.f_proj), lin(module.i_proj)
    if module.use_short_conv:
        convs = (module.q_conv1d, module.f_conv1d, module.i_conv1d)
        if any(conv.activation is not None for conv in convs):
            raise NotImplementedError("HGRN2Attention with activated short convolutions is not written here")
        q, f, i = (causal_conv(x, conv.weight.detach()[:, 0, :].to(dtype),
                               None if conv.bias is None else conv.bias.detach().to(dtype))
                   for x, conv in zip((q, f, i), convs))
    log_forget = F.logsigmoid(f)
    if lower_bound is not None and module.layer_idx:
        bound = lower_bound.detach().to(dtype)
        log_forget = torch.logaddexp(bound.log(), torch.log1p(-bound) + log_forget)
    batch, length, _ = h.shape
    heads, key_dim, value_dim = module.num_heads, module.head_f_dim, module.head_i_dim
    by_head = lambda x, d: x.reshape(batch, length, heads, d)  # noqa: E731
    padding = mask[:, :, None, None]
    q = by_head(F.silu(q), key_dim) * key_dim ** -0.5
    k = by_head(1 - log_forget.exp(), key_dim) * padding          # padding never enters the state
    log_alpha = by_head(log_forget, key_dim)
    v = by_head(i, value_dim) * padding
    y = chunked_gla(q, k, v, log_alpha, 64)                       # [B, L, H, V], for the norm's scale
    weight = _rms_norm_weight(module, module.g_norm, heads * value_dim, h, dtype)
    scale = torch.rsqrt(y.flatten(2).pow(2).mean(-1) + _fused_norm_eps(module))   # [B, L]: one norm over all heads
    return GLAFactors(v=v, gate=h.new_ones(batch, length, heads * value_dim),
                      norm_scale=scale[..., None].expand(batch, length, heads), norm_weight=weight,
                      norm_bias=h.new_zeros(heads * value_dim), mask=mask, centred=False, q=q, k=k,
                      log_alpha=log_alpha)


def _slot_scores(q: torch.Tensor, k: torch.Tensor, slots: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """``[B, L, H, M]`` GSA's first pass, ``o_i[m] = sum_{j <= i} (q_i . k_j) s_j[m] prod_{j < t <= i} f_t[m]``
    (a decay on the slots, the first pass's values), by a scan over the tokens (the queries of the
    second pass are its softmax: data, computed once)."""
    batch, length, heads, key_dim = q.shape
    state = q.new_zeros(batch, heads, key_dim, slots.shape[-1])
    out = q.new_empty(batch, length, heads, slots.shape[-1])
    for t in range(length):
        state = state * log_decay[:, t, :, None, :].exp() + k[:, t, :, :, None] * slots[:, t, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkm->bhm", q[:, t], state)
    return out


def fla_gsa_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                    dtype: torch.dtype):
    """:class:`~..gla.operator.GLAFactors` of ``fla.layers.GatedSlotAttention`` (GSA).

    Two chained gated recurrences over ``M`` slots per head, ``s = 1 - f`` with
    ``log f = logsigmoid(f_proj h) / gate_logit_normalizer``: the first,
    ``o1_i[m] = sum_j (q_i . k_j) s_j[m] prod f[m]`` (:func:`_slot_scores`), is read off the keys only; its
    softmax over the slots, ``qv``, is the query of the second, ``o_i = sum_j (qv_i . s_j prod f) v_j``, a GLA
    over the slots that is linear in the values ``v = silu(v_proj h)``. The output
    ``rms_norm_linear(silu(o))`` adds the row scales ``sigmoid(o)`` (SiLU as ``o sigmoid(o)``) and one RMS
    norm over all heads (with the fused function's default eps), then the projection through which the
    layer is decomposed, as HGRN2's.
    """
    from ...models.gla.modeling_gla import chunked_gla  # lazy: the model package registers Auto classes
    from ..gla.operator import GLAFactors

    maps = {"SwishFeatureMap": F.silu, "ReLUFeatureMap": F.relu}
    feature_map = None
    if module.feature_map is not None:
        if type(module.feature_map).__name__ not in maps:
            raise NotImplementedError(f"GatedSlotAttention with the feature map {type(module.feature_map).__name__} "
                                      "is not written here (swish and relu are)")
        feature_map = maps[type(module.feature_map).__name__]
    h, mask, lin, (q, k, v) = _masked_qkv(module, hidden_states, attention_mask, dtype)
    batch, length, _ = h.shape
    heads, groups, slots = module.num_heads, module.num_kv_groups, module.num_slots
    key_dim, value_dim = module.head_k_dim, module.head_v_dim
    repeat = lambda x, d: x.reshape(batch, length, -1, d).repeat_interleave(groups, dim=2)  # noqa: E731
    q = q.reshape(batch, length, heads, key_dim)
    k = repeat(k, key_dim)
    if feature_map is not None:
        q, k = feature_map(q), feature_map(k)
    padding = mask[:, :, None, None]
    k = k * padding                                               # padding never enters the states
    v = repeat(F.silu(v), value_dim) * padding
    log_forget = repeat(F.logsigmoid(lin(module.f_proj)) / module.gate_logit_normalizer, slots)
    s = (1 - log_forget.exp()) * padding
    scale = key_dim ** -0.5 if module.scale is None else module.scale
    queries = _slot_scores(q * scale, k, s, log_forget).softmax(-1)            # [B, L, H, M]
    y = chunked_gla(queries, s, v, log_forget, 64)                            # [B, L, H, V]
    gate = torch.sigmoid(y).flatten(2)                                        # silu(y) = y sigmoid(y)
    weight = _rms_norm_weight(module, module.g_norm, heads * value_dim, h, dtype)
    normed = torch.rsqrt((y.flatten(2) * gate).pow(2).mean(-1) + _fused_norm_eps(module))  # over silu(y), all heads
    return GLAFactors(v=v, gate=gate, norm_scale=normed[..., None].expand(batch, length, heads), norm_weight=weight,
                      norm_bias=h.new_zeros(heads * value_dim), mask=mask, centred=False, q=queries, k=s,
                      log_alpha=log_forget)


def fla_rwkv6_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                      dtype: torch.dtype):
    """:class:`~..rwkv6.operator.Rwkv6Factors` of ``fla.layers.RWKV6Attention``.

    fla's parametrisation of the data-dependent token shift (one shared LoRA ``x_proj`` plus ``x_bias``
    giving the five mixing offsets, then ``DDLerpLinear`` projections, a LoRA for the decay) is run with
    the module's own submodules on the masked input and its token shift (zero before the first token, as
    fla's masked batch has it); the recurrence, bonus, group norm and gate are RWKV-6's.
    """
    from ..primitives import masked_input
    from ..rwkv6.factors import token_shift
    from ..rwkv6.operator import Rwkv6Factors

    norm = module.g_norm
    if getattr(norm, "is_rms_norm", False):
        raise NotImplementedError("RWKV6Attention with an RMS group norm is not written here")
    x, mask = masked_input(hidden_states, attention_mask, dtype)
    batch, length, width = x.shape
    model_dtype = module.o_proj.weight.dtype
    with torch.no_grad():                       # the module's own LoRA and lerp projections, in its dtype
        xm = x.to(model_dtype)
        delta = token_shift(xm) - xm
        mix = module.x_proj[0](xm, delta).view(batch, length, -1, module.proj_low_rank_dim)
        mix = torch.einsum("btnr,hnr->btnh", module.x_proj[1](mix), module.x_proj[2].weight.view(width, 5, -1))
        r, w, k, v, g = (mix + module.x_bias).unbind(-2)
        r, w, k, v, g = (proj(xm, mu, delta) for proj, mu in zip(
            (module.r_proj, module.w_proj, module.k_proj, module.v_proj, module.g_proj), (r, w, k, v, g)))
    heads = module.num_heads
    cast = lambda t, d: t.to(dtype).view(batch, length, heads, d)  # noqa: E731
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    return Rwkv6Factors(r=cast(r, module.head_k_dim), k=cast(k, module.head_k_dim),
                        v=cast(v, module.head_v_dim) * mask[:, :, None, None],
                        log_w=-torch.exp(cast(w, module.head_k_dim)), u=module.bonus.detach().to(dtype),
                        gate=module.gate_fn(g.to(dtype)),
                        gn_weight=x.new_ones(module.value_dim) if weight is None else weight.detach().to(dtype),
                        gn_bias=x.new_zeros(module.value_dim) if bias is None else bias.detach().to(dtype),
                        gn_eps=norm.eps, mask=mask)


def fla_rwkv7_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                      v_first: torch.Tensor | None, dtype: torch.dtype):
    """:class:`~..rwkv7.operator.Rwkv7Factors` of ``fla.layers.RWKV7Attention``.

    fla's parametrisation (LoRA modules ``w_lora``, ``v_lora``, ``a_lora``, ``g_lora``, run as the module's
    own submodules in its dtype) of RWKV-7: log-decay ``w = -e^{-1/2} sigmoid(w_lora(x_w))``, the value
    residual ``lerp(v, v_first, sigmoid(v_lora(x_v)))`` from the second layer on (``v_first`` is the first
    layer's values, passed by the model), ``k`` scaled by ``1 + (a - 1) k_a``, the delta rule with
    ``alpha = -kk``, ``beta = kk a``, the group norm, the bonus ``(r k r_k) v`` and the gate.
    """
    from ..primitives import masked_input
    from ..rwkv6.factors import token_shift
    from ..rwkv7.operator import Rwkv7Factors

    x, mask = masked_input(hidden_states, attention_mask, dtype)
    batch, length, _ = x.shape
    heads, dk, dv = module.num_heads, module.head_dim, module.head_v_dim
    model_dtype = module.o_proj.weight.dtype
    with torch.no_grad():                       # the module's own projections and LoRAs, in its dtype
        xm = x.to(model_dtype)
        delta = token_shift(xm) - xm
        xr, xw, xk, xv, xa, xg = (xm + delta * mu for mu in (module.x_r, module.x_w, module.x_k, module.x_v,
                                                             module.x_a, module.x_g))
        r, k, v = module.r_proj(xr), module.k_proj(xk), module.v_proj(xv)
        log_w = -0.6065306597126334 * module.w_lora(xw).sigmoid()
        if module.layer_idx > 0:
            if v_first is None:
                raise ValueError(f"RWKV7Attention layer {module.layer_idx} was called without v_first")
            v = torch.lerp(v, v_first.to(model_dtype), module.v_lora(xv).sigmoid())
        a = module.a_lora(xa).sigmoid()
        g = module.g_lora(xg)
    r, k, v, log_w, a, g = (t.to(dtype) for t in (r, k, v, log_w, a, g))
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    kk = F.normalize((k * p(module.k_k)).view(batch, length, heads, dk), dim=-1, p=2.0)
    k = (k * (1 + (a - 1) * p(module.k_a))).view(batch, length, heads, dk)
    r = r.view(batch, length, heads, dk)
    a = a.view(batch, length, heads, dk)
    bonus = (r * k * p(module.r_k)).sum(-1)
    norm = module.g_norm
    return Rwkv7Factors(r=r, k=k, v=(v * mask[..., None]).view(batch, length, heads, dv),
                        log_w=log_w.view(batch, length, heads, dk), alpha=-kk, beta=kk * a, bonus=bonus, gate=g,
                        gn_weight=p(norm.weight), gn_bias=p(norm.bias), gn_eps=norm.eps, mask=mask)
