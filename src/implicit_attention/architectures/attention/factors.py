"""Reading softmax attention modules: ``q, k, v`` per class, the call's mask and rotary embeddings.

``q, k, v`` come from the module's own projections run on the captured input (in the model's
dtype, as its forward does): a fused ``c_attn`` for GPT-2, ``query``/``key``/``value`` for BERT,
``q_proj``/``k_proj``/``v_proj`` for Llama-style modules (with Falcon-H1's ``key_multiplier`` and
Zamba2's LoRA adapters chosen by ``layer_idx``), and RecurrentGemma's local attention, which
rotates ``q, k`` with its own rotary embedding of the call's ``position_ids``. Rotary embeddings
passed as ``position_embeddings`` are applied with the model file's own ``apply_rotary_pos_emb``.
The probabilities are recomputed from these (the user need not reload the model with
``attn_implementation="eager"``); the exactness check of :func:`~implicit_attention.decompose`
verifies them against the module's real output.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..registry import CapturedLayer
from .operator import AttentionFactors, additive_mask, repeat_kv, split_heads, token_mask


def record_arguments(module: nn.Module, record: CapturedLayer) -> list:
    """Extra hook: bind every call's arguments to ``module.forward``'s signature.

    Stores ``record.extra["arguments"]`` (named parameters, tensors detached; the module's
    ``**kwargs`` under ``"**"``), since some modules get the mask positionally (ViT,
    GraniteMoeHybrid) and ``CapturedLayer.kwargs`` holds keyword arguments only.
    """
    signature = inspect.signature(module.forward)

    def hook(mod, args, kwargs):
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # a signature we cannot bind: keep what was passed by keyword
            bound = dict(kwargs)
        named, rest = {}, {}
        for key, value in bound.items():
            param = signature.parameters.get(key)
            if param is not None and param.kind is inspect.Parameter.VAR_KEYWORD:
                rest.update(value)
            else:
                named[key] = value
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else (  # noqa: E731
            type(v)(x.detach() if isinstance(x, torch.Tensor) else x for x in v) if isinstance(v, tuple) else v)
        record.extra["arguments"] = {**{k: detach(v) for k, v in named.items()},
                                     "**": {k: detach(v) for k, v in rest.items()}}
    return [module.register_forward_pre_hook(hook, with_kwargs=True)]


def _no_cross_attention(module: nn.Module, args: dict) -> None:
    if getattr(module, "is_cross_attention", False) or args.get("encoder_hidden_states") is not None:
        raise NotImplementedError(f"{type(module).__name__}: cross-attention is not an implicit attention "
                                  "over the input tokens; only self-attention layers are decomposed")


def gpt2_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``GPT2Attention``: one fused ``c_attn`` (``Conv1D``), split into ``q, k, v``."""
    _no_cross_attention(module, args)
    q, k, v = module.c_attn(h).split(module.split_size, dim=2)
    return tuple(split_heads(t, module.head_dim) for t in (q, k, v))


