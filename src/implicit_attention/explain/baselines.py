"""Explanations that do not use the attention matrices: the baselines every map is compared with.

Each works on any model that accepts ``inputs_embeds`` and exposes ``get_input_embeddings()``,
and returns relevance ``[B, L]``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture import call_model
from .target import Target


def _embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(input_ids).detach()


def _score_fn(model: nn.Module, target: Target):
    """``f(inputs_embeds, attention_mask, target_ids) -> [B]``, the form captum expects."""
    def score(embeds, attention_mask, target_ids):
        out = call_model(model, None, attention_mask, inputs_embeds=embeds)
        return Target(ids=target_ids, position=target.position).score(out.logits)
    return score


def random_relevance(input_ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[B, L]`` uniform random relevance (a lower bound every method must beat)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(input_ids.shape, generator=generator, dtype=torch.float64).to(input_ids.device)


def grad_x_input(model: nn.Module, input_ids, attention_mask, target: Target) -> torch.Tensor:
    """``[B, L]`` ``sum_h embed[t, h] * d score / d embed[t, h]``."""
    embeds = _embed(model, input_ids).requires_grad_(True)
    with torch.enable_grad():
        score = _score_fn(model, target)(embeds, attention_mask, target.ids)
        (grad,) = torch.autograd.grad(score.sum(), embeds)
    return (grad * embeds).sum(dim=-1).detach()


def integrated_gradients(model: nn.Module, input_ids, attention_mask, target: Target,
                         steps: int = 32) -> torch.Tensor:
    """``[B, L]`` integrated gradients (captum) from an all-zero embedding, summed over the hidden size."""
    from captum.attr import IntegratedGradients

    embeds = _embed(model, input_ids)
    method = IntegratedGradients(_score_fn(model, target))
    with torch.enable_grad():
        attr = method.attribute(embeds, baselines=torch.zeros_like(embeds), n_steps=steps,
                                additional_forward_args=(attention_mask, target.ids),
                                internal_batch_size=max(1, embeds.shape[0]) * min(steps, 8))
    return attr.sum(dim=-1).detach()


def occlusion(model: nn.Module, input_ids, attention_mask, target: Target) -> torch.Tensor:
    """``[B, L]`` drop of the score when one token's embedding is replaced by zeros (captum)."""
    from captum.attr import Occlusion

    embeds = _embed(model, input_ids)
    hidden = embeds.shape[-1]
    with torch.no_grad():
        attr = Occlusion(_score_fn(model, target)).attribute(
            embeds, sliding_window_shapes=(1, hidden), strides=(1, hidden), baselines=0.0,
            additional_forward_args=(attention_mask, target.ids))
    # captum gives every hidden unit of the occluded token the same score difference
    return attr.mean(dim=-1).detach()
