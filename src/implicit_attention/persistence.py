"""Saving and loading results: :class:`~.explanations.api.Explanation`, :class:`~.decomposition.Decomposition`
and :class:`~.explanations.texts.TextExplanations`.

Layout
    Every result is saved as a **directory** holding two files:

    - ``meta.json``: what the result is (``"kind"``: ``"explanation"``, ``"decomposition"`` or
      ``"text_explanations"``), the format ``"version"``, and its metadata (method, variant,
      target, reconstruction errors, layer names, token strings, ...);
    - ``tensors.safetensors``: its tensors (``safetensors`` format, CPU, dtypes kept), named as
      ``meta.json`` lists them.

    An explanation saved with its decomposition holds it in a sub-directory ``decomposition/``
    of the same layout; text explanations hold one sub-directory ``runs/<i>/`` per pass (its
    :class:`~.explanations.api.Explanation`).

What a loaded :class:`~.decomposition.Decomposition` can do
    It holds no model: nothing is recomputed. Each layer is a :class:`StoredLayer` that serves

    - with its full matrices saved (``aggregates=None``, the default): :attr:`matrix`,
      :meth:`blocks`, every :meth:`aggregate` (and ``channel=``), :meth:`reconstruct`,
      :meth:`measure_error`, :meth:`attribution` for a gradient you give (exact variants only);
    - with aggregates only (``aggregates=("mean", ...)``): those aggregates (and their rows);
      anything that needs the per-channel matrices (another aggregate, a channel, ``matrix``,
      ``reconstruct``) raises :class:`StoredResultError` saying so.

    The reconstruction errors, layer names, indices, variants and ``exact`` flags are the ones
    measured when the decomposition was built.

Errors
    A missing, damaged or mismatched file raises :class:`StoredResultError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .architectures.base import LayerDecomposition
from .catalog import AGGREGATES
from .errors import ImplicitAttentionError

#: Version of the layout written by this module (``meta.json``'s ``"version"``).
FORMAT_VERSION = 1
META_FILE = "meta.json"
TENSORS_FILE = "tensors.safetensors"


class StoredResultError(ImplicitAttentionError, ValueError):
    """A saved result that cannot be read (missing, damaged, of another kind or version), or a loaded
    result asked for what was not saved."""


# ------------------------------------------------------------------------------------------ files
def _write(path: str | os.PathLike, kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise StoredResultError(f"{directory} exists and is not a directory (results are saved as a directory "
                                f"holding {META_FILE} and {TENSORS_FILE})")
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous CPU tensors that share no memory
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    save_file(plain, str(directory / TENSORS_FILE), metadata={"kind": kind, "version": str(FORMAT_VERSION)})
    meta = {"kind": kind, "version": FORMAT_VERSION, **meta, "tensors": sorted(plain)}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    return directory


def _read(path: str | os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(path)
    meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
    if not directory.is_dir():
        raise StoredResultError(f"{directory}: no such directory (a saved {kind} is a directory holding "
                                f"{META_FILE} and {TENSORS_FILE})")
    for needed in (meta_path, tensor_path):
        if not needed.is_file():
            raise StoredResultError(f"{needed}: missing (a saved {kind} holds {META_FILE} and {TENSORS_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoredResultError(f"{meta_path}: damaged, not JSON ({exc})") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise StoredResultError(f"{meta_path}: not a saved implicit_attention result (no 'kind')")
    if meta["kind"] != kind:
        raise StoredResultError(f"{directory} holds a saved {meta['kind']} where a saved {kind} was expected: "
                                f"load it with the class of a {meta['kind']}")
    if meta.get("version") != FORMAT_VERSION:
        raise StoredResultError(f"{meta_path}: format version {meta.get('version')!r}; this library reads "
                                f"version {FORMAT_VERSION}")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StoredResultError(f"{tensor_path}: damaged ({exc})") from None
    missing = sorted(set(meta.get("tensors", [])) - set(tensors))
    if missing:
        raise StoredResultError(f"{tensor_path} does not match {meta_path}: tensor(s) {', '.join(missing[:5])} "
                                "missing (the two files come from different saves?)")
    return meta, tensors


def _put(tensors: dict, name: str, value: torch.Tensor | None) -> bool:
    if value is None:
        return False
    tensors[name] = value
    return True


# ------------------------------------------------------------------------------- decompositions
class StoredLayer(LayerDecomposition):
    """A :class:`~.architectures.LayerDecomposition` read back from disk: no model, nothing recomputed.

    Serves what was saved: the per-channel matrices (then everything that reads them works), or
    channel aggregates only (then :meth:`aggregate` of those, and nothing that needs the matrices).
    """

    def __init__(self, *, index: int, name: str, variant: str, exact: bool, error: float, error_channels: int,
                 shape: Sequence[int], dtype: torch.dtype, architecture: str, matrix: torch.Tensor | None,
                 values: torch.Tensor | None, offset: torch.Tensor | None, output: torch.Tensor | None,
                 mask: torch.Tensor | None, fold: torch.Tensor | None, aggregates: dict[str, torch.Tensor],
                 error_rows: int | None = None):
        batch, channels, length, _ = shape
        self._shape = (int(batch), int(channels), int(length))
        self._stored_dtype = dtype
        self.architecture = architecture
        placeholder = values if values is not None else torch.zeros(batch, length, 0, dtype=dtype)
        super().__init__(index=index, name=name, variant=variant, exact=exact, values=placeholder, offset=offset,
                         output=output if output is not None else placeholder, mask=mask, block_bytes=1 << 30,
                         fold=fold)
        self.stored_matrix = matrix
        self._matrix = matrix
        self._aggregates = dict(aggregates)
        self.error = float(error)
        self.error_channels = int(error_channels)
        self.error_rows = None if error_rows is None else int(error_rows)

    @property
    def batch_size(self) -> int:
        return self._shape[0]

    @property
    def length(self) -> int:
        return self._shape[2]

    @property
    def channels(self) -> int:
        return self._shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._stored_dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._aggregates.values())).device if self.stored_matrix is None else self.stored_matrix.device

    @property
    def stored_aggregates(self) -> tuple[str, ...]:
        """The aggregates that were saved (every one can be computed when the matrices were)."""
        return tuple(self._aggregates)

    def _block(self, channels: slice):
        if self.stored_matrix is None:
            raise StoredResultError(
                f"layer {self.name!r} was saved with its aggregates {', '.join(self._aggregates) or '(none)'} "
                "only: the per-channel matrices (needed for other aggregates, channels, matrix, reconstruct, "
                "attribution) were not saved and a loaded decomposition cannot recompute them; save with "
                "aggregates=None to keep them")
        return self.stored_matrix[:, channels], self._offset[..., channels] if self._offset is not None else None

    def full_matrix(self) -> torch.Tensor:
        self._block(slice(0, 0))                                # raises when not stored
        return self.stored_matrix

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The identity for an exact variant; an ablation's output-side factor (a gate) was not saved."""
        if not self.exact:
            raise StoredResultError(f"layer {self.name!r} (variant {self.variant!r}) leaves out an output-side factor "
                                    "that attribution multiplies back in; it was not saved: attribution of a loaded "
                                    "decomposition needs an exact variant")
        return grad


