"""Exporting decompositions to other tools' formats.

:func:`to_bertviz` turns a :class:`~implicit_attention.decomposition.Decomposition` (computed, or loaded
with :meth:`~implicit_attention.decomposition.Decomposition.load`) into the attentions a Hugging Face
transformer returns with ``output_attentions=True``, which ``bertviz`` draws. ``bertviz`` is not a
dependency of this library: install it yourself (``pip install bertviz``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .catalog import AGGREGATES
from .devices import on_device


class BertvizAttention(NamedTuple):
    """What :func:`to_bertviz` returns (unpack it: ``attention, tokens = to_bertviz(...)``).

    Attributes:
        attention: one ``[B, heads, L, L]`` float32 CPU tensor per decomposed layer, in model order
            (Hugging Face's ``outputs.attentions``); head ``h`` is ``heads[h]``.
        tokens: the token strings of the example (``[L]``), or one list per example when
            ``example=None``.
        heads: what each head is: ``"mean"``, ``"abs"``, ``"pos"`` (channel aggregates) or
            ``"channel 17"``.
        layers: the decomposed layers' names (``"backbone.layers.3.mixer"``), one per attention.
    """

    attention: tuple[torch.Tensor, ...]
    tokens: list
    heads: list[str]
    layers: list[str]


def _token_strings(decomposition, tokens, rows: list[int], keep: list[torch.Tensor]) -> list:
    """Per selected row, its tokens' strings (padding dropped where ``keep`` drops it)."""
    ids = decomposition.input_values
    out = []
    for row, kept in zip(rows, keep):
        if tokens is None:
            if ids.dim() != 2:                                      # pixel values: patch positions
                names = [str(i) for i in range(decomposition.layers[0].length)] if decomposition.layers else []
            else:
                names = [str(int(i)) for i in ids[row]]
        elif hasattr(tokens, "tokenizer") and hasattr(tokens, "model"):   # a LoadedModel: display strings
            from .text import token_strings

            names = token_strings(tokens, ids[row], torch.ones_like(ids[row]))
        elif hasattr(tokens, "convert_ids_to_tokens"):             # a tokenizer
            names = list(tokens.convert_ids_to_tokens(ids[row].tolist()))
        else:
            given = list(tokens[row]) if tokens and not isinstance(tokens[0], str) else list(tokens)
            length = decomposition.layers[0].length if decomposition.layers else len(given)
            if len(given) == int(kept.sum()) and len(given) != length:
                out.append(given)                                   # the real tokens only, as a text has
                continue
            if len(given) != length:
                raise ValueError(f"tokens holds {len(given)} strings; the input has {length} positions "
                                 f"({int(kept.sum())} real)")
            names = given
        out.append([name for name, k in zip(names, kept.tolist()) if k])
    return out


def to_bertviz(decomposition, tokens=None, *, how: Sequence[str] | None = None, channels: Sequence[int] | None = None,
               example: int | None = 0) -> BertvizAttention:
    """The decomposition's layers as Hugging Face attentions, for ``bertviz.head_view`` / ``model_view``.

    Each decomposed layer becomes one ``[B, heads, L, L]`` float32 CPU tensor (model order); its heads
    are the channel aggregates ``how`` (``[B, L, L]`` maps of
    :meth:`~implicit_attention.architectures.LayerDecomposition.aggregate`) followed by the single
    channels ``channels``. A row of a head sums to what the aggregate's row sums to (over the real
    tokens' columns when ``example`` drops padding); the implicit attention of a recurrent layer is
    not a softmax: rows need not sum to 1, and ``"mean"`` and single channels may be negative.

    Args:
        decomposition: a :class:`~implicit_attention.decomposition.Decomposition` (a loaded one serves
            the aggregates it was saved with, and channels only if its matrices were saved).
        tokens: the token strings: a list (``[L]`` positions, or the real tokens only), one list per
            example, a :class:`~implicit_attention.LoadedModel` (each token decoded, ``" film"``), a
            tokenizer (its ``convert_ids_to_tokens``, ``"Ġfilm"``), or ``None`` (the ids as strings;
            positions for image models).
        how: aggregates among ``"mean"``, ``"abs"``, ``"pos"``; default ``("mean",)`` without
            ``channels``, none with them.
        channels: operator channels shown one per head (negatives count from the end).
        example: the batch row to export (``B = 1``, its padding positions dropped, what
            ``head_view`` draws); ``None``: the whole batch as it is, padding included.

    Example::

        from bertviz import head_view
        import implicit_attention as ia
        from implicit_attention.interop import to_bertviz

        loaded = ia.load_model()
        ids = loaded.tokenizer("an utterly charming film", return_tensors="pt").input_ids
        decomposition = ia.decompose(loaded.model, ids)
        attention, tokens, heads, _ = to_bertviz(decomposition, loaded, how=("mean", "abs"))
        head_view(attention, tokens)                      # in a notebook; heads[h] names head h
    """
    if not decomposition.layers:
        raise ValueError("the decomposition holds no layer")
    how = (("mean",) if not channels else ()) if how is None else ((how,) if isinstance(how, str) else tuple(how))
    channels = list(channels or [])
    bad = [h for h in how if h not in AGGREGATES]
    if bad:
        raise ValueError(f"how must name aggregates among {', '.join(AGGREGATES)}, got {bad!r}")
    if not how and not channels:
        raise ValueError("nothing to export: give how= aggregates or channels=")
    batch = decomposition.layers[0].batch_size
    if example is not None and not -batch <= example < batch:
        raise IndexError(f"example {example} out of range for a batch of {batch}")
    rows = list(range(batch)) if example is None else [example % batch]
    mask = decomposition.attention_mask
    length = decomposition.layers[0].length
    if example is not None and mask is not None and mask.dim() == 2 and mask.shape[1] == length:
        keep = [mask[r].bool().cpu() for r in rows]
    else:
        keep = [torch.ones(length, dtype=torch.bool) for _ in rows]
    attention = []
    for layer in decomposition.layers:
        with on_device(layer.device):
            maps = [layer.aggregate(h) for h in how] + [layer.aggregate(channel=c) for c in channels]
        heads = torch.stack([m.detach().to("cpu", torch.float32) for m in maps], dim=1)    # [B, H, L, L]
        if example is not None:
            kept = keep[0]
            heads = heads[rows][:, :, kept][:, :, :, kept]
        attention.append(heads.contiguous())
    names = _token_strings(decomposition, tokens, rows, keep)
    return BertvizAttention(attention=tuple(attention), tokens=names[0] if example is not None else names,
                            heads=list(how) + [f"channel {c % decomposition.layers[0].channels}" for c in channels],
                            layers=[layer.name for layer in decomposition.layers])


__all__ = ["BertvizAttention", "to_bertviz"]
