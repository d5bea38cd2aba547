"""Shared scaffolding of our decoder-only models (RetNet, HGRN, GLA, RWKV-6, RWKV-7).

Each model keeps its own ``PreTrainedModel`` classes (names, configs, ``model_type``, parameter names);
this module only supplies the parts they had in common:

* :class:`RMSNorm`, :class:`GatedMLP` and :class:`PreNormBlock`, the block parts of RetNet, HGRN and
  GLA (each model subclasses them under its own names, so ``isinstance`` checks and keys stay);
* :class:`BlockStackModel`: ``embeddings -> blocks -> final norm`` with ``attention_mask`` /
  ``inputs_embeds`` handling, ``output_hidden_states`` and the ``BaseModelOutput``;
* :class:`CausalLMHead`: the backbone plus a linear LM head, the shifted next-token loss and the
  ``CausalLMOutput``;
* :class:`WithoutStateCache`: generation that reruns the whole sequence at every step.

A model class lists the mixin first, then its ``<Name>PreTrainedModel``, e.g.
``class GLAModel(BlockStackModel, GLAPreTrainedModel)``; the attribute names of the submodules are
class attributes, so the state-dict keys stay those of each model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in at least float32 and cast back."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(x.dtype) * x).to(dtype)


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


class BlockStackModel:
    """Mixin for a ``PreTrainedModel``: token embeddings, ``block_class`` blocks, a final norm.

    Subclasses set ``block_class`` (built as ``block_class(config, index)``), the attribute names
    ``embed_attr`` / ``layers_attr`` / ``norm_attr`` and implement :meth:`_final_norm`. Hooks:
    :meth:`_build_extra` (more submodules, before ``post_init``), :meth:`_initial_carry` and
    :meth:`_run_block` (what a block receives besides ``hidden_states`` and ``attention_mask``).
    """

    block_class: ClassVar[type[nn.Module]]
    embed_attr: ClassVar[str] = "embed_tokens"
    layers_attr: ClassVar[str] = "layers"
    norm_attr: ClassVar[str] = "norm"

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)  # the model's PreTrainedModel
        setattr(self, self.embed_attr, nn.Embedding(config.vocab_size, config.hidden_size))
        setattr(self, self.layers_attr,
                nn.ModuleList([self.block_class(config, i) for i in range(config.num_hidden_layers)]))
        setattr(self, self.norm_attr, self._final_norm(config))
        self._build_extra(config)
        self.post_init()

    def _final_norm(self, config: PretrainedConfig) -> nn.Module:
        """The norm applied after the last block."""
        raise NotImplementedError

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
    bias-free linear LM head (stored under ``head_attr``); ``_tied_weights_keys`` stays on the subclass.

    ``loss_in_float32``: the loss is computed on logits cast to float32 (``True``) or to at least
    float32 (``False``: float64 logits stay float64).
    """

    model_class: ClassVar[type[nn.Module]]
    head_attr: ClassVar[str] = "lm_head"
    loss_in_float32: ClassVar[bool] = True

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
    dtype = torch.float32 if in_float32 else torch.promote_types(shifted.dtype, torch.float32)
    return F.cross_entropy(shifted.to(dtype), labels[:, 1:].reshape(-1), ignore_index=-100)


class WithoutStateCache:
    """Generation without a state cache: every step runs the whole sequence."""

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}


__all__ = ["BlockStackModel", "CausalLMHead", "GatedMLP", "PreNormBlock", "RMSNorm", "WithoutStateCache",
           "next_token_loss"]
