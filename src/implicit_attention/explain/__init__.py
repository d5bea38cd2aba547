"""``explain``: relevance of each input token for one prediction, from the implicit attention."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import call_model, capture, layer_indices, prepare_inputs, select_layers
from ..capture import prepare_model_inputs
from ..capture import model_dtype, on_device
from ..architectures import LayerDecomposition
from ..decompose import (DEFAULT_TOLERANCE, PHASE, Decomposition, build_layers, check_variant, compute_dtype_for,
                         ensure_decomposition_fits)
from . import baselines
from .rules import attribution_rollout, minmax, paper_rollout, rollout
from .target import Target, resolve_target

#: Methods built on the implicit attention matrices (they honour ``variant``).
MATRIX_METHODS: tuple[str, ...] = ("raw", "rollout", "attribution", "paper")
#: Methods that only use the model's gradients or outputs.
BASELINE_METHODS: tuple[str, ...] = ("random", "grad_x_input", "integrated_gradients", "occlusion")
METHODS: tuple[str, ...] = MATRIX_METHODS + BASELINE_METHODS


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
    inputs = prepare_model_inputs(model, input_ids, attention_mask)
    ids, mask, length = inputs.values, inputs.attention_mask, inputs.length
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
    if aggregate not in ("abs", "pos", "mean"):
        raise ValueError(f"aggregate must be 'abs', 'pos' or 'mean', got {aggregate!r}")
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
        relevance = combine(method, built, grads, tgt.row, mask_f, aggregate=aggregate, start_layer=start_layer,
                            causal=inputs.causal)
    decomposition = Decomposition(layers=built, input_ids=ids, attention_mask=mask,
                                  logits=logits.detach(), variant=variant)
    return Explanation(_finish(relevance, mask, compute_dtype), tgt, logits.detach(), decomposition, method, variant)


def layer_maps(layers: Sequence[LayerDecomposition], compute: Callable[[int, LayerDecomposition], torch.Tensor],
               home: torch.device | str) -> Iterator[torch.Tensor]:
    """``compute(l, layers[l])`` for each layer in order, moved to ``home``, one layer at a time.

    Each map is computed on the device of its layer (a model loaded with ``device_map`` has its
    layers on several GPUs) and only then moved to ``home``, where the maps are combined; once a
    map is taken, the layer's cached aggregates are released (:meth:`LayerDecomposition.release`).
    Consumed by :func:`~.rules.rollout` or :func:`~.rules.attribution_rollout`, which use each map
    as it comes, ``home`` therefore holds the accumulated product and one layer's map
    (``[B, L, L]`` or ``[B, R, L]``), and no device ever holds the maps of every layer.
    """
    for index, layer in enumerate(layers):
        with on_device(layer.device):  # kernels launch on the layer's GPU
            value = compute(index, layer).to(home)
        layer.release()
        yield value


def combine(method: str, layers: Sequence[LayerDecomposition], grads: list[torch.Tensor], row: int,
            mask: torch.Tensor, *, aggregate: str = "abs", start_layer: int | None = None,
            causal: bool = True) -> torch.Tensor:
    """Relevance ``[B, L]`` of ``row`` from the decomposed layers by a matrix ``method``, on ``mask``'s device.

    Args:
        method: ``"raw"``, ``"rollout"``, ``"attribution"`` or ``"paper"`` (see :func:`explain`).
        layers: the decomposed layers in model order, each on its own device.
        grads: for ``"attribution"`` the gradient ``[B, L, C]`` of the score at each layer's output,
            for ``"paper"`` at each layer's block input ``[B, L, H]`` (any device; the list is
            emptied as it is used, so that each gradient is freed once read); unused otherwise.
        row: the explained row of the maps.
        mask: ``[B, L]`` 1 for real tokens, in the compute dtype, on the *home* device: where the
            maps are gathered and combined (the device of the model's inputs).
        aggregate: channel aggregation of ``"raw"`` and ``"rollout"``.
        start_layer: first layer of the ``"paper"`` rollout (default: the second half).
        causal: whether the model mixes tokens causally (``"paper"`` keeps its maps causal).
    """
    home, dtype = mask.device, mask.dtype

    def gradient(index: int, device: torch.device) -> torch.Tensor:
        grad, grads[index] = grads[index], None
        return grad.detach().to(device=device, dtype=dtype)

    if method == "raw":
        rows = layer_maps(layers, lambda _, layer: layer.aggregate_rows([row], aggregate)[:, 0], home)
        total = next(rows).clone()
        for part in rows:
            total += part
        return total / len(layers)
    if method == "rollout":
        return rollout(layer_maps(layers, lambda _, layer: layer.aggregate(aggregate), home))[:, row, :]
    if method == "attribution":
        cams = layer_maps(layers, lambda i, layer: layer.attribution(gradient(i, layer.device)), home)
        # Read the propagated part only (R - I), as Chefer et al. drop the explained token's own
        # identity term: otherwise it dwarfs every other token.
        relevance = attribution_rollout(cams)[:, row, :]
        relevance[:, row] -= 1
        return relevance
    if method != "paper":
        raise ValueError(f"{method!r} is not a matrix method; choose one of {MATRIX_METHODS}")
    start = len(layers) // 2 if start_layer is None else start_layer
    if not -len(layers) <= start < len(layers):
        raise IndexError(f"start_layer {start} out of range for {len(layers)} layers")
    start %= len(layers)
    rows = list(layer_maps(layers[start:], lambda _, layer: layer.aggregate_rows([row], "pos")[:, 0], home))
    saliency = [minmax(gradient(i, home).clamp(min=0).amax(dim=-1), mask) for i in range(start, len(layers))]
    return paper_rollout(rows, saliency, mask, row, causal=causal)


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


__all__ = ["BASELINE_METHODS", "Explanation", "MATRIX_METHODS", "METHODS", "combine", "explain", "layer_maps",
           "run_explanation"]
