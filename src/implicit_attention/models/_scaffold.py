"""Shared scaffolding of our decoder-only models (RetNet, HGRN, GLA, RWKV-6, RWKV-7).

Each model keeps its own classes (names, configs, ``model_type``, parameter names); this module only
supplies the parts they have in common:

* :class:`PreNormDecoderConfig` and :class:`RwkvBaseConfig`: the config fields and checks shared by
  RetNet / HGRN / GLA and by RWKV-6 / RWKV-7;
* :class:`RMSNorm`, :class:`HeadGroupNorm`, :class:`GatedMLP` and :class:`PreNormBlock`, the block parts
  of RetNet, HGRN and GLA (each model subclasses them under its own names, so ``isinstance`` checks and
  keys stay);
* :class:`HeadGatedMixer`: the ``W_O (swish(W_G x) ⊙ GroupNorm_h(Y))`` token mixer of RetNet and GLA,
  with the switch to its token-by-token reference (:func:`linear_attention_recurrence`);
* :class:`BlockStackModel`: ``embeddings -> blocks -> final norm`` with ``attention_mask`` /
  ``inputs_embeds`` handling, ``output_hidden_states`` and the ``BaseModelOutput``;
* :class:`CausalLMHead`: the backbone plus a linear LM head, the shifted next-token loss and the
  ``CausalLMOutput``; :class:`WithoutStateCache`: generation that reruns the whole sequence at every step;
  :class:`HeadNormInit`: the identity init of the per-head group norms;
* the RWKV parts: :func:`token_shift`, :func:`segsum` / :func:`strict_segsum` (the chunked wkv's decays),
  :class:`RwkvTimeMix` / :class:`RwkvMixing` (sizes, linear maps, ``ln_x``, the wkv dispatch),
  :class:`RwkvBlock`, :class:`RwkvReferenceInit`, :class:`RwkvStack` and :class:`RwkvLMHead`.

A model class lists the mixin first, then its ``<Name>PreTrainedModel``, e.g.
``class GLAModel(BlockStackModel, GLAPreTrainedModel)``; the attribute names of the submodules are
class attributes, so the state-dict keys stay those of each model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The recurrences and norms run in at least float32 (half-precision models upcast)."""
    return torch.promote_types(dtype, torch.float32)


# --- configs -------------------------------------------------------------------------------------


class PreNormDecoderConfig(PretrainedConfig):
    """The fields that the RetNet, HGRN and GLA configs share (pre-norm blocks + GLU MLP, tied LM head).

    Args:
        vocab_size: tokens of the embedding and the LM head.
        hidden_size: ``D``, the residual width.
        num_hidden_layers: number of blocks.
        intermediate_size: GLU hidden width (default ``2 * D``).
        attention_bias: biases in the token mixer's input projections.
        rms_norm_eps: epsilon of the block RMS norms.
        initializer_range: std of the normal initialisation.
    """

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 2
    intermediate_size: int | None = None
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    use_cache: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.hidden_size
        super().__post_init__(**kwargs)


