"""Reports of explained texts: from what :func:`~implicit_attention.explain_texts` returns to the files
of :func:`~implicit_attention.render.write_report` (``report.html``, ``explanation.json``, PNGs).

``implicit-attention explain --out`` and the per-example pages of ``explain-dataset --reports`` both
write their reports with :func:`write_text_report`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["decompositions_for_report", "write_text_report"]


def decompositions_for_report(loaded, result, *, variant: str, layers=None, check: bool = True) -> dict:
    """``{id(run): Decomposition}`` of each run of ``result``: the explanation's own, or (a baseline,
    which decomposes nothing) a decomposition made for the report's matrices."""
    from .decomposition import decompose

    out = {}
    for run in result.runs:
        out[id(run)] = run.explanation.decomposition
        if out[id(run)] is None:
            out[id(run)] = decompose(loaded.model, run.input_ids, run.attention_mask, variant=variant, layers=layers,
                                     check=check)
    return out


def write_text_report(out: str | os.PathLike, loaded, result, decompositions: dict, *, method: str, variant: str,
                      settings: dict, compared: dict | None = None, channels: Sequence[int] | None = None,
                      channel_layer: int = -1, overwrite: bool = False) -> Path:
    """Write the report of ``result`` into ``out`` and return the path of ``report.html``.

    Args:
        loaded: the :class:`~implicit_attention.LoadedModel` the texts were explained with.
        result: :class:`~implicit_attention.TextExplanations`.
        decompositions: :func:`decompositions_for_report` of ``result``.
        method, variant, settings: what the report's header says.
        compared: ``{"method:variant": TextExplanations}`` other explanations of the same texts, shown
            by the page's switcher.
        channels: channels of the decomposed layer ``channel_layer`` (negatives from the end) whose own
            matrices join the viewer.

    Raises:
        ValueError: a channel or ``channel_layer`` out of range (before anything is written).
    """
    from .architectures import find_layers
    from .render import ReportExample, ReportLayer, write_report
    from .render import sampled_rows as _sampled_rows

    names = {name: arch.name for name, _, arch in find_layers(loaded.model)}
    runs = [decompositions[id(run)] for run in result.runs]
    layers = [ReportLayer(index=layer.index, name=layer.name, error=max(float(d.layers[i].error) for d in runs),
                          architecture=names.get(layer.name, ""), exact=bool(layer.exact), channels=layer.channels,
                          error_channels=min(d.layers[i].error_channels for d in runs),
                          error_rows=_sampled_rows(d.layers[i] for d in runs))
              for i, layer in enumerate(runs[0].layers)]                  # the worst error over the runs
    examples = []
    for number, example in enumerate(result):
        keep = example.real_positions
        run_layers = decompositions[id(example.run)].layers
        matrices = {layer.index: {how: _rows(layer.aggregate(how)[example.row], keep) for how in ("mean", "abs")}
                    for layer in run_layers}
        if channels is not None:
            layer = _channel_layer(run_layers, channel_layer)
            for channel in _channels_of(layer, channels):
                matrices[layer.index][f"channel {channel}"] = _rows(layer.channel_matrix(channel)[example.row], keep)
        alternatives = {name: other[number].relevance for name, other in (compared or {}).items()}
        examples.append(ReportExample(text=example.text, tokens=example.tokens, relevance=example.relevance,
                                      prediction=example.prediction.to_dict(), target=example.target.to_dict(),
                                      token_ids=example.token_ids, matrices=matrices, in_span=example.in_span,
                                      offsets=example.offsets, span_text=example.span_text, words=example.words(),
                                      diagnostics=example.diagnostics, alternatives=alternatives))
    return write_report(out, examples=examples, layers=layers, method=method, variant=variant, model=loaded.name,
                        settings=settings, overwrite=overwrite)


def _rows(matrix, keep):
    """``[L, L]`` of the padded batch -> ``[T, T]`` of the text's own positions, float64 on the CPU."""
    return matrix.index_select(0, keep).index_select(1, keep).detach().cpu().double()


def _channel_layer(layers, index: int):
    """The decomposed layer ``index`` (negatives from the end) for ``--channel-layer``."""
    if not -len(layers) <= index < len(layers):
        raise ValueError(f"--channel-layer {index} is out of range: {len(layers)} layer(s) were decomposed")
    return layers[index]


def _channels_of(layer, channels: Sequence[int]) -> list[int]:
    """``channels`` of ``layer`` (negatives from the end), checked against its channel count."""
    out = []
    for channel in channels:
        if not -layer.channels <= channel < layer.channels:
            raise ValueError(f"--channels {channel} is out of range: layer {layer.index} ({layer.name}) has "
                             f"{layer.channels} channels")
        out.append(channel % layer.channels)
    return out
