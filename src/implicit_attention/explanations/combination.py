"""Combining the decomposed layers' maps into relevance: each layer's map on its own device, moved home
one layer at a time and folded into the rule's accumulator (:mod:`.rules`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..architectures import LayerDecomposition
from ..catalog import MATRIX_METHODS
from ..devices import on_device
from .rules import attribution_rollout, mask_map, minmax, paper_rollout, rollout


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
            signed: bool = False) -> torch.Tensor:
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
        signed: ``"attribution"`` without the clamp (negative evidence kept).

    Every layer's map has its padding rows and columns zeroed before it is combined, so that a
    padded example gets the relevance it gets alone (row normalisation loses no mass to padding).
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
        maps = layer_maps(layers, lambda _, layer: layer.aggregate(aggregate), home)
        return rollout(mask_map(M, mask) for M in maps)[:, row, :]
    if method in ("attribution", "signed_attribution"):
        signed = signed or method == "signed_attribution"
        cams = (mask_map(cam, mask) for cam in
                layer_maps(layers, lambda i, layer: layer.attribution(gradient(i, layer.device), signed), home))
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
    attention = layer_maps(layers[start:], lambda _, layer: layer.aggregate("pos"), home)   # masked by the rule
    saliency = (minmax(gradient(i, home).clamp(min=0).amax(dim=-1), mask) for i in range(start, len(layers)))
    return paper_rollout(attention, saliency, mask, row)
