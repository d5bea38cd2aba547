"""Softmax self-attention of Transformers and of the attention layers inside hybrids.

A softmax attention layer *is* an attention operator already; what this module adds is the exact
bookkeeping that puts it in the same ``[B, C, L, L]`` form as the implicit attention of the
recurrent layers, so that a hybrid model (Mamba + attention) is explained in one rollout and a
Transformer is compared with a Mamba by the same code.

Glossary (see :mod:`..base`): ``H`` query heads, ``G`` key/value heads (``H / G`` queries share
one key/value head: GQA), ``D`` head width, ``C = H * D`` the concatenated heads (the operator's
channels), ``L`` tokens.

Equations, per head ``h`` (``mirror`` of the module's forward, sequence path, no cache):

    ``q_h = W_q h``, ``k_h = W_k h``, ``v_h = W_v h`` (per-class details: fused ``c_attn`` for
    GPT-2, rotary embeddings ``(cos, sin)`` from the call's ``position_embeddings`` with the
    model file's own ``apply_rotary_pos_emb``, Falcon-H1's ``key_multiplier``, Zamba2's LoRA
    adapters chosen by ``layer_idx``; key/value heads repeated to query heads for GQA);
    ``P_h = softmax(scale * q_h k_h^T + M)`` with ``M`` the additive form of the mask the module
    received (``0`` / ``-inf`` for boolean masks, as is for float masks; causal when there is no
    mask and the module is causal; a row with no visible key is zero, as in PyTorch's SDPA);
    ``out[:, h*D:(h+1)*D] = P_h v_h``.

Per channel ``c`` (of head ``h = c // D``): ``matrix[b, c] = P_h``, ``values[..., c] = v[..., c]``
and ``offset = 0``: ``P V`` equals the attention output before the output projection exactly
(``c_proj`` / ``o_proj``; for BERT the projection lives in ``BertSelfOutput``, outside the module,
and the module's own first return value is that output). The only variant is ``unified`` (= the
attention probabilities).

Because all ``D`` channels of a head share one matrix, :class:`AttentionLayerDecomposition`
computes aggregates and attributions per head (``H`` matrices, not ``C``); the results equal the
generic per-channel code (tested). Since ``P >= 0``: ``mean = abs = pos = mean_h P_h`` and
``clamp(g_i P_ij v_j, 0) = P_ij (g+_i v+_j + g-_i v-_j)`` (``x+ = max(x, 0)``, ``x- = max(-x, 0)``),
so the channel sum of the attribution inside a head is two ``[L, D] x [D, L]`` products.

The probabilities are recomputed from the module's parameters and the captured call arguments
(the user need not reload the model with ``attn_implementation="eager"``); the exactness check
of :func:`~implicit_attention.decompose` verifies them against the module's real output. A
decomposed layer keeps ``q, k, v`` (``[B, L, C]``-sized) and recomputes ``P`` for a few heads at
a time when asked, so that decomposing every layer of a long input never holds ``H`` matrices
of ``[L, L]`` per layer.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .base import AGGREGATES, LayerDecomposition
from .registry import Architecture, CapturedLayer, register

VARIANTS: tuple[str, ...] = ("unified",)


# ----------------------------------------------------------------------------- call arguments
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


# ------------------------------------------------------------------------ q, k, v per class
def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, L, n * D]`` -> ``[B, n, L, D]``."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _no_cross_attention(module: nn.Module, args: dict) -> None:
    if getattr(module, "is_cross_attention", False) or args.get("encoder_hidden_states") is not None:
        raise NotImplementedError(f"{type(module).__name__}: cross-attention is not an implicit attention "
                                  "over the input tokens; only self-attention layers are decomposed")


def gpt2_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``GPT2Attention``: one fused ``c_attn`` (``Conv1D``), split into ``q, k, v``."""
    _no_cross_attention(module, args)
    q, k, v = module.c_attn(h).split(module.split_size, dim=2)
    return tuple(_heads(t, module.head_dim) for t in (q, k, v))


