"""Explanations that do not use the attention matrices: the baselines every map is compared with.

Each works on any model that exposes ``get_input_embeddings()``: text models take the perturbed
token embeddings as ``inputs_embeds``; image models (``pixel_values``) get their patch embeddings
replaced by a forward hook, and the relevance of each patch is placed at its token (class
tokens, which no pixel feeds, get 0). Every function returns relevance ``[B, L]``.

``input_ids`` may be token ids ``[B, L]`` or a prepared
:class:`~implicit_attention.inputs.ModelInputs` (needed for images).
"""

from __future__ import annotations

import torch
from torch import nn

from ..inputs import ModelInputs, prepare_model_inputs, run_model
from .target import Target


def _inputs(model: nn.Module, input_ids, attention_mask) -> ModelInputs:
    return prepare_model_inputs(model, input_ids, attention_mask)


def _score_fn(model: nn.Module, inputs: ModelInputs, target: Target):
    """``f(embeds, attention_mask, target_ids, other_ids, values) -> [B]``, the form captum expects.

    ``values`` (ids or pixels) and the target's ids ride along as forward arguments so that captum
    expands them with the embeddings when it batches interpolation steps.
    """
    def score(embeds, attention_mask, target_ids, other_ids, values):
        out = run_model(model, inputs.name, values, attention_mask, embeds)
        return target.with_ids(target_ids, other_ids).score(out.logits)
    return score


def _forward_args(inputs: ModelInputs, target: Target) -> tuple:
    return inputs.attention_mask, target.ids, target.other, inputs.values


def random_relevance(input_ids, seed: int = 0) -> torch.Tensor:
    """``[B, L]`` uniform random relevance (a lower bound every method must beat).

    ``input_ids`` is anything with the token grid's ``.shape`` ``(B, L)`` and ``.device``.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(input_ids.shape), generator=generator, dtype=torch.float64).to(input_ids.device)


def grad_x_input(model: nn.Module, input_ids, attention_mask, target: Target) -> torch.Tensor:
    """``[B, L]`` ``sum_h embed[t, h] * d score / d embed[t, h]``."""
    inputs = _inputs(model, input_ids, attention_mask)
    embeds = inputs.embed(model).requires_grad_(True)
    with torch.enable_grad():
        score = _score_fn(model, inputs, target)(embeds, *_forward_args(inputs, target))
        (grad,) = torch.autograd.grad(score.sum(), embeds)
    return inputs.to_tokens((grad * embeds).sum(dim=-1).detach())


def integrated_gradients(model: nn.Module, input_ids, attention_mask, target: Target,
                         steps: int = 32) -> torch.Tensor:
    """``[B, L]`` integrated gradients (captum) from an all-zero embedding, summed over the hidden size."""
    from captum.attr import IntegratedGradients

    inputs = _inputs(model, input_ids, attention_mask)
    embeds = inputs.embed(model)
    method = IntegratedGradients(_score_fn(model, inputs, target))
    with torch.enable_grad():
        attr = method.attribute(embeds, baselines=torch.zeros_like(embeds), n_steps=steps,
                                additional_forward_args=_forward_args(inputs, target),
                                internal_batch_size=max(1, embeds.shape[0]) * min(steps, 8))
    return inputs.to_tokens(attr.sum(dim=-1).detach())


def occlusion(model: nn.Module, input_ids, attention_mask, target: Target) -> torch.Tensor:
    """``[B, L]`` drop of the score when one token's (or patch's) embedding is replaced by zeros (captum)."""
    from captum.attr import Occlusion

    inputs = _inputs(model, input_ids, attention_mask)
    embeds = inputs.embed(model)
    hidden = embeds.shape[-1]
    with torch.no_grad():
        attr = Occlusion(_score_fn(model, inputs, target)).attribute(
            embeds, sliding_window_shapes=(1, hidden), strides=(1, hidden), baselines=0.0,
            additional_forward_args=_forward_args(inputs, target))
    # captum gives every hidden unit of the occluded token the same score difference
    return inputs.to_tokens(attr.mean(dim=-1).detach())