class RwkvBaseConfig(PretrainedConfig):
    """The fields and checks that the RWKV-6 and RWKV-7 configs share (their docstrings describe them);
    ``num_heads`` is ``hidden_size / head_size``."""

    def __init__(self, *, vocab_size: int, hidden_size: int, num_hidden_layers: int, head_size: int,
                 intermediate_size: int, layer_norm_epsilon: float, group_norm_epsilon: float, chunk_size: int,
                 wkv_mode: str, initializer_range: float, **kwargs):
        if hidden_size % head_size:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of head_size {head_size}")
        if wkv_mode not in ("chunk", "recurrent"):
            raise ValueError(f"wkv_mode must be 'chunk' or 'recurrent', got {wkv_mode!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_size = head_size
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.group_norm_epsilon = group_norm_epsilon
        self.chunk_size = chunk_size
        self.wkv_mode = wkv_mode
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size


# --- block parts of RetNet, HGRN and GLA --------------------------------------------------------------


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in at least float32 and cast back."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(compute_dtype(dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(x.dtype) * x).to(dtype)


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per head (a LayerNorm over each head's ``V`` values), affine per channel."""

    def __init__(self, num_heads: int, width: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def _inverse_std(self, centred: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)

    def scale(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, L, H, 1]`` ``1 / sqrt(var_h + eps)`` of ``y [B, L, H, V]``."""
        return self._inverse_std(y - y.mean(-1, keepdim=True))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, L, H, V] -> [B, L, H * V]``."""
        centred = y - y.mean(-1, keepdim=True)
        normed = (centred * self._inverse_std(centred)).flatten(2)
        return normed * self.weight.to(y.dtype) + self.bias.to(y.dtype)


class GatedMLP(nn.Module):
    """GLU: ``W_down (silu(W_gate x) ⊙ W_up x)``, widths ``config.hidden_size -> config.intermediate_size``."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PreNormBlock(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``.

    Subclasses set ``norm_class`` (built as ``norm_class(config.hidden_size, config.rms_norm_eps)``),
    ``mixer_class`` (the token mixer, ``mixer_class(config, layer_idx)``, stored as ``attn``) and
    ``mlp_class`` (``mlp_class(config)``, stored as ``mlp``).
    """

    norm_class: ClassVar[type[nn.Module]]
    mixer_class: ClassVar[type[nn.Module]]
    mlp_class: ClassVar[type[nn.Module]]

    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.attn = self.mixer_class(config, layer_idx)
        self.mlp_norm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.mlp_class(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **mixer_kwargs: Any) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; ``mixer_kwargs`` go to the token mixer."""
        hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states), attention_mask=attention_mask,
                                                  **mixer_kwargs)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


# --- the head-gated linear-attention mixer of RetNet and GLA -------------------------------------------


def linear_attention_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                decay: torch.Tensor) -> torch.Tensor:
    """``[B, L, H, V]``: ``S_t = decay_t ⊙ S_{t-1} + k_t^T v_t``, ``y_t = q_t S_t``, one token at a time.

    Args:
        q, k: ``[B, L, H, K]``; v: ``[B, L, H, V]``.
        decay: broadcastable to ``[B, L, H, K]``: the factor of each key row of the ``[K, V]`` state.
    """
    batch, length, heads, key_dim = q.shape
    decay = decay.expand(batch, length, heads, key_dim)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    ys = []
    for t in range(length):
        state = decay[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(ys, dim=1)


class HeadGatedMixer(nn.Module):
    """Token mixer ``W_O (swish(W_G x) ⊙ GroupNorm_h(Y))`` over ``H`` heads of ``[K, V]`` states.

    ``forward`` is the subclass's parallel form (:meth:`_parallel`); with ``use_recurrent_reference``
    it routes to :meth:`recurrent_forward`, the paper's token-by-token recurrence (slow reference).
    Subclasses set ``head_norm_class`` and implement :meth:`_project`, :meth:`_parallel` and
    :meth:`_decay`; :meth:`_build_extra` registers submodules between the ``q/k/v/g`` projections and the
    group norm (the order of the state-dict keys).
    """

    head_norm_class: ClassVar[type[nn.Module]]

    def __init__(self, config: PretrainedConfig, layer_idx: int, key_dim: int, value_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k = key_dim // self.num_heads
        self.head_v = value_dim // self.num_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, key_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, key_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, value_dim, bias=bias)
        self.g_proj = nn.Linear(config.hidden_size, value_dim, bias=bias)
        self._build_extra(config)
        self.group_norm = self.head_norm_class(self.num_heads, value_dim, config.group_norm_eps)
        self.o_proj = nn.Linear(value_dim, config.hidden_size, bias=False)
        #: route ``forward`` to :meth:`recurrent_forward` (tests compare the two).
        self.use_recurrent_reference = False

    def _build_extra(self, config: PretrainedConfig) -> None:
        """Register further submodules (after the ``q/k/v/g`` projections, before the group norm)."""

    def _project(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
        """``q, k [B, L, H, K]``, ``v [B, L, H, V]``, ``g [B, L, H V]`` and what :meth:`_parallel` and
        :meth:`_decay` need besides (``extra``), in the compute dtype."""
        raise NotImplementedError

    def _parallel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: Any) -> torch.Tensor:
        """``Y [B, L, H, V]`` by the parallel form."""
        raise NotImplementedError

    def _decay(self, q: torch.Tensor, extra: Any) -> torch.Tensor:
        """The state decay of :func:`linear_attention_recurrence`, broadcastable to ``[B, L, H, K]``."""
        raise NotImplementedError

    @staticmethod
    def _mask_keys(k: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``k [B, L, H, K]`` with the keys of padding tokens zeroed: they write nothing into the state."""
        return k if attention_mask is None else k * attention_mask.to(k.dtype)[:, :, None, None]

    def _output(self, y: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.o_proj((F.silu(g) * self.group_norm(y)).to(dtype))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``[B, L, D] -> [B, L, D]`` by the parallel form."""
        if self.use_recurrent_reference:
            return self.recurrent_forward(hidden_states, attention_mask)
        q, k, v, g, extra = self._project(hidden_states, attention_mask)
        return self._output(self._parallel(q, k, v, extra), g, hidden_states.dtype)

    def recurrent_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The paper's ``S_t = decay_t ⊙ S_{t-1} + k_t^T v_t, y_t = q_t S_t``, one token at a time."""
        q, k, v, g, extra = self._project(hidden_states, attention_mask)
        y = linear_attention_recurrence(q, k, v, self._decay(q, extra))
        return self._output(y, g, hidden_states.dtype)


# --- models and LM heads ------------------------------------------------------------------------------


class BlockStackModel:
    """Mixin for a ``PreTrainedModel``: token embeddings, ``block_class`` blocks, a final norm.

    Subclasses set ``block_class`` (built as ``block_class(config, index)``) and the attribute names
    ``embed_attr`` / ``layers_attr`` / ``norm_attr``. Hooks: :meth:`_final_norm` (by default the
    blocks' ``norm_class``), :meth:`_build_extra` (more submodules, before ``post_init``),
    :meth:`_initial_carry` and :meth:`_run_block` (what a block receives besides ``hidden_states`` and
    ``attention_mask``).
    """

    block_class: ClassVar[type[nn.Module]]
    embed_attr: ClassVar[str] = "embed_tokens"
    layers_attr: ClassVar[str] = "layers"
    norm_attr: ClassVar[str] = "norm"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "block_class" in cls.__dict__:  # accelerate keeps each block on one device
            cls._no_split_modules = [cls.block_class.__name__]

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)  # the model's PreTrainedModel
        setattr(self, self.embed_attr, nn.Embedding(config.vocab_size, config.hidden_size))
        setattr(self, self.layers_attr,
                nn.ModuleList([self.block_class(config, i) for i in range(config.num_hidden_layers)]))
        setattr(self, self.norm_attr, self._final_norm(config))
        self._build_extra(config)
        self.post_init()

    def _final_norm(self, config: PretrainedConfig) -> nn.Module:
        """The norm applied after the last block: the blocks' ``norm_class``."""
        return self.block_class.norm_class(config.hidden_size, config.rms_norm_eps)

    def _build_extra(self, config: PretrainedConfig) -> None:
        """Register further submodules or parameters (after the final norm, before ``post_init``)."""

    def _initial_carry(self) -> Any:
        """State handed from block to block (passed to :meth:`_run_block`); ``None`` by default."""
        return None

    def _run_block(self, index: int, block: nn.Module, hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None, carry: Any) -> tuple[torch.Tensor, Any]:
        """One block: ``(hidden_states, carry) -> (hidden_states, carry)``."""
        return block(hidden_states, attention_mask=attention_mask), carry

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self, self.embed_attr)

    def set_input_embeddings(self, value: nn.Module) -> None:
        setattr(self, self.embed_attr, value)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, use_cache: bool | None = None, **kwargs):
        """``last_hidden_state [B, L, D]`` from ``input_ids [B, L]`` (or ``inputs_embeds [B, L, D]``);
        ``attention_mask [B, L]`` (1 real, 0 padding; pad on the left). ``hidden_states``: the input of
        every block and the normed output."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden_states = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        carry = self._initial_carry()
        all_hidden = [] if output_hidden_states else None
        for index, block in enumerate(getattr(self, self.layers_attr)):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, carry = self._run_block(index, block, hidden_states, attention_mask, carry)
        hidden_states = getattr(self, self.norm_attr)(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        output = BaseModelOutput(last_hidden_state=hidden_states,
                                 hidden_states=tuple(all_hidden) if all_hidden is not None else None)
        return output if return_dict is not False else output.to_tuple()


class CausalLMHead:
    """Mixin for a ``PreTrainedModel``: ``model_class`` (stored under ``base_model_prefix``) and a
    bias-free linear LM head (stored under ``head_attr``), tied to the embeddings when the config says so.

    ``loss_in_float32``: the loss is computed on logits cast to float32 (``True``) or to at least
    float32 (``False``: float64 logits stay float64).
    """

    model_class: ClassVar[type[nn.Module]]
    head_attr: ClassVar[str] = "lm_head"
    loss_in_float32: ClassVar[bool] = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "model_class" in cls.__dict__:
            cls._no_split_modules = list(cls.model_class._no_split_modules)

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)  # the model's PreTrainedModel
        setattr(self, self.base_model_prefix, self.model_class(config))
        setattr(self, self.head_attr, nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self, self.base_model_prefix).get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        getattr(self, self.base_model_prefix).set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return getattr(self, self.head_attr)

    def set_output_embeddings(self, value: nn.Module) -> None:
        setattr(self, self.head_attr, value)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                use_cache: bool | None = None, **kwargs):
        """``logits [B, L, vocab]``; ``labels [B, L]`` gives the next-token loss (shifted inside, -100 ignored)."""
        outputs = getattr(self, self.base_model_prefix)(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states)
        logits = getattr(self, self.head_attr)(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels, self.loss_in_float32)
        output = CausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict is not False else output.to_tuple()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, in_float32: bool = True) -> torch.Tensor:
    """Mean cross entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` (``-100`` ignored).

    Args:
        logits: ``[B, L, vocab]``; labels: ``[B, L]``.
        in_float32: cast the logits to float32; otherwise to ``promote_types(dtype, float32)``.
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    dtype = torch.float32 if in_float32 else compute_dtype(shifted.dtype)
    return F.cross_entropy(shifted.to(dtype), labels[:, 1:].reshape(-1), ignore_index=-100)


class WithoutStateCache:
    """Generation without a state cache: every step runs the whole sequence."""

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class DecoderPreTrained:
    """Mixin for the ``PreTrainedModel`` of a :class:`BlockStackModel` decoder: the backbone is stored as ``model``."""

    base_model_prefix = "model"


class HeadNormInit(DecoderPreTrained):
    """Mixin for a ``PreTrainedModel``: every :class:`HeadGroupNorm` starts as the identity (weight 1, bias 0)."""

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, HeadGroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


# --- RWKV-6 and RWKV-7 --------------------------------------------------------------------------------


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]``: ``x_{t-1}``, zero at ``t = 0``."""
    return F.pad(x, (0, 0, 1, -1))


def zero_padding(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``x [B, T, C]`` with padding tokens zeroed (``attention_mask [B, T]``, 1 real, 0 padding), so they
    feed nothing into the token shift or the state."""
    return x if attention_mask is None else x * attention_mask[..., None].to(x.dtype)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """``[..., T] -> [..., T, T]``: ``out[i, j] = sum_{s=j+1..i} x[s]`` for ``j <= i``, ``-inf`` above.

    The segments are summed directly (masked cumulative sums), so ``exp(out)`` is accurate even
    where the cumulative sum of ``x`` is huge.
    """
    length = x.shape[-1]
    lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    rows = x.unsqueeze(-1).expand(*x.shape, length).masked_fill(~lower, 0).cumsum(dim=-2)
    return rows.masked_fill(~torch.ones_like(lower).tril(), -math.inf)


def strict_segsum(x: torch.Tensor) -> torch.Tensor:
    """``[..., T] -> [..., T, T]``: ``out[i, j] = sum_{s=j+1..i-1} x[s]`` for ``j < i``, ``-inf`` elsewhere."""
    return F.pad(segsum(x)[..., :-1, :], (0, 0, 1, 0), value=-math.inf)


class RwkvLayerInit(NamedTuple):
    """What the reference's layer-dependent init of layer ``layer_id`` reads (channel ramps ``[C]`` float64)."""

    ratio_0_to_1: float   # 0 at the first layer, 1 at the last
    ratio_1_to_0: float   # 1 at the first layer, 1 / layers at the last
    ddd: torch.Tensor     # i / C
    n: torch.Tensor       # i / (C - 1)

    @classmethod
    def of(cls, layer_id: int, config: PretrainedConfig) -> RwkvLayerInit:
        layers, C = config.num_hidden_layers, config.hidden_size
        return cls(layer_id / max(layers - 1, 1), 1.0 - layer_id / layers,
                   torch.arange(C, dtype=torch.float64) / C, torch.arange(C, dtype=torch.float64) / max(C - 1, 1))


def init_to(param: nn.Parameter, values: torch.Tensor) -> None:
    """Initialise ``param`` to the float64 ``values``, cast to its dtype."""
    init.copy_(param, values.to(param.dtype))


def init_low_rank(module: nn.Module, *pairs: tuple[str, str]) -> None:
    """The reference's LoRA init: each pair's first factor zero, the second uniform in ``[-0.01, 0.01]``
    (a pair the layer lacks is skipped)."""
    for first, second in pairs:
        if hasattr(module, first):
            init.zeros_(getattr(module, first))
            init.uniform_(getattr(module, second), -0.01, 0.01)


class RwkvMixing(nn.Module):
    """An RWKV time or channel mixing: keeps ``config`` and ``layer_id`` for :meth:`reference_init`."""

    def __init__(self, config: PretrainedConfig, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id

    def reference_init(self, ramps: RwkvLayerInit) -> None:
        """The reference's layer-dependent init of the mixing parameters."""
        raise NotImplementedError


class RwkvTimeMix(RwkvMixing):
    """The frame of an RWKV time mixing: sizes (``C`` width, ``H`` heads of ``N`` channels), the bias-free
    ``C -> C`` maps ``linear_names``, the per-head group norm ``ln_x`` and the wkv dispatch by ``wkv_mode``
    to ``wkv_chunked`` / ``wkv_recurrent`` (:meth:`_normed_wkv`)."""

    linear_names: ClassVar[tuple[str, ...]] = ("receptance", "key", "value", "output")
    wkv_chunked: ClassVar[Callable[..., torch.Tensor]]
    wkv_recurrent: ClassVar[Callable[..., torch.Tensor]]

    def __init__(self, config: PretrainedConfig, layer_id: int):
        super().__init__(config, layer_id)
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.num_heads, self.head_size, self.hidden_size = H, N, C
        self.chunk_size = config.chunk_size
        self.wkv_mode = config.wkv_mode
        for name in self.linear_names:
            setattr(self, name, nn.Linear(C, C, bias=False))
        self.ln_x = nn.GroupNorm(H, C, eps=config.group_norm_epsilon)

    def _normed_wkv(self, per_channel: tuple[torch.Tensor, ...], dtype: torch.dtype,
                    *per_head: torch.Tensor) -> torch.Tensor:
        """``ln_x(wkv) [B, T, C]`` in ``dtype``; the wkv's arguments are ``per_channel`` (each ``[B, T, C]``,
        viewed ``[B, T, H, N]``) then ``per_head`` (as they are), run in at least float32."""
        batch, length, C = per_channel[0].shape
        heads = (batch, length, self.num_heads, self.head_size)
        compute = compute_dtype(dtype)  # half precision: run the wkv in float32
        args = [t.view(heads).to(compute) for t in per_channel] + [t.to(compute) for t in per_head]
        if self.wkv_mode == "recurrent":
            y = self.wkv_recurrent(*args)
        else:
            y = self.wkv_chunked(*args, chunk_size=self.chunk_size)
        return self.ln_x(y.reshape(batch * length, C).to(dtype)).view(batch, length, C)


class RwkvBlock(nn.Module):
    """Pre-norm RWKV block: ``ln1`` before the time mixing (``attention``, ``time_mix_class``), ``ln2``
    before the channel mixing (``feed_forward``, ``channel_mix_class``); block 0 first normalises the
    embeddings (``pre_ln``, the reference's ``ln0``)."""

    time_mix_class: ClassVar[type[nn.Module]]
    channel_mix_class: ClassVar[type[nn.Module]]

    def __init__(self, config: PretrainedConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        eps = config.layer_norm_epsilon
        if layer_id == 0:
            self.pre_ln = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = self.time_mix_class(config, layer_id)
        self.feed_forward = self.channel_mix_class(config, layer_id)

    def _block_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The embeddings normalised by ``pre_ln`` in block 0; the input as it is elsewhere."""
        return self.pre_ln(hidden_states) if self.layer_id == 0 else hidden_states


class RwkvReferenceInit:
    """Mixin for an RWKV ``PreTrainedModel`` (prefix ``rwkv``, no gradient checkpointing): the reference's
    layer-dependent init of every :class:`RwkvMixing`, normal init elsewhere."""

    base_model_prefix = "rwkv"
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, RwkvMixing):
            module.reference_init(RwkvLayerInit.of(module.layer_id, module.config))


class RwkvStack(BlockStackModel):
    """:class:`BlockStackModel` under the RWKV names (``embeddings``, ``blocks``, ``ln_out``), with a final
    layer norm."""

    embed_attr, layers_attr, norm_attr = "embeddings", "blocks", "ln_out"

    def _final_norm(self, config: PretrainedConfig) -> nn.Module:
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class RwkvLMHead(WithoutStateCache, CausalLMHead):
    """:class:`CausalLMHead` under the RWKV name ``head``, generating without a state cache."""

    head_attr = "head"
    loss_in_float32 = False  # float64 logits keep a float64 loss


__all__ = ["BlockStackModel", "CausalLMHead", "GatedMLP", "HeadGatedMixer", "HeadGroupNorm", "HeadNormInit",
           "PreNormBlock", "PreNormDecoderConfig", "RMSNorm", "RwkvBaseConfig", "RwkvBlock", "RwkvLMHead",
           "RwkvLayerInit", "RwkvMixing", "RwkvReferenceInit", "RwkvStack", "RwkvTimeMix", "WithoutStateCache",
           "compute_dtype", "init_low_rank", "init_to", "linear_attention_recurrence", "next_token_loss",
           "segsum", "strict_segsum", "token_shift", "zero_padding"]