def _select(count: int, layers: int | Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(count))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for i in chosen:
        if not -count <= int(i) < count:
            raise IndexError(f"layer position {i} out of range for a decomposition of {count} layers")
        out.append(int(i) % count)
    return list(dict.fromkeys(out))


def decomposition_payload(decomposition, *, layers: int | Sequence[int] | None = None,
                          aggregates: Sequence[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a decomposition (see :func:`save_decomposition`)."""
    if isinstance(aggregates, str):
        aggregates = (aggregates,)
    if aggregates is not None:
        bad = [a for a in aggregates if a not in AGGREGATES]
        if bad or not aggregates:
            raise ValueError(f"aggregates must name some of {', '.join(AGGREGATES)}, got {list(aggregates)!r}")
    tensors: dict[str, torch.Tensor] = {"input_values": decomposition.input_values}
    meta: dict[str, Any] = {"variant": decomposition.variant,
                            "has_attention_mask": _put(tensors, "attention_mask", decomposition.attention_mask),
                            "has_logits": _put(tensors, "logits", decomposition.logits), "layers": []}
    for k, position in enumerate(_select(len(decomposition.layers), layers)):
        layer = decomposition.layers[position]
        prefix = f"layers.{k}."
        entry = {"index": layer.index, "name": layer.name, "variant": layer.variant, "exact": bool(layer.exact),
                 "error": float(layer.error), "error_channels": int(layer.error_channels),
                 "error_rows": getattr(layer, "error_rows", None),
                 "architecture": getattr(layer, "architecture", type(layer).__name__),
                 "shape": [layer.batch_size, layer.channels, layer.length, layer.length],
                 "dtype": str(layer.dtype).removeprefix("torch."), "position": position}
        _put(tensors, prefix + "mask", layer.mask)
        if aggregates is None:
            entry["stored"] = "matrix"
            tensors[prefix + "matrix"] = layer.full_matrix()
            tensors[prefix + "values"] = layer.values
            tensors[prefix + "offset"] = layer.offset
            tensors[prefix + "output"] = layer.output
            entry["has_fold"] = _put(tensors, prefix + "fold", layer.fold)
            entry["aggregates"] = [how for how in AGGREGATES if how in getattr(layer, "_aggregates", {})]
        else:
            entry["stored"] = "aggregates"
            entry["aggregates"] = list(dict.fromkeys(aggregates))
        for how in entry["aggregates"]:
            tensors[prefix + f"aggregate.{how}"] = layer.aggregate(how)
        meta["layers"].append(entry)
    return meta, tensors


def save_decomposition(decomposition, path: str | os.PathLike, *, layers: int | Sequence[int] | None = None,
                       aggregates: Sequence[str] | None = None) -> Path:
    """Save ``decomposition`` to the directory ``path`` (``meta.json`` + ``tensors.safetensors``).

    ``layers``: positions in ``decomposition.layers`` to keep (negatives count from the end;
    default all). ``aggregates``: ``None`` saves each layer's full per-channel matrices
    ``[B, C, L, L]`` (with values, offset and output: a loaded layer serves everything); names
    among ``"mean"``, ``"abs"``, ``"pos"`` save only those ``[B, L, L]`` channel aggregates, ``C``
    times smaller. Returns the directory.
    """
    meta, tensors = decomposition_payload(decomposition, layers=layers, aggregates=aggregates)
    return _write(path, "decomposition", meta, tensors)


def decomposition_from_payload(meta: dict, tensors: dict[str, torch.Tensor], where: str = ""):
    from .decomposition import Decomposition

    try:
        built = []
        for k, entry in enumerate(meta["layers"]):
            prefix = f"layers.{k}."
            full = entry["stored"] == "matrix"
            dtype = getattr(torch, entry["dtype"])
            aggregates = {how: tensors[prefix + f"aggregate.{how}"] for how in entry["aggregates"]}
            matrix = tensors[prefix + "matrix"] if full else None
            if matrix is not None and list(matrix.shape) != list(entry["shape"]):
                raise StoredResultError(f"{where}: layer {k}'s matrix is {list(matrix.shape)}, meta.json says "
                                        f"{entry['shape']}")
            built.append(StoredLayer(
                index=entry["index"], name=entry["name"], variant=entry["variant"], exact=entry["exact"],
                error=entry["error"], error_channels=entry["error_channels"], error_rows=entry.get("error_rows"),
                shape=entry["shape"], dtype=dtype,
                architecture=entry.get("architecture", ""), matrix=matrix,
                values=tensors[prefix + "values"] if full else None,
                offset=tensors[prefix + "offset"] if full else None,
                output=tensors[prefix + "output"] if full else None, mask=tensors.get(prefix + "mask"),
                fold=tensors[prefix + "fold"] if full and entry.get("has_fold") else None, aggregates=aggregates))
        return Decomposition(layers=built, input_values=tensors["input_values"],
                             attention_mask=tensors["attention_mask"] if meta["has_attention_mask"] else None,
                             logits=tensors["logits"] if meta["has_logits"] else None, variant=meta["variant"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, StoredResultError):
            raise
        raise StoredResultError(f"{where}: meta.json and the tensors do not describe a decomposition "
                                f"({type(exc).__name__}: {exc})") from None


def load_decomposition(path: str | os.PathLike):
    """The :class:`~.decomposition.Decomposition` saved at ``path`` by :func:`save_decomposition`
    (its layers are :class:`StoredLayer`: see this module's docstring for what they can do)."""
    meta, tensors = _read(path, "decomposition")
    return decomposition_from_payload(meta, tensors, str(path))


# --------------------------------------------------------------------------------- explanations
def _plain(value):
    """A JSON value for a diagnostic that is not a tensor."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def save_explanation(explanation, path: str | os.PathLike, *, decomposition: bool = False,
                     layers: int | Sequence[int] | None = None, aggregates: Sequence[str] | None = ("mean",)) -> Path:
    """Save ``explanation`` to the directory ``path``.

    Saved: relevance, logits, span, the target (ids, position, row, kind, contrast ids, log-prob ids),
    method, variant, diagnostics (tensors as tensors, other values as JSON). A callable target
    is saved by name only (the loaded target's ``fn`` is ``None``). ``decomposition=True`` also
    saves the decomposition (matrix methods) in ``path/decomposition/`` with ``layers`` and
    ``aggregates`` as for :func:`save_decomposition` (default: the ``"mean"`` aggregates only);
    otherwise the loaded explanation's ``decomposition`` is ``None``.
    """
    target = explanation.target
    tensors: dict[str, torch.Tensor] = {"relevance": explanation.relevance, "logits": explanation.logits,
                                        "target.ids": target.ids}
    diagnostics_json, diagnostics_tensors = {}, []
    for key, value in explanation.diagnostics.items():
        if isinstance(value, torch.Tensor):
            tensors[f"diagnostics.{key}"] = value
            diagnostics_tensors.append(key)
        else:
            diagnostics_json[key] = _plain(value)
    meta = {"method": explanation.method, "variant": explanation.variant,
            "target": {"position": int(target.position), "row": int(target.row), "kind": target.kind,
                       "has_other": _put(tensors, "target.other", target.other),
                       "has_over": _put(tensors, "target.over", target.over),
                       "function": getattr(target.fn, "__name__", repr(target.fn)) if target.fn is not None else None},
            "has_span": _put(tensors, "span", explanation.span),
            "diagnostics": diagnostics_json, "diagnostic_tensors": diagnostics_tensors,
            "has_decomposition": bool(decomposition and explanation.decomposition is not None)}
    directory = _write(path, "explanation", meta, tensors)
    if meta["has_decomposition"]:
        save_decomposition(explanation.decomposition, directory / "decomposition", layers=layers,
                           aggregates=aggregates)
    return directory


def explanation_from_payload(meta: dict, tensors: dict[str, torch.Tensor], directory: Path):
    from .explanations.api import Explanation
    from .explanations.target import Target

    try:
        t = meta["target"]
        target = Target(ids=tensors["target.ids"], position=t["position"], row=t["row"], kind=t["kind"],
                        other=tensors["target.other"] if t["has_other"] else None,
                        over=tensors["target.over"] if t["has_over"] else None)
        diagnostics = dict(meta["diagnostics"])
        diagnostics.update({key: tensors[f"diagnostics.{key}"] for key in meta["diagnostic_tensors"]})
        decomposition = load_decomposition(directory / "decomposition") if meta["has_decomposition"] else None
        return Explanation(relevance=tensors["relevance"], target=target, logits=tensors["logits"],
                           decomposition=decomposition, method=meta["method"], variant=meta["variant"],
                           diagnostics=diagnostics, span=tensors["span"] if meta["has_span"] else None)
    except (KeyError, TypeError) as exc:
        raise StoredResultError(f"{directory}: meta.json and the tensors do not describe an explanation "
                                f"({type(exc).__name__}: {exc})") from None


def load_explanation(path: str | os.PathLike):
    """The :class:`~.explanations.api.Explanation` saved at ``path`` by :func:`save_explanation`."""
    meta, tensors = _read(path, "explanation")
    return explanation_from_payload(meta, tensors, Path(path))


# ---------------------------------------------------------------------------- text explanations
def save_text_explanations(result, path: str | os.PathLike, *, decomposition: bool = False,
                           layers: int | Sequence[int] | None = None,
                           aggregates: Sequence[str] | None = ("mean",)) -> Path:
    """Save :class:`~.explanations.texts.TextExplanations` (what :func:`~.explain_texts` returns) to ``path``.

    Per text: the text, token strings, token ids, relevance, prediction, explained target, span
    and offsets; per pass (``runs/<i>/``): its :class:`~.explanations.api.Explanation` (with its
    decomposition when ``decomposition=True``, as for :func:`save_explanation`), input ids and mask.
    """
    run_ids = {id(run): i for i, run in enumerate(result.runs)}
    tensors: dict[str, torch.Tensor] = {}
    examples = []
    for k, ex in enumerate(result.examples):
        tensors[f"examples.{k}.relevance"] = ex.relevance
        examples.append({"text": ex.text, "tokens": ex.tokens, "token_ids": ex.token_ids,
                         "prediction": {"label": ex.prediction.label, "token_id": ex.prediction.token_id,
                                        "probability": ex.prediction.probability,
                                        "probabilities": ex.prediction.probabilities,
                                        "is_label": ex.prediction.is_label},
                         "target": ex.target.to_dict(), "run": run_ids[id(ex.run)], "row": ex.row,
                         "in_span": ex.in_span, "offsets": [list(o) if o is not None else None for o in ex.offsets],
                         "span_text": ex.span_text})
    for i, run in enumerate(result.runs):
        tensors[f"runs.{i}.input_ids"] = run.input_ids
        tensors[f"runs.{i}.attention_mask"] = run.attention_mask
    directory = _write(path, "text_explanations", {"examples": examples, "runs": len(result.runs)}, tensors)
    for i, run in enumerate(result.runs):
        save_explanation(run.explanation, directory / "runs" / str(i), decomposition=decomposition, layers=layers,
                         aggregates=aggregates)
    return directory


def load_text_explanations(path: str | os.PathLike):
    """The :class:`~.explanations.texts.TextExplanations` saved at ``path`` by :func:`save_text_explanations`."""
    from .explanations.texts import ExplainedTarget, TextExplanation, TextExplanations, TextRun
    from .text import Prediction

    meta, tensors = _read(path, "text_explanations")
    directory = Path(path)
    try:
        runs = [TextRun(explanation=load_explanation(directory / "runs" / str(i)),
                        input_ids=tensors[f"runs.{i}.input_ids"], attention_mask=tensors[f"runs.{i}.attention_mask"])
                for i in range(meta["runs"])]
        examples = [TextExplanation(
            text=ex["text"], tokens=list(ex["tokens"]), token_ids=list(ex["token_ids"]),
            relevance=tensors[f"examples.{k}.relevance"], prediction=Prediction(**ex["prediction"]),
            target=ExplainedTarget(**ex["target"]), run=runs[ex["run"]], row=ex["row"], in_span=list(ex["in_span"]),
            offsets=[tuple(o) if o is not None else None for o in ex["offsets"]], span_text=ex["span_text"])
            for k, ex in enumerate(meta["examples"])]
    except (KeyError, TypeError, IndexError) as exc:
        raise StoredResultError(f"{directory}: meta.json and the tensors do not describe text explanations "
                                f"({type(exc).__name__}: {exc})") from None
    return TextExplanations(examples=examples, runs=runs)


__all__ = ["FORMAT_VERSION", "META_FILE", "TENSORS_FILE", "StoredLayer", "StoredResultError", "load_decomposition",
           "load_explanation", "load_text_explanations", "save_decomposition", "save_explanation",
           "save_text_explanations"]