def bert_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """``BertSelfAttention`` (and the pre-5.x ``ViTSelfAttention``): ``query``, ``key``, ``value``."""
    _no_cross_attention(module, args)
    size = module.attention_head_size
    return tuple(_heads(layer(h), size) for layer in (module.query, module.key, module.value))


def projection_qkv(module: nn.Module, h: torch.Tensor, args: dict):
    """Llama-style ``q_proj``, ``k_proj``, ``v_proj`` (Llama, ViT, DeiT and the hybrids' attention)."""
    q, k, v = module.q_proj(h), module.k_proj(h), module.v_proj(h)
    if getattr(module.config, "use_shared_attention_adapter", False) and hasattr(module, "linear_q_adapter_list"):
        # Zamba2: per-call LoRA adapters of the shared block, chosen by the call's layer_idx
        slot = module.layer_dic[args["layer_idx"]]
        q = q + module.linear_q_adapter_list[slot](h)
        k = k + module.linear_k_adapter_list[slot](h)
        v = v + module.linear_v_adapter_list[slot](h)
    q, k, v = (_heads(t, module.head_dim) for t in (q, k, v))
    if hasattr(module, "key_multiplier"):  # Falcon-H1 scales the keys before the rotary embedding
        k = k * module.key_multiplier
    return q, k, v


def _rotary(module: nn.Module, args: dict) -> Callable | None:
    """The model file's ``apply_rotary_pos_emb`` when this call applies rotary embeddings, else ``None``."""
    if args.get("position_embeddings") is None:  # a named parameter of the forward, passed a value
        return None
    if not getattr(module.config, "use_mem_rope", True):  # Zamba2 only rotates with use_mem_rope
        return None
    return getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")


# ------------------------------------------------------------------------------ probabilities
def _causal_default(module: nn.Module, args: dict, length: int) -> bool:
    """Whether a call without a mask is causal: the fused kernels read ``is_causal``, eager ignores it."""
    if getattr(module.config, "_attn_implementation", "eager") == "eager":
        return False
    is_causal = args["**"].get("is_causal", args.get("is_causal"))
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal) and length > 1