def bert_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``BertSelfAttention`` (and the pre-5.x ``ViTSelfAttention``): ``query``, ``key``, ``value``."""
    _no_cross_attention(module, args)
    size = module.attention_head_size
    return tuple(split_heads(layer(h), size) for layer in (module.query, module.key, module.value))


def projection_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """Llama-style ``q_proj``, ``k_proj``, ``v_proj`` (Llama, ViT, DeiT and the hybrids' attention)."""
    q, k, v = module.q_proj(h), module.k_proj(h), module.v_proj(h)
    if getattr(module.config, "use_shared_attention_adapter", False) and hasattr(module, "linear_q_adapter_list"):
        # Zamba2: per-call LoRA adapters of the shared block, chosen by the call's layer_idx
        slot = module.layer_dic[args["layer_idx"]]
        q = q + module.linear_q_adapter_list[slot](h)
        k = k + module.linear_k_adapter_list[slot](h)
        v = v + module.linear_v_adapter_list[slot](h)
    q, k, v = (split_heads(t, module.head_dim) for t in (q, k, v))
    if hasattr(module, "key_multiplier"):  # Falcon-H1 scales the keys before the rotary embedding
        k = k * module.key_multiplier
    return q, k, v


def _qk_norm(module: nn.Module, names: tuple[str, ...], x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x [B, L, n * D]`` through the module's query or key RMS norm, if it has one: per head (weight of
    size ``D``: Qwen3-Next, LFM2, LFM3, Lara) or over all heads at once (OLMo-Hybrid)."""
    norm = next((getattr(module, name) for name in names if getattr(module, name, None) is not None), None)
    if norm is None:
        return x
    if norm.weight.shape[-1] == head_dim:
        return norm(x.unflatten(-1, (-1, head_dim))).flatten(-2)
    return norm(x)


def gated_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """Llama-style ``q_proj``/``k_proj``/``v_proj`` with the hybrids' additions, each where the module has it.

    - Qwen3-Next, Qwen3.5 (dense and MoE), Qwen4-Exp: ``q_proj`` gives ``2 D`` per head, the query and an
      output gate; the gate is ``sigmoid`` of it, one per channel, applied before ``o_proj``.
    - LFM3: ``g_proj`` gives one gate per head, ``sigmoid(g_proj(h))`` on all ``D`` channels of the head.
    - RMS norms on ``q`` and ``k`` (``q_norm``/``k_norm``, LFM2's ``q_layernorm``/``k_layernorm``), per head
      or over all heads (OLMo-Hybrid), before the rotary embedding.
    - Rotary embeddings (partial for Qwen3-Next) by the model file's ``apply_rotary_pos_emb``, skipped
      where the call gets none (OLMo-Hybrid's and Lara's NoPE layers).
    """
    size = module.head_dim
    q = module.q_proj(h)
    extra = {}
    heads = module.k_proj.out_features // size * module.num_key_value_groups
    if q.shape[-1] == 2 * heads * size:  # query and output gate interleaved per head
        q, gate = q.unflatten(-1, (heads, 2 * size)).chunk(2, dim=-1)
        q, extra["gate"] = q.flatten(-2), torch.sigmoid(gate.flatten(-2))
    if getattr(module, "g_proj", None) is not None:  # one gate per head
        extra["gate"] = torch.sigmoid(module.g_proj(h)).repeat_interleave(size, dim=-1)
    q = _qk_norm(module, ("q_norm", "q_layernorm"), q, size)
    k = _qk_norm(module, ("k_norm", "k_layernorm"), module.k_proj(h), size)
    q, k, v = (split_heads(t, size) for t in (q, k, module.v_proj(h)))
    return q, k, v, extra


def qwen4_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``Qwen4ExpTextAttention``: :func:`gated_qkv`, and the mask the attention really gets, the call's causal mask
    restricted to the tokens its QSA indexer selects (the module's own ``indexer``, run on the captured input:
    top-k of pooled key blocks, a data-controlled mask)."""
    q, k, v, extra = gated_qkv(module, h, args)
    mask = args["attention_mask"]
    bias, _ = additive_mask(mask, False, h.shape[1], torch.float32, h.device)
    extra["tokens"] = token_mask(bias, h.shape[0], h.shape[1], torch.float32, h.device)
    selected = module.indexer(h, args["position_embeddings"], mask, None)
    if mask.dtype == torch.bool:
        extra["mask"] = mask & selected
    else:
        extra["mask"] = mask.masked_fill(~selected, torch.finfo(mask.dtype).min)
    return q, k, v, extra


def glm5_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``Glm5NextTextAttention``: multi-head latent attention without rotary embeddings, whose mask is built from
    top-k key indices: its own indexer's (run on the captured input) or, in a layer that shares them, those the
    previous layer passed (``prev_topk_indices``); the module's ``build_attention_mask_from_topk`` makes the mask."""
    q_resid = module.q_a_layernorm(module.q_a_proj(h))
    q = module.q_b_proj(q_resid).unflatten(-1, (-1, module.qk_head_dim)).transpose(1, 2)
    k, v = module.expand_kv(*_latent_kv(module, h))
    if module.indexer is not None:
        topk = module.indexer(hidden_states=h, q_resid=q_resid, attention_mask=args.get("attention_mask"), cache=None)
    else:
        topk = args["prev_topk_indices"]
    mask = module.build_attention_mask_from_topk(topk_indices=topk, query_states=q, kv_length=k.shape[2])
    tokens = args.get("attention_mask")                    # the call's [B, L] padding mask
    return q, k, v, {"rotated": True, "mask": mask, "tokens": None if tokens is None else tokens.float()}


def minimax_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``MiniMaxAttention``: Llama's projections; the sliding window comes from the config (the module passes
    ``config.sliding_window`` to the attention function)."""
    q, k, v = projection_qkv(module, h, args)
    return q, k, v, {"window": getattr(module.config, "sliding_window", None)}


def _latent_query(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, Dqk]`` the queries of a multi-head latent attention (low-rank ``q_a``/``q_b`` or ``q_proj``)."""
    if getattr(module, "q_lora_rank", None) is None:
        q = module.q_proj(h)
    else:
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(h)))
    return q.unflatten(-1, (-1, module.qk_head_dim)).transpose(1, 2)


