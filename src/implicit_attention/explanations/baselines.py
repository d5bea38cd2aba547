"""Explanations that do not use the attention matrices: the baselines every map is compared with.

Each works on any model that exposes ``get_input_embeddings()``: text models take the perturbed
token embeddings as ``inputs_embeds``; image models (``pixel_values``) get their patch embeddings
replaced by a forward hook, and the relevance of each patch is placed at its token (class
tokens, which no pixel feeds, get 0). Every function returns relevance ``[B, L]``.

``input_ids`` may be token ids ``[B, L]`` or a prepared
:class:`~implicit_attention.inputs.ModelInputs` (needed for images).
"""

from __future__ import annotations

from collections.abc import Callable

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


def grad_x_input_one_pass(model: nn.Module, inputs: ModelInputs, resolve: Callable[[torch.Tensor], Target]
                          ) -> tuple[torch.Tensor, Target, torch.Tensor]:
    """``(relevance [B, L], target, logits)``: :func:`grad_x_input` with the target resolved (``resolve``)
    from the logits of the same forward pass whose gradient it takes: one forward and one backward."""
    embeds = inputs.embed(model).requires_grad_(True)
    with torch.enable_grad():
        logits = inputs.call(model, embeds).logits
        target = resolve(logits.detach())
        (grad,) = torch.autograd.grad(target.score(logits).sum(), embeds)
    return inputs.to_tokens((grad * embeds).sum(dim=-1).detach()), target, logits.detach()


def token_embeddings(model: nn.Module, inputs: ModelInputs, token: str | int, embeds: torch.Tensor) -> torch.Tensor:
    """``[B, L, H]``: zeros (``token="zeros"``) or the embedding of token id ``token`` at every position."""
    if token == "zeros":
        return torch.zeros_like(embeds)
    if isinstance(token, bool) or not isinstance(token, int):
        raise ValueError(f"a baseline or replacement is 'zeros' or a token id, got {token!r}")
    if inputs.name != "input_ids":
        raise ValueError("a token id as baseline or replacement needs a text model; image models take 'zeros'")
    table = model.get_input_embeddings()
    if not 0 <= token < table.num_embeddings:
        raise ValueError(f"token id {token} is outside the vocabulary of {table.num_embeddings}")
    with torch.no_grad():
        row = table(torch.tensor([token], device=embeds.device)).to(embeds.dtype)
    return row.expand_as(embeds).clone()


def integrated_gradients(model: nn.Module, input_ids, attention_mask, target: Target, steps: int = 32,
                         baseline: str | int = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, L], [B])``: integrated gradients (captum) from ``baseline`` summed over the hidden size, and
    captum's convergence delta (relevance sum minus ``score(input) - score(baseline)``).

    ``baseline``: ``"zeros"`` or a token id whose embedding fills every position (pad, unk, mask).
    """
    from captum.attr import IntegratedGradients

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    inputs = _inputs(model, input_ids, attention_mask)
    embeds = inputs.embed(model)
    reference = token_embeddings(model, inputs, baseline, embeds)
    method = IntegratedGradients(_score_fn(model, inputs, target))
    with torch.enable_grad():
        attr, delta = method.attribute(embeds, baselines=reference, n_steps=steps,
                                       additional_forward_args=_forward_args(inputs, target),
                                       internal_batch_size=max(1, embeds.shape[0]) * min(steps, 8),
                                       return_convergence_delta=True)
    return inputs.to_tokens(attr.sum(dim=-1).detach()), delta.detach()


def occlusion(model: nn.Module, input_ids, attention_mask, target: Target, window: int = 1,
              replacement: str | int = "zeros") -> torch.Tensor:
    """``[B, L]`` drop of the score when ``window`` consecutive tokens' (or patches') embeddings are
    replaced by ``replacement`` (``"zeros"`` or a token id's embedding), stride 1 (captum); a token's
    relevance is the mean drop over the windows that cover it."""
    from captum.attr import Occlusion

    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    inputs = _inputs(model, input_ids, attention_mask)
    embeds = inputs.embed(model)
    hidden, length = embeds.shape[-1], embeds.shape[1]
    reference = token_embeddings(model, inputs, replacement, embeds)
    with torch.no_grad():
        attr = Occlusion(_score_fn(model, inputs, target)).attribute(
            embeds, sliding_window_shapes=(min(window, length), hidden), strides=(1, hidden), baselines=reference,
            additional_forward_args=_forward_args(inputs, target))
    # captum gives every hidden unit of the occluded token the same score difference
    return inputs.to_tokens(attr.mean(dim=-1).detach())


def smoothgrad(model: nn.Module, input_ids, attention_mask, target: Target, samples: int = 16,
               noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """``[B, L]`` SmoothGrad of gradient x input: the mean of captum's ``InputXGradient`` over ``samples``
    copies of the embeddings with Gaussian noise of standard deviation ``noise * std(embeddings)``.

    This is captum's ``NoiseTunnel(InputXGradient)`` with the noise drawn per example (from ``seed``,
    aligned on the last token, the example's own embedding std): ``NoiseTunnel`` draws one noise
    tensor for the whole batch, so an example's relevance would depend on its neighbours and padding.
    """
    from captum.attr import InputXGradient

    if samples < 1 or noise < 0:
        raise ValueError(f"smoothgrad needs samples >= 1 and noise >= 0, got {samples} and {noise}")
    inputs = _inputs(model, input_ids, attention_mask)
    embeds = inputs.embed(model).detach()
    real = (inputs.token_mask(embeds.dtype) if inputs.name == "input_ids"
            else torch.ones(embeds.shape[:2], dtype=embeds.dtype, device=embeds.device))
    draws = _example_noise(embeds, real, samples, noise, seed)                      # [S, B, L, H]
    method = InputXGradient(_score_fn(model, inputs, target))
    # every noisy copy in one batch: [S * B, L, H], the forward arguments repeated to match
    noisy = (embeds[None] + draws).flatten(0, 1).requires_grad_(True)
    forward_args = tuple(_repeat_batch(arg, samples) for arg in _forward_args(inputs, target))
    with torch.enable_grad():
        attr = method.attribute(noisy, additional_forward_args=forward_args)
    total = attr.detach().double().sum(dim=-1).unflatten(0, (samples, embeds.shape[0])).sum(dim=0)
    return inputs.to_tokens(total / samples)


def _repeat_batch(value, times: int):
    """``value`` repeated ``times`` along its batch dimension (``None`` and non-tensors as they are)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    return value.repeat(times, *([1] * (value.dim() - 1)))


def _example_noise(embeds: torch.Tensor, real: torch.Tensor, samples: int, noise: float, seed: int) -> torch.Tensor:
    """``[S, B, L, H]`` Gaussian noise; each example's real tokens get the draws an unpadded copy of it would
    get (one generator per example from ``seed``, right-aligned), scaled by its embeddings' std."""
    draws = torch.zeros((samples, *embeds.shape), dtype=embeds.dtype, device=embeds.device)
    for b in range(embeds.shape[0]):
        keep = real[b].bool()
        n = int(keep.sum())
        std = float(embeds[b, keep].double().std()) if n * embeds.shape[-1] > 1 else 0.0
        generator = torch.Generator().manual_seed(seed)
        # drawn as NoiseTunnel draws (torch.normal with a float32 std tensor), so that one example matches it
        scale = torch.full((samples, n, embeds.shape[-1]), noise * std, dtype=torch.float32)
        draws[:, b, keep] = torch.normal(0.0, scale, generator=generator).to(embeds.dtype).to(embeds.device)
    return draws