def additive_mask(mask: torch.Tensor | None, causal: bool, length: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``M`` ``[B|1, H|1, L, L]`` added to the scores, and a boolean "row sees nothing" map (or ``None``).

    Boolean masks (``True`` = attend) become ``0 / -inf``; float masks are additive already
    (eager adds them as they are, e.g. ``finfo.min`` on padding).
    """
    if mask is None:
        if not causal:
            return None, None
        visible = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~visible, -math.inf), None
    mask = mask.to(device)[..., -length:, -length:]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, -math.inf)
        return bias, ~mask.any(dim=-1)
    return mask.to(dtype), None


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                            empty_rows: torch.Tensor | None) -> torch.Tensor:
    """``P [B, H, L, L] = softmax(scale * q k^T + bias)``; rows in ``empty_rows`` are 0 (SDPA's rule)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    if empty_rows is not None:
        probs = probs.masked_fill(empty_rows[..., None], 0.0)
    return probs


def attention_probabilities_naive(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                                  empty_rows: torch.Tensor | None) -> torch.Tensor:
    """Slow reference of :func:`attention_probabilities`: loops over examples, heads and query rows."""
    batch, heads, length, _ = q.shape
    probs = torch.zeros(batch, heads, length, k.shape[-2], dtype=q.dtype, device=q.device)
    full = None if bias is None else bias.expand(batch, heads, length, k.shape[-2])
    dead = None if empty_rows is None else empty_rows.expand(batch, heads, length)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                if dead is not None and dead[b, h, i]:
                    continue
                logits = torch.stack([(q[b, h, i] * k[b, h, j]).sum() * scale for j in range(k.shape[-2])])
                if full is not None:
                    logits = logits + full[b, h, i]
                top = logits.max()
                weights = torch.exp(logits - top)
                probs[b, h, i] = weights / weights.sum()
    return probs


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, G, L, D]`` -> ``[B, G * groups, L, D]``: each key/value head serves ``groups`` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@dataclass
class AttentionFactors:
    """What one call of an attention module needs to rebuild its probabilities on demand.

    Attributes:
        q: ``[B, H, L, D]`` queries (rotary embeddings applied).
        k: ``[B, G, L, D]`` keys, one per key/value head (``H / G`` query heads share one).
        values: ``[B, L, H * D]`` values, key/value heads repeated to the query heads.
        scale: the score scale (``module.scaling``).
        mask: the mask the module received (``[B|1, 1|H, L, L]``, boolean or additive) or ``None``.
        causal: whether a missing mask means causal attention.
        token_mask: ``[B, L]`` 1 for real tokens.
    """

    q: torch.Tensor
    k: torch.Tensor
    values: torch.Tensor
    scale: float
    mask: torch.Tensor | None
    causal: bool
    token_mask: torch.Tensor


def attention_factors(module: nn.Module, captured: CapturedLayer, qkv: Callable,
                      dtype: torch.dtype) -> AttentionFactors:
    """The factors of one call of ``module``, from its captured input and call arguments.

    ``q, k, v`` come from the module's own projections run on the captured input (in the model's
    dtype, as its forward does); rotary embeddings, scores and softmax are computed in ``dtype``.
    """
    args = captured.extra.get("arguments") or {"**": dict(captured.kwargs), **captured.kwargs}
    with torch.no_grad():
        q, k, v = qkv(module, captured.inputs, args)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    rope = _rotary(module, args)
    if rope is not None:
        cos, sin = (t.to(dtype) for t in args["position_embeddings"])
        q, k = rope(q, k, cos, sin)
    batch, heads, length, _ = q.shape
    values = repeat_kv(v, heads // v.shape[1]).transpose(1, 2).flatten(2)   # [B, L, H * D]
    mask = args.get("attention_mask")
    causal = _causal_default(module, args, length)
    bias, _ = additive_mask(mask, causal, length, dtype, q.device)
    return AttentionFactors(q=q, k=k, values=values, scale=module.scaling, mask=mask, causal=causal,
                            token_mask=token_mask(bias, batch, length, dtype, q.device))


def token_mask(bias: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """``[B, L]`` 1 for real tokens: a real token always sees itself, padding (masked as a key) never does."""
    if bias is None:
        return torch.ones(batch, length, dtype=dtype, device=device)
    visible = torch.isfinite(bias) & (bias > torch.finfo(bias.dtype).min / 2)
    diagonal = visible.diagonal(dim1=-2, dim2=-1)                          # [..., L]
    while diagonal.dim() > 2:
        diagonal = diagonal[:, 0]
    return diagonal.reshape(-1, length).expand(batch, length).to(dtype)


# --------------------------------------------------------------------------- decomposition
class AttentionLayerDecomposition(LayerDecomposition):
    """A softmax attention layer: channel ``c`` of the concatenated heads has matrix ``P_{c // D}``.

    The probabilities are recomputed from ``q, k`` and the mask for a few heads at a time (an
    ``[L, L]`` matrix per head is never kept for the whole model); aggregates, attributions and
    the reconstruction work per head.

    Attributes:
        factors: the :class:`AttentionFactors` of the call.
        head_dim: ``D``, channels per head.
    """

    block_temporaries = 3

    def __init__(self, factors: AttentionFactors, **kwargs):
        self.factors = factors
        self.head_dim = factors.values.shape[-1] // factors.q.shape[1]
        super().__init__(variant="unified", exact=True, values=factors.values,
                         offset=torch.zeros_like(factors.values), mask=factors.token_mask, **kwargs)

    @property
    def heads(self) -> int:
        return self.factors.q.shape[1]

    def head_probs(self, heads: slice = slice(None), rows=None) -> torch.Tensor:
        """``[B, h, L, L]`` (or ``[B, h, R, L]`` for ``rows``) the probabilities of a slice of heads."""
        f = self.factors
        index = torch.arange(self.heads, device=self.device)[heads]
        q = f.q[:, heads]
        k = f.k.index_select(1, index // (self.heads // f.k.shape[1]))  # the key head serving each query head
        bias, empty = additive_mask(f.mask, f.causal, self.length, self.dtype, self.device)
        if bias is not None and bias.dim() == 4 and bias.shape[1] > 1:  # a per-head mask
            bias = bias[:, heads]
            empty = None if empty is None else empty[:, heads]
        if rows is not None:
            q = q[:, :, rows]
            bias = None if bias is None else bias[..., rows, :]
            empty = None if empty is None else empty[..., rows]
        return attention_probabilities(q, k, f.scale, bias, empty)

    @property
    def probs(self) -> torch.Tensor:
        """``[B, H, L, L]`` every head's attention probabilities (computed on each access)."""
        return self.head_probs()

    def _head_chunks(self):
        per_head = self.batch_size * self.length ** 2 * self.dtype.itemsize * self.block_temporaries
        step = max(1, min(self.heads, self.block_bytes // max(per_head, 1)))
        for start in range(0, self.heads, step):
            yield slice(start, min(start + step, self.heads))

    def _block(self, channels: slice):
        heads = torch.arange(self.channels, device=self.device)[channels] // self.head_dim
        first, last = int(heads[0]), int(heads[-1]) + 1
        return self.head_probs(slice(first, last)).index_select(1, heads - first), None

    def reconstruct(self) -> torch.Tensor:
        """``[B, L, C]`` ``P_h V_h`` head by head (the offset is zero)."""
        parts = []
        for heads in self._head_chunks():
            v = _heads(self.values, self.head_dim)[:, heads]               # [B, h, L, D]
            parts.append((self.head_probs(heads) @ v).transpose(1, 2).flatten(2))
        return torch.cat(parts, dim=-1)

    def measure_error(self, max_entries=None) -> float:
        """Relative error of :meth:`reconstruct` over every channel (per head it is as cheap as the layer)."""
        self.error_channels = self.channels
        denom = self.output.norm().clamp_min(torch.finfo(self.dtype).tiny)
        self.error = float((self.reconstruct() - self.output).norm() / denom)
        return self.error

    def aggregate(self, how="mean", channel: int | None = None) -> torch.Tensor:
        """``[B, L, L]``; per head: every head has ``D`` channels and ``P >= 0``, so all three equal ``mean_h P_h``."""
        if channel is not None:
            if not -self.channels <= channel < self.channels:
                raise IndexError(f"channel {channel} out of range for {self.channels} channels")
            head = (channel % self.channels) // self.head_dim
            return self.head_probs(slice(head, head + 1))[:, 0]
        if how not in AGGREGATES:
            raise ValueError(f"how must be one of {AGGREGATES}, got {how!r}")
        if how not in self._aggregates:
            self._aggregates[how] = sum(self.head_probs(heads).sum(dim=1) for heads in self._head_chunks()) / self.heads
        return self._aggregates[how]

    def aggregate_rows(self, rows, how="mean") -> torch.Tensor:
        """``[B, R, L]`` rows of :meth:`aggregate`, from those rows of the queries only."""
        if how not in AGGREGATES:
            raise ValueError(f"how must be one of {AGGREGATES}, got {how!r}")
        rows = torch.as_tensor(rows, device=self.device).long().reshape(-1)
        if ((rows < -self.length) | (rows >= self.length)).any():
            raise IndexError(f"rows {rows.tolist()} out of range for {self.length} tokens")
        return self.head_probs(rows=rows % self.length).mean(dim=1)

    def attribution(self, grad: torch.Tensor) -> torch.Tensor:
        """``[B, L, L]`` ``mean_c clamp(g_i P[i, j] v_j, 0)`` as ``(1/C) sum_h P_h * (G+_h V+_h^T + G-_h V-_h^T)``."""
        if grad.shape != self.values.shape:
            raise ValueError(f"grad must have shape {tuple(self.values.shape)}, got {tuple(grad.shape)}")
        g_all = _heads(grad.to(self.dtype), self.head_dim)                 # [B, H, L, D]
        v_all = _heads(self.values, self.head_dim)
        total = torch.zeros(self.batch_size, self.length, self.length, dtype=self.dtype, device=self.device)
        for heads in self._head_chunks():
            g, v = g_all[:, heads], v_all[:, heads]
            weight = g.clamp(min=0) @ v.clamp(min=0).transpose(-1, -2)     # [B, h, L, L]
            weight += (-g).clamp(min=0) @ (-v).clamp(min=0).transpose(-1, -2)
            total += (self.head_probs(heads) * weight).sum(dim=1)
        return total / self.channels


# ---------------------------------------------------------------------------- registration
def _dropout(module: nn.Module) -> float:
    """The attention-probability dropout rate the module applies in training mode."""
    for attr in ("attn_dropout", "dropout"):  # GPT-2, BERT
        layer = getattr(module, attr, None)
        if isinstance(layer, nn.Dropout):
            return layer.p
    rate = getattr(module, "attention_dropout", 0.0)  # Llama-style modules
    return float(rate) if isinstance(rate, (int, float)) else 0.0


def _builder(qkv: Callable):
    def build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> AttentionLayerDecomposition:
        if captured.module.training and _dropout(captured.module) > 0:
            raise ValueError(f"layer {captured.name!r} ran in training mode with attention dropout "
                             f"{_dropout(captured.module)}: its probabilities were randomly dropped. "
                             "Call model.eval() first.")
        factors = attention_factors(captured.module, captured, qkv, dtype)
        return AttentionLayerDecomposition(factors, index=index, name=captured.name,
                                           output=captured.output.detach().to(dtype))
    return build


_M = "transformers.models"

register(Architecture(
    name="attention_gpt2",
    module_classes=(f"{_M}.gpt2.modeling_gpt2.GPT2Attention",),
    model_classes=("GPT2LMHeadModel", "GPT2Model"),
    variants=VARIANTS,
    output_module="c_proj",
    build=_builder(gpt2_qkv),
    channels=lambda m: m.embed_dim,
    extra_hooks=record_arguments,
))

register(Architecture(
    name="attention_bert",
    module_classes=(f"{_M}.bert.modeling_bert.BertSelfAttention",
                    f"{_M}.vit.modeling_vit.ViTSelfAttention"),  # the latter: transformers before ViTAttention
    model_classes=("BertModel", "BertForSequenceClassification"),
    variants=VARIANTS,
    output_module=None,  # the output projection is BertSelfOutput.dense, outside the module
    build=_builder(bert_qkv),
    channels=lambda m: m.all_head_size,
    extra_hooks=record_arguments,
))

register(Architecture(
    name="attention",
    module_classes=tuple(f"{_M}.{path}" for path in (
        "llama.modeling_llama.LlamaAttention",
        "vit.modeling_vit.ViTAttention",
        "deit.modeling_deit.DeiTAttention",
        "jamba.modeling_jamba.JambaAttention",
        "zamba.modeling_zamba.ZambaAttention",
        "zamba2.modeling_zamba2.Zamba2Attention",
        "bamba.modeling_bamba.BambaAttention",
        "nemotron_h.modeling_nemotron_h.NemotronHAttention",
        "granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridAttention",
        "falcon_h1.modeling_falcon_h1.FalconH1Attention",
    )),
    model_classes=("LlamaForCausalLM", "ViTForImageClassification", "ViTModel", "DeiTForImageClassification",
                   "JambaForCausalLM", "ZambaForCausalLM", "Zamba2ForCausalLM", "BambaForCausalLM",
                   "NemotronHForCausalLM", "GraniteMoeHybridForCausalLM", "FalconH1ForCausalLM"),
    variants=VARIANTS,
    output_module="o_proj",
    build=_builder(projection_qkv),
    channels=lambda m: m.o_proj.in_features,
    extra_hooks=record_arguments,
))
