"""``explain``: relevance of each input token for one prediction, from the implicit attention or a baseline."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures.registry import padding_leaks
from ..catalog import AGGREGATES, BASELINE_METHODS, METHODS
from ..decomposition import (
    DEFAULT_TOLERANCE,
    PHASE,
    Decomposition,
    build_layers,
    check_variant,
    compute_dtype_for,
    ensure_decomposition_fits,
)
from ..devices import model_dtype
from ..errors import PaddingError
from ..hooks import capture, layer_indices, select_layers
from ..inputs import as_module, prepare_model_inputs
from . import baselines
from .combination import combine
from .target import Target, resolve_target


@dataclass
class Explanation:
    """The full result behind :func:`explain`.

    Attributes:
        relevance: ``[B, L]`` relevance of each input token (0 on padding).
        target: the explained score (target ids and position).
        logits: the model's logits on the input.
        decomposition: the decomposed layers for matrix methods, else ``None``.
        method, variant: what was asked.
    """

    relevance: torch.Tensor
    target: Target
    logits: torch.Tensor
    decomposition: Decomposition | None
    method: str
    variant: str


def explain(model: nn.Module, input_ids, attention_mask=None, *, method: str = "attribution",
            target=None, position: int = -1, variant: str = "unified",
            layers: int | Sequence[int] | None = None, **options) -> torch.Tensor:
    """Relevance ``[B, L]`` of the input tokens for the logit of ``target`` at ``position``.

    Args:
        model: a supported model with a head (``MambaForCausalLM``, ``FalconMambaForCausalLM``, ...).
        input_ids: ``[B, L]`` or ``[L]``; pad batches on the left.
        attention_mask: ``[B, L]`` or ``None``.
        method: ``"raw"`` (target row of the layer-mean aggregated map), ``"rollout"`` (attention
            rollout), ``"attribution"`` (gradient-weighted attention, Chefer et al. 2021, the
            default), ``"paper"`` (the paper's ViM recipe), or a baseline: ``"random"``,
            ``"grad_x_input"``, ``"integrated_gradients"``, ``"occlusion"``.
        target: id (or ``[B]`` ids) whose logit is explained; default the predicted one.
        position: output position of a causal LM (default the last).
        variant: the implicit attention formulation (``"unified"``; ``"s6"`` gives the
            predecessor's maps; ``"no_conv"``, ``"no_gate"``, ``"no_act"``). Baselines ignore it.
        layers: token-mixing layers to use (default all).
        **options: ``aggregate`` (``"abs"`` default, or ``"pos"`` / ``"mean"``) for raw and rollout;
            ``start_layer`` for ``"paper"`` (default: the second half of the layers);
            ``steps`` for integrated gradients (32); ``seed`` for random (0); ``dtype``,
            ``check``, ``tolerance`` as in :func:`~implicit_attention.decompose`.
    """
    return run_explanation(model, input_ids, attention_mask, method=method, target=target,
                           position=position, variant=variant, layers=layers, **options).relevance


def run_explanation(model: nn.Module, input_ids, attention_mask=None, *, method: str = "attribution",
                    target=None, position: int = -1, variant: str = "unified",
                    layers: int | Sequence[int] | None = None, aggregate: str = "abs",
                    start_layer: int | None = None, steps: int = 32, seed: int = 0,
                    dtype: torch.dtype | None = None, check: bool = True,
                    tolerance: float | None = None, progress: bool | None = None) -> Explanation:
    """:func:`explain`, returning the :class:`Explanation` with the decomposition and target."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    # input adapter: token ids or pixels; tokens L, causal or not, the class token's row
    model = as_module(model)
    inputs = prepare_model_inputs(model, input_ids, attention_mask)
    ids, mask, length = inputs.values, inputs.attention_mask, inputs.length
    refuse_padding_that_leaks(model, mask)
    compute_dtype = compute_dtype_for(model, dtype)
    if method in BASELINE_METHODS:
        with torch.no_grad():
            logits = inputs.call(model).logits
        tgt = resolve_target(logits, target, position, length, row=inputs.classifier_row)
        _warn_if_padding(mask, tgt.row)
        relevance = _baseline(method, model, inputs, mask, tgt, steps=steps, seed=seed)
        return Explanation(_finish(relevance, mask, compute_dtype), tgt, logits, None, method, variant)

    targets = select_layers(model, layers)
    check_variant(targets, variant)
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be 'abs', 'pos' or 'mean', got {aggregate!r}")
    if method == "rollout" and aggregate == "mean":
        raise ValueError("rollout multiplies row-normalised maps and needs them non-negative: aggregate='mean' "
                         "is the signed channel mean, whose row sums can be zero or negative; use 'abs' or 'pos' "
                         "(the signed mean is available with method='raw')")
    ensure_decomposition_fits(targets, inputs, compute_dtype, method=method)
    need_grad = method in ("attribution", "paper")
    embeds = inputs.embed(model).requires_grad_(need_grad)
    grads: list[torch.Tensor] = []
    with torch.set_grad_enabled(need_grad), \
            capture(model, targets, keep_graph=need_grad, block_inputs=method == "paper") as captured:
        out = inputs.call(model, embeds)
        logits = getattr(out, "logits", None)
        tgt = resolve_target(logits, target, position, length, row=inputs.classifier_row)
        _warn_if_padding(mask, tgt.row)
        if need_grad:
            wrt = [r.output for r in captured] if method == "attribution" else [r.block_input for r in captured]
            grads = list(torch.autograd.grad(tgt.score(logits).sum(), wrt))
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(model_dtype(model), 1e-4)
    with torch.profiler.record_function(PHASE):
        built = build_layers(captured, layer_indices(model, captured), variant=variant, dtype=compute_dtype,
                             check=check, tolerance=tol, progress=progress)
        captured.clear()  # the layers' inputs and call arguments: no longer needed
        mask_f = inputs.token_mask(compute_dtype)
        relevance = combine(method, built, grads, tgt.row, mask_f, aggregate=aggregate, start_layer=start_layer)
    decomposition = Decomposition(layers=built, input_values=ids, attention_mask=mask,
                                  logits=logits.detach(), variant=variant)
    return Explanation(_finish(relevance, mask, compute_dtype), tgt, logits.detach(), decomposition, method, variant)


def refuse_padding_that_leaks(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Raise :class:`~implicit_attention.errors.PaddingError` for a padded batch of a model that reads padding.

    Its prediction for a padded text differs from the text's own, so no explanation of the batch
    explains the text; each text must run alone.
    """
    if mask is None or bool(mask.all()):
        return
    leaks = padding_leaks(model)
    if leaks:
        shown = ", ".join(leaks[:2]) + (", ..." if len(leaks) > 2 else "")
        raise PaddingError(
            f"{type(model).__name__} reads padding tokens (its layers {shown} ignore the attention mask, or carry "
            "a bias into real tokens), so padding changes its predictions: explain one text at a time (an "
            "unpadded row); implicit_attention.explain_texts and the command line do so for this model")


def _baseline(method: str, model, ids, mask, tgt: Target, *, steps: int, seed: int) -> torch.Tensor:
    if method == "random":
        return baselines.random_relevance(ids, seed=seed)
    if method == "grad_x_input":
        return baselines.grad_x_input(model, ids, mask, tgt)
    if method == "integrated_gradients":
        return baselines.integrated_gradients(model, ids, mask, tgt, steps=steps)
    return baselines.occlusion(model, ids, mask, tgt)


def _warn_if_padding(mask: torch.Tensor | None, row: int) -> None:
    """Right-padded batches put the explained position on padding: say so instead of explaining it silently."""
    if mask is not None and mask.dim() == 2 and bool((mask[:, row] == 0).any()):
        bad = (mask[:, row] == 0).nonzero().reshape(-1).tolist()
        warnings.warn(f"the explained position {row} is padding in example(s) {bad}: pad batches on the left "
                      "(tokenizer.padding_side = 'left') or pass position=", UserWarning, stacklevel=3)


def _finish(relevance: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    relevance = relevance.detach().to(dtype)
    return relevance if mask is None else relevance * mask.to(dtype)