def _latent_kv(module: nn.Module, h: torch.Tensor):
    """``(kv_nope [B, 1, L, R], k_rot [B, 1, L, Dr])``: the compressed latent and the shared rotary key part."""
    batch, length = h.shape[:2]
    kv_nope, k_rot = torch.split(module.kv_a_proj_with_mqa(h), [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1)
    return (module.kv_a_layernorm(kv_nope).view(batch, 1, length, module.kv_lora_rank),
            k_rot.view(batch, 1, length, module.qk_rope_head_dim))


def latent_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """Multi-head latent attention without rotary embeddings (Kimi Linear's MLA layers, NoPE): ``q`` from the
    low-rank ``q_a``/``q_b`` projections (or ``q_proj``), keys and values expanded from the compressed latent
    by the module's own ``expand_kv``. The values are per head (``v_head_dim``), as the matrix multiplies them."""
    k, v = module.expand_kv(*_latent_kv(module, h))
    return _latent_query(module, h), k, v, {"rotated": True}


def bailing_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``BailingHybridAttention``: multi-head latent attention whose rotary part (``qk_rope_head_dim``, interleaved
    pairs, the model file's ``apply_rotary_pos_emb_interleave``) is rotated before the keys are expanded, and a
    head-wise output gate ``sigmoid(g_proj(h))`` computed in float32, as the module does."""
    q = _latent_query(module, h)
    q_pass, q_rot = torch.split(q, [module.qk_nope_head_dim, module.qk_rope_head_dim], dim=-1)
    kv_nope, k_rot = _latent_kv(module, h)
    cos, sin = args["position_embeddings"]
    rotate = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb_interleave")
    q_rot, k_rot = rotate(q_rot, k_rot, cos, sin)
    k, v = module.expand_kv(kv_nope, k_rot)
    gate = torch.sigmoid(module.g_proj(h).float()).to(h.dtype).repeat_interleave(module.v_head_dim, dim=-1)
    return torch.cat((q_pass, q_rot), dim=-1), k, v, {"rotated": True, "gate": gate}


def _rotary(module: nn.Module, args: dict) -> Callable | None:
    """The model file's ``apply_rotary_pos_emb`` when this call applies rotary embeddings, else ``None``."""
    if args.get("position_embeddings") is None:  # a named parameter of the forward, passed a value
        return None
    if not getattr(module.config, "use_mem_rope", True):  # Zamba2 only rotates with use_mem_rope
        return None
    return getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")


def recurrent_gemma_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``RecurrentGemmaAttention``: projections, then the module's own rotary embedding of ``position_ids``."""
    q, k, v = (split_heads(proj(h), module.head_dim) for proj in (module.q_proj, module.k_proj, module.v_proj))
    position_ids = args.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(h.shape[1], device=h.device)[None]
    cos, sin = module.rotary_emb(v, position_ids.to(h.device))
    q, k = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")(q, k, cos, sin)
    return q, k, v


def _causal_default(module: nn.Module, args: dict, length: int) -> bool:
    """Whether a call without a mask is causal: the fused kernels read ``is_causal``, eager ignores it."""
    if getattr(module.config, "_attn_implementation", "eager") == "eager":
        return False
    is_causal = args["**"].get("is_causal", args.get("is_causal"))
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal) and length > 1


def attention_factors(module: nn.Module, captured: CapturedLayer, qkv: Callable,
                      dtype: torch.dtype) -> AttentionFactors:
    """The factors of one call of ``module``, from its captured input and call arguments.

    ``q, k, v`` come from the module's own projections run on the captured input (in the model's
    dtype, as its forward does); rotary embeddings, scores and softmax are computed in ``dtype``.
    ``qkv`` returns ``(q, k, v)``, or ``(q, k, v, extra)`` with ``extra`` a dict of what the module
    does beyond Llama's attention: ``"gate"`` (``[B, L, H * D]`` output gate, after its activation),
    ``"rotated"`` (``True``: ``q, k`` come rotated already), ``"window"`` (a sliding window the module
    passes from its config), ``"mask"`` (the mask the attention function really gets, when the
    module builds its own, as the sparse attentions do) and ``"tokens"`` (``[B, L]`` the real tokens,
    where that mask need not show them: a sparse selection may leave out a token's own key).
    """
    args = captured.extra.get("arguments") or {"**": dict(captured.kwargs), **captured.kwargs}
    with torch.no_grad():
        q, k, v, *rest = qkv(module, captured.inputs, args)
    extra = rest[0] if rest else {}
    q, k, v = (t.to(dtype) for t in (q, k, v))
    rope = None if extra.get("rotated") else _rotary(module, args)
    if rope is not None:
        cos, sin = (t.to(dtype) for t in args["position_embeddings"])
        q, k = rope(q, k, cos, sin)
    batch, heads, length, _ = q.shape
    values = repeat_kv(v, heads // v.shape[1]).transpose(1, 2).flatten(2)   # [B, L, H * D]
    mask = extra["mask"] if "mask" in extra else args.get("attention_mask")
    causal = _causal_default(module, args, length)
    window = extra.get("window", getattr(module, "sliding_window", None))
    window = window if isinstance(window, int) and window > 0 else None
    bias, _ = additive_mask(mask, causal, length, dtype, q.device, window)
    gate, tokens = extra.get("gate"), extra.get("tokens")
    tokens = token_mask(bias, batch, length, dtype, q.device) if tokens is None else tokens.to(dtype)
    return AttentionFactors(q=q, k=k, values=values, scale=module.scaling, mask=mask, causal=causal,
                            token_mask=tokens, window=window, gate=None if gate is None else gate.to(dtype))


def _dropout(module: nn.Module) -> float:
    """The attention-probability dropout rate the module applies in training mode."""
    for attr in ("attn_dropout", "dropout"):  # GPT-2, BERT
        layer = getattr(module, attr, None)
        if isinstance(layer, nn.Dropout):
            return layer.p
    rate = getattr(module, "attention_dropout", 0.0)  # Llama-style modules
    return float(rate) if isinstance(rate, (int, float)) else 0.0


def attention_reader(qkv: Callable) -> Callable[[CapturedLayer, torch.dtype], AttentionFactors]:
    """``read_factors`` of an attention architecture (see :func:`~..registry.layer_builder`) whose module
    gives ``q, k, v`` by ``qkv``; refuses a call that ran in training mode with attention dropout."""
    def read(captured: CapturedLayer, dtype: torch.dtype) -> AttentionFactors:
        rate = _dropout(captured.module)
        if captured.module.training and rate > 0:
            raise ValueError(f"layer {captured.name!r} ran in training mode with attention dropout {rate}: its "
                             "probabilities were randomly dropped. Call model.eval() first.")
        return attention_factors(captured.module, captured, qkv, dtype)
    return read
