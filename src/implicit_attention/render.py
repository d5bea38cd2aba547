"""Showing explanations: coloured tokens in a terminal, matrix images, and an HTML report.

- :func:`color_tokens` colours tokens by relevance with ANSI 24-bit background colours (red for
  positive relevance, blue for negative, intensity ``|r| / max |r|``), or writes plain text
  with the normalised relevance in brackets: ``<s>[+0.10] great[+1.00] film[-0.50]``.
- :func:`matrix_png` draws one ``[L, L]`` map with matplotlib (Agg, no GUI, no global state).
- :func:`write_report` writes ``report.html`` and ``explanation.json`` into a directory,
  atomically. The page is one self-contained file (inline script and images, no network): a token
  heat map with hover values, a viewer of the aggregated implicit-attention matrices drawn in the
  page from the saved numbers (a layer slider, an aggregate picker, the row of a hovered token
  highlighted, each cell's value on hover) and the reconstruction errors. The matrices are also
  written as PNG files beside it (linked from the page) for papers and slides.

Output directory policy of :func:`write_report`: everything is first written into a fresh
temporary directory next to ``out_dir`` (same file system) and only moved into place once every
file is complete; on any failure the temporary directory is removed and ``out_dir`` is left as
it was. If ``out_dir`` does not exist or is empty, the temporary directory is renamed to it (one
atomic step). If it holds files, :class:`OutputDirectoryError` is raised unless
``overwrite=True``; then only the report's own files are replaced: the new files are moved in,
and the files listed in the previous ``explanation.json`` that the new report does not have are
deleted. Other files in the directory are never touched.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import shutil
import tempfile
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ImplicitAttentionError

__all__ = [
    "OutputDirectoryError", "ReportExample", "ReportLayer", "color_tokens", "display_token", "matrix_png",
    "normalize_relevance", "relevance_rgb", "versions", "write_report",
]

REPORT_FILES = ("report.html", "explanation.json")
RESET = "\x1b[0m"
GREY = "\x1b[38;5;244m"  # prompt-template tokens in the terminal


class OutputDirectoryError(ImplicitAttentionError, FileExistsError):
    """The report's output directory cannot be used (not empty without ``overwrite``, or not a directory)."""


# ---------------------------------------------------------------------------------- relevance
def _to_floats(relevance) -> list[float]:
    if hasattr(relevance, "detach"):
        relevance = relevance.detach().cpu().double().reshape(-1).tolist()
    elif hasattr(relevance, "tolist"):
        relevance = relevance.reshape(-1).tolist()
    return [float(r) for r in relevance]


def normalize_relevance(relevance, span: Sequence[bool] | None = None) -> list[float]:
    """``r / max |r|`` with the maximum over the ``span`` tokens (default all); non-finite values become 0.

    Span tokens land in ``[-1, 1]``; tokens outside it (a prompt template) share the scale and may
    exceed it. All zeros stay all zeros.
    """
    values = [r if math.isfinite(r) else 0.0 for r in _to_floats(relevance)]
    inside = values if span is None else [r for r, keep in zip(values, span) if keep]
    scale = max((abs(r) for r in inside), default=0.0)
    return [r / scale for r in values] if scale > 0 else [0.0 for _ in values]


def relevance_rgb(weight: float) -> tuple[int, int, int]:
    """Background colour of a normalised relevance in ``[-1, 1]``: white to red (+), white to blue (-)."""
    weight = max(-1.0, min(1.0, weight))
    fade = round(255 * (1 - abs(weight)))
    return (255, fade, fade) if weight >= 0 else (fade, fade, 255)


def display_token(token: str) -> str:
    """``token`` with control and invisible characters made visible (``\\n``, ``\\x1b``, ...).

    Keeps terminal escapes typed into the input text from reaching the terminal.
    """
    out = []
    for ch in token:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") and ch != " ":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def color_tokens(tokens: Sequence[str], relevance, *, color: bool = True, span: Sequence[bool] | None = None) -> str:
    """One line of ``tokens`` coloured by ``relevance`` (one value per token), normalised over ``span``.

    With ``color``, each token is wrapped as ``ESC[38;2;0;0;0;48;2;R;G;Bm`` + token + ``ESC[0m``
    (black text on the :func:`relevance_rgb` background). Without, each token is followed by
    its normalised relevance in brackets: ``" great[+1.00]"``. Tokens outside ``span`` (a prompt
    template) are greyed: grey text without background, or their value in parentheses,
    ``" sentiment(+1.52)"``. Tokens are concatenated as they are (word-initial tokens carry their
    leading space).
    """
    weights = normalize_relevance(relevance, span)
    if len(weights) != len(tokens):
        raise ValueError(f"got {len(tokens)} tokens but {len(weights)} relevance values")
    span = [True] * len(tokens) if span is None else list(span)
    parts = []
    for token, weight, keep in zip(tokens, weights, span):
        shown = display_token(token)
        if not keep:
            parts.append(f"{GREY}{shown}{RESET}" if color else f"{shown}({weight:+.2f})")
        elif color:
            r, g, b = relevance_rgb(weight)
            parts.append(f"\x1b[38;2;0;0;0;48;2;{r};{g};{b}m{shown}{RESET}")
        else:
            parts.append(f"{shown}[{weight:+.2f}]")
    return "".join(parts)


# ------------------------------------------------------------------------------------- images
def _tick_label(token: str) -> str:
    # "$" would start matplotlib mathtext; keep the label short.
    text = display_token(token).replace("$", r"\$")
    if not text.strip():
        text = "␣" * max(1, len(text))  # a visible space
    return text if len(text) <= 16 else text[:15] + "…"


def matrix_png(matrix, tokens: Sequence[str] | None, path: str | os.PathLike, title: str = "", *,
               symmetric: bool | None = None, dpi: int = 100) -> Path:
    """Draw an ``[L, L]`` map (rows: output position, columns: input position) to ``path``.

    Signed maps (``symmetric``, default: when the map has negative entries) use a diverging
    red/blue scale centred on 0; non-negative maps a sequential scale. Tokens label the axes
    when ``L <= 64``.
    """
    fig = _matrix_figure(matrix, tokens, title, symmetric)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs in the default font
        fig.savefig(path, dpi=dpi, format="png")
    return path


def _matrix_figure(matrix, tokens: Sequence[str] | None, title: str, symmetric: bool | None):
    """The matplotlib ``Figure`` (on an Agg canvas) that :func:`matrix_png` saves."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = matrix.detach().cpu().double().numpy() if hasattr(matrix, "detach") else np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.shape[0] != data.shape[1]:
        raise ValueError(f"matrix must be [L, L], got shape {tuple(data.shape)}")
    length = data.shape[0]
    if tokens is not None and len(tokens) != length:
        raise ValueError(f"got {len(tokens)} tokens for a {length} x {length} matrix")
    finite = data[np.isfinite(data)]
    if symmetric is None:
        symmetric = bool(finite.size and finite.min() < 0)
    size = min(12.0, max(4.5, 2.5 + 0.16 * length))
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if symmetric:
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        bound = bound or 1.0
        image = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    else:
        image = ax.imshow(data, cmap="Reds", vmin=0.0, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel("input token j")
    ax.set_ylabel("output position i")
    if tokens is not None and length <= 64:
        labels = [_tick_label(t) for t in tokens]
        fontsize = 8 if length <= 24 else 6 if length <= 40 else 5
        ax.set_xticks(range(length))
        ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(length))
        ax.set_yticklabels(labels, fontsize=fontsize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs in the default font
        _fit_margins(fig, ax, bar.ax)
    return fig


def _fit_margins(fig, ax, bar) -> None:
    """Margins that just fit the tick labels, axis labels, title and colour bar (``bar``: its axes), measured
    on the canvas's renderer.

    What ``tight_layout`` does, in a fraction of its time: it lays out every text of the figure for an
    extra draw (about 40% of a report image's time with 64 labelled ticks), where the longest label per
    side is all that sets a margin."""
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    pad = 8.0 * fig.dpi / 72                                   # a few points between texts and the edge

    def extent(texts, along: str) -> float:
        sizes = [getattr(t.get_window_extent(renderer), along) for t in texts if t.get_text()]
        return max(sizes, default=0.0)

    ticks = 4.0 * fig.dpi / 72                                 # the tick marks and their gap
    left = extent(ax.get_yticklabels(), "width") + extent([ax.yaxis.label], "width") + ticks + 2 * pad
    bottom = extent(ax.get_xticklabels(), "height") + extent([ax.xaxis.label], "height") + ticks + 2 * pad
    top = extent([ax.title], "height") + 2 * pad
    # the colour bar's tick labels (a handful, laid out here) stand out to the right of its own box, and
    # the scale's offset ("1e-8") above it
    bar_box, bar_tight = bar.get_window_extent(renderer), bar.get_tightbbox(renderer)
    right = bar_tight.x1 - bar_box.x1 + 2 * pad
    top = max(top, bar_tight.y1 - bar_box.y1 + 2 * pad)
    fig.subplots_adjust(left=min(left / width, 0.45), bottom=min(bottom / height, 0.45),
                        right=1 - min(right / width, 0.3), top=1 - min(top / height, 0.2))


# ------------------------------------------------------------------------------------- report
@dataclass
class ReportLayer:
    """One decomposed layer in a report: its index, module path, architecture and reconstruction error.

    ``channels`` and ``error_channels`` are the layer's ``channels`` and the number its exactness
    check covered (``LayerDecomposition.error_channels``; ``None``: not known); fewer checked than
    the layer has (long inputs, above ``implicit_attention.memory.FULL_CHECK_ENTRIES``) marks the
    error as measured on sampled channels. ``error_rows``: the rows it covered where it sampled rows
    of every channel instead (``None``: every row).
    """

    index: int
    name: str
    error: float
    architecture: str = ""
    exact: bool = True
    channels: int | None = None
    error_channels: int | None = None
    error_rows: int | None = None

    @property
    def sampled(self) -> bool:
        """Whether the error was measured on a sample of the layer's channels or rows."""
        fewer_channels = self.channels is not None and self.error_channels is not None \
            and self.error_channels < self.channels
        return fewer_channels or self.error_rows is not None


def sampled_rows(layers) -> int | None:
    """The fewest rows any of ``layers`` (one layer over several runs) checked on sampled rows, else ``None``."""
    rows = [layer.error_rows for layer in layers if getattr(layer, "error_rows", None) is not None]
    return min(rows) if rows else None


@dataclass
class ReportExample:
    """One explained text.

    Attributes:
        text: the input text as given.
        tokens: display strings of the real tokens (the prompt, padding removed).
        relevance: one value per token.
        prediction: e.g. ``Prediction.to_dict()``: ``label``, ``probability``, ``probabilities``, ...
        target: the explained score: ``id``, ``token``, ``label`` (or ``None``), ``position``.
        token_ids: the ids of ``tokens`` (optional).
        matrices: ``{layer index: {"mean": [L, L], "abs": [L, L]}}`` aggregated implicit attention
            over the real tokens (optional).
        in_span: per token, whether it is the user's text (else the prompt template: greyed, and left out
            of the normalisation); ``None``: every token.
        offsets: per token, ``(start, end)`` characters of ``span_text`` (``None`` outside the span).
        span_text: the user's text as the model read it.
        words: ``[(word, relevance), ...]`` the span merged into words (optional).
        diagnostics: what the method reported beside the relevance (e.g. ``convergence_delta``).
        pictures: ``[(file name, caption, write)]`` images shown with the example (an image model's
            relevance over the image): ``write(path)`` draws the file into the report's directory.
        alternatives: ``{"method:variant": relevance}`` other explanations of the same target (one value
            per token each): the page's switcher recolours the tokens with them.
    """

    text: str
    tokens: list[str]
    relevance: Any
    prediction: dict
    target: dict
    token_ids: list[int] | None = None
    matrices: dict[int, dict[str, Any]] = field(default_factory=dict)
    in_span: list[bool] | None = None
    offsets: list[tuple[int, int] | None] | None = None
    span_text: str | None = None
    words: list[tuple[str, float]] | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    pictures: list[tuple[str, str, Any]] = field(default_factory=list)
    alternatives: dict[str, Any] = field(default_factory=dict)


MATRIX_TITLES = {"mean": "signed channel mean of A", "abs": "channel mean of |A|", "pos": "channel mean of max(A, 0)"}


def versions() -> dict[str, str]:
    """Versions of implicit_attention, torch, transformers and Python."""
    from . import __version__
    out = {"implicit_attention": __version__, "python": platform.python_version()}
    for module in ("torch", "transformers"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


def _clean(x):
    """JSON-safe copy: non-finite floats become ``None``; tensors / arrays become lists."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().tolist()
    elif hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_report(out_dir: str | os.PathLike, *, examples: Sequence[ReportExample], layers: Sequence[ReportLayer],
                 method: str, variant: str, model: str, settings: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``report.html``, ``explanation.json`` and the matrix PNGs into ``out_dir``, atomically.

    See the module docstring for what happens when ``out_dir`` already has files. Returns the
    path of ``report.html``.

    ``explanation.json`` holds ``model``, ``method``, ``variant``, ``settings``, ``layers`` (index,
    name, architecture, exact, error, channels, error_channels, sampled), ``max_error``, ``examples``
    (text, tokens, token_ids, relevance, relevance_normalized, prediction, target, images), ``files``
    (every file of the report) and ``versions``.

    Raises:
        OutputDirectoryError: ``out_dir`` is a file, or is not empty and ``overwrite`` is false.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputDirectoryError(f"output path {str(out)!r} exists and is not a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and not overwrite:
        raise OutputDirectoryError(
            f"output directory {str(out)!r} is not empty; choose a new directory or pass --force "
            "(overwrite=True) to replace the report files in it (other files are kept)")
    for example in examples:
        for name, relevance in [("", example.relevance), *example.alternatives.items()]:
            if len(_to_floats(relevance)) != len(example.tokens):
                raise ValueError(f"example {example.text!r}: {len(example.tokens)} tokens but "
                                 f"{len(_to_floats(relevance))} relevance values{' of ' + name if name else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = _write_files(tmp, examples=examples, layers=layers, method=method, variant=variant, model=model,
                             settings=settings or {})
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it a normal directory's mode
        if not out.exists():
            os.rename(tmp, out)
        elif not any(out.iterdir()):
            out.rmdir()
            os.rename(tmp, out)
        else:
            _replace_files(tmp, out, files)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "report.html"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_files(tmp: Path, out: Path, files: list[str]) -> None:
    """Move the new report files into a non-empty ``out``; delete the old report's leftovers."""
    old: list[str] = []
    try:
        previous = json.loads((out / "explanation.json").read_text(encoding="utf-8"))
        old = [f for f in previous.get("files", []) if isinstance(f, str)]
    except (OSError, ValueError, AttributeError):
        pass
    # images first, the two report files last: a reader never sees a report without its images
    ordered = [f for f in files if f not in REPORT_FILES] + [f for f in REPORT_FILES if f in files]
    for name in ordered:
        target = out / name
        if target.is_dir():
            raise OutputDirectoryError(f"{str(target)!r} is a directory; cannot replace it with a report file")
        os.replace(tmp / name, target)
    for name in old:
        if name not in files and name == Path(name).name and name.endswith(".png"):
            try:
                (out / name).unlink()
            except OSError:
                pass


#: Matrices of at most this many tokens are embedded in the page for its viewer (above: the PNGs only).
MAX_VIEWER_TOKENS = 256


def _matrix_payload(matrix) -> list[float] | None:
    """``[L, L]`` -> its rows flattened, 4 significant digits (what a heat map can show), or ``None``
    above :data:`MAX_VIEWER_TOKENS` tokens."""
    values = matrix.detach().cpu().double() if hasattr(matrix, "detach") else matrix
    rows = values.tolist() if hasattr(values, "tolist") else [list(r) for r in values]
    if len(rows) > MAX_VIEWER_TOKENS:
        return None
    return [float(f"{v:.4g}") if math.isfinite(v) else 0.0 for row in rows for v in row]


def _data_uri(path: Path) -> str:
    import base64
    kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _viewer_data(examples, layers) -> list[dict]:
    """What the page's script draws: per example its display tokens and
    ``{layer index: {aggregate: flattened [L, L]}}``."""
    data = []
    for example in examples:
        matrices = {}
        for layer in layers:
            for how, matrix in example.matrices.get(layer.index, {}).items():
                payload = _matrix_payload(matrix)
                if payload is not None:
                    matrices.setdefault(str(layer.index), {})[how] = payload
        data.append({"tokens": [display_token(t) for t in example.tokens], "matrices": matrices})
    return data


def _write_files(tmp: Path, *, examples, layers, method, variant, model, settings) -> list[str]:
    images: list[list[dict]] = []
    for e, example in enumerate(examples):
        row = []
        for layer in layers:
            for how, matrix in example.matrices.get(layer.index, {}).items():
                name = f"matrix_ex{e}_layer{layer.index}_{how.replace(' ', '-')}.png"
                title = f"layer {layer.index} ({layer.name}): {MATRIX_TITLES.get(how, how)}"
                matrix_png(matrix, example.tokens, tmp / name, title)
                row.append({"file": name, "layer": layer.index, "aggregate": how})
        images.append(row)
    pictures = []
    for example in examples:
        for name, _, write in example.pictures:
            write(tmp / name)
        pictures.append([{"file": name, "caption": caption} for name, caption, _ in example.pictures])
    files = ([img["file"] for row in images for img in row] + [p["file"] for row in pictures for p in row]
             + list(REPORT_FILES))
    errors = [layer.error for layer in layers if math.isfinite(layer.error)]
    info = {
        "format": "implicit-attention-explanation",
        "format_version": 1,
        "model": model,
        "method": method,
        "variant": variant,
        "settings": settings,
        "layers": [{"index": l.index, "name": l.name, "architecture": l.architecture, "exact": l.exact,
                    "error": l.error, "channels": l.channels, "error_channels": l.error_channels,
                    "error_rows": l.error_rows, "sampled": l.sampled} for l in layers],
        "max_error": max(errors) if errors else None,
        "examples": [{
            "text": ex.text,
            "tokens": list(ex.tokens),
            "token_ids": list(ex.token_ids) if ex.token_ids is not None else None,
            "relevance": _to_floats(ex.relevance),
            "relevance_normalized": normalize_relevance(ex.relevance, ex.in_span),
            "in_span": list(ex.in_span) if ex.in_span is not None else [True] * len(ex.tokens),
            "offsets": None if ex.offsets is None else [list(o) if o is not None else None for o in ex.offsets],
            "span_text": ex.span_text,
            "words": None if ex.words is None else [[w, r] for w, r in ex.words],
            "prediction": ex.prediction,
            "target": ex.target,
            "diagnostics": dict(ex.diagnostics),
            "images": images[i],
            **({"pictures": pictures[i]} if pictures[i] else {}),
            **({"alternatives": {name: {"relevance": _to_floats(values),
                                        "relevance_normalized": normalize_relevance(values, ex.in_span)}
                                 for name, values in ex.alternatives.items()}} if ex.alternatives else {}),
        } for i, ex in enumerate(examples)],
        "files": files,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / "explanation.json").write_text(json.dumps(_clean(info), indent=2, allow_nan=False, ensure_ascii=False)
                                          + "\n", encoding="utf-8")
    # the page shows its pictures inline: one file that travels alone
    inline = {p["file"]: _data_uri(tmp / p["file"]) for ex in info["examples"] for p in ex.get("pictures", [])}
    page = {"layers": [{"index": l.index, "name": l.name} for l in layers], "examples": _viewer_data(examples, layers)}
    for page_example, ex in zip(page["examples"], info["examples"]):
        page_example["explanations"] = {
            f"{method}:{variant}": {"values": ex["relevance"], "normalized": ex["relevance_normalized"]},
            **{name: {"values": alt["relevance"], "normalized": alt["relevance_normalized"]}
               for name, alt in ex.get("alternatives", {}).items()}}
        page_example["in_span"] = ex["in_span"]
    (tmp / "report.html").write_text(_html(info, page, inline), encoding="utf-8")
    return files


# ---------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, monospace; }
.meta td:first-child { font-weight: 600; }
.tokens { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; white-space: pre-wrap; overflow-wrap: anywhere;
          line-height: 2; padding: 0.6em; border: 1px solid #ddd; border-radius: 4px; }
.tok { color: #000; border-radius: 2px; padding: 0.1em 0; cursor: help; }
.template { color: #999; }
.legend span { display: inline-block; padding: 0 0.5em; font-family: ui-monospace, monospace; }
.text { font-style: italic; }
.pred { font-size: 1.1em; }
.matrices { display: flex; flex-wrap: wrap; gap: 1em; }
.matrices figure { margin: 0; }
.matrices img { max-width: 34em; width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.note { color: #555; font-size: 0.9em; }
.viewer canvas { border: 1px solid #ccc; image-rendering: pixelated; max-width: 100%; cursor: crosshair; }
.controls { margin: 0.5em 0; display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap; }
.readout, .token-readout { font-family: ui-monospace, monospace; font-size: 0.9em; color: #333; min-height: 1.4em; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x, spec: str = ".3e") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _token_html(tokens: Sequence[str], relevance: Sequence[float], normalized: Sequence[float],
                in_span: Sequence[bool] | None = None) -> str:
    spans = []
    in_span = [True] * len(tokens) if in_span is None else in_span
    for i, (tok, rel, w, keep) in enumerate(zip(tokens, relevance, normalized, in_span)):
        tip = f"#{i} {display_token(tok)!r}: relevance {_fmt(rel, '.4g')} (normalised {w:+.3f})"
        if not keep:   # the prompt template: greyed, its value in the tooltip
            spans.append(f'<span class="tok template" data-i="{i}" data-token="{_e(repr(display_token(tok)))}" '
                         f'title="{_e(tip + "; prompt template")}">'
                         f"{_e(display_token(tok))}</span>")
            continue
        r, g, b = relevance_rgb(w)
        spans.append(f'<span class="tok" data-i="{i}" data-token="{_e(repr(display_token(tok)))}" '
                     f'style="background: rgb({r}, {g}, {b})" title="{_e(tip)}">'
                     f"{_e(display_token(tok))}</span>")
    return "".join(spans)


def _sampled(layer: dict) -> str:
    """`` (sampled: k of C channels)`` (or ``R rows, every channel``) after the error of a layer whose check
    sampled."""
    if not layer.get("sampled"):
        return ""
    if layer.get("error_rows") is not None:
        return f" (sampled: {layer['error_rows']} rows, all {layer['channels']} channels)"
    return f" (sampled: {layer['error_channels']} of {layer['channels']} channels)"


def _switcher(index: int, info: dict, example: dict) -> str:
    """The method and variant picker of an example computed with several (``alternatives``), or nothing."""
    if not example.get("alternatives"):
        return ""
    names = [f"{info['method']}:{info['variant']}", *example["alternatives"]]
    options = "".join(f'<option value="{_e(name)}">{_e(name)}</option>' for name in names)
    return (f'<p class=controls><label>explanation <select class=method-switch data-example="{index}">{options}'
            f"</select></label></p>")


def _json_for_script(data) -> str:
    """JSON safe inside ``<script>``: no ``<`` at all, so nothing can close the element early."""
    return json.dumps(_clean(data), allow_nan=False, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def _viewer_html(index: int, example: dict, page_example: dict, layers: list[dict]) -> str:
    """The matrix viewer of example ``index``: layer slider, aggregate picker, canvas, readout, PNG links."""
    shown = [l for l in layers if str(l["index"]) in page_example["matrices"]]
    links = " ".join(f'<a href="{_e(img["file"])}">layer {_e(img["layer"])} {_e(img["aggregate"])}</a>'
                     for img in example["images"])
    if not shown:
        return (f"<h3>Aggregated implicit attention per layer</h3><p class=note>Too many tokens to draw in the page; "
                f"the PNG files: {links}</p>") if links else ""
    aggregates = list(dict.fromkeys(how for l in shown for how in page_example["matrices"][str(l["index"])]))
    aggregates.sort(key=lambda how: list(MATRIX_TITLES).index(how) if how in MATRIX_TITLES else len(MATRIX_TITLES))
    options = "".join(f'<option value="{_e(how)}">{_e(MATRIX_TITLES.get(how, how))}</option>' for how in aggregates)
    return (f'<h3>Aggregated implicit attention per layer</h3><div class=viewer data-example="{index}">'
            f'<div class=controls><label>layer <input type=range class=layer-slider min=0 max={len(shown) - 1} '
            f'value=0 step=1></label> <output class=layer-name></output> '
            f'<label>aggregate <select class=aggregate>{options}</select></label></div>'
            f'<canvas class=matrix width=570 height=570></canvas><div class=readout>&nbsp;</div>'
            f'<p class=note>Row i is the output token, column j the input token it reads: A[i, j] averaged over the '
            f"layer's channels, or one channel's own, as the picker says. Hover a cell for its value; hover a token above to mark its row. "
            f'PNG files: {links}</p></div>')


_SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  function colour(v, scale, signed) {
    const w = scale > 0 ? Math.max(-1, Math.min(1, v / scale)) : 0;
    if (!signed) { const c = Math.round(255 * (1 - Math.abs(w))); return [255, c, c]; }
    const c = Math.round(255 * (1 - Math.abs(w)));
    return w >= 0 ? [255, c, c] : [c, c, 255];
  }
  document.querySelectorAll(".viewer").forEach(function (viewer) {
    const k = Number(viewer.dataset.example), example = data.examples[k], tokens = example.tokens;
    const layers = data.layers.filter(l => String(l.index) in example.matrices);
    const slider = viewer.querySelector(".layer-slider"), picker = viewer.querySelector(".aggregate");
    const canvas = viewer.querySelector("canvas"), readout = viewer.querySelector(".readout");
    const label = viewer.querySelector(".layer-name"), n = tokens.length;
    const cell = Math.max(1, Math.floor(480 / n)), size = cell * n;
    // token labels along the top and the left where a cell is tall enough to read one
    const labelled = cell >= 9, margin = labelled ? 90 : 0;
    canvas.width = size + margin; canvas.height = size + margin;
    viewer.dataset.origin = margin; viewer.dataset.cell = cell;
    const context = canvas.getContext("2d");
    let row = -1;
    function current() {
      const layer = layers[Number(slider.value)];
      return {layer: layer, values: (example.matrices[String(layer.index)] || {})[picker.value]};
    }
    function short(token) { return token.length > 12 ? token.slice(0, 11) + "\u2026" : token; }
    function labels() {
      if (!labelled) return;
      context.fillStyle = "#333"; context.font = Math.min(13, cell - 2) + "px monospace";
      context.textBaseline = "middle";
      for (let i = 0; i < n; i++) {
        context.textAlign = "right";
        context.fillStyle = i === row ? "#0a0" : "#333";
        context.fillText(short(tokens[i]), margin - 4, margin + (i + 0.5) * cell);
        context.save(); context.translate(margin + (i + 0.5) * cell, margin - 4); context.rotate(-Math.PI / 2);
        context.textAlign = "left"; context.fillStyle = "#333"; context.fillText(short(tokens[i]), 0, 0);
        context.restore();
      }
    }
    function draw() {
      const {layer, values} = current();
      label.textContent = "layer " + layer.index + " (" + layer.name + ")";
      viewer.dataset.layer = layer.index;
      context.clearRect(0, 0, canvas.width, canvas.height);
      labels();
      if (!values) { readout.textContent = "not computed for this layer"; return; }
      const signed = picker.value === "mean" || picker.value.startsWith("channel");
      const scale = values.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
      label.textContent += "; colour scale " + (signed ? "\u00b1" : "0 to ") + scale.toPrecision(3);
      const image = context.createImageData(size, size);
      for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
        const [r, g, b] = colour(values[i * n + j], scale, signed);
        for (let y = i * cell; y < (i + 1) * cell; y++) for (let x = j * cell; x < (j + 1) * cell; x++) {
          const o = 4 * (y * size + x);
          image.data[o] = r; image.data[o + 1] = g; image.data[o + 2] = b; image.data[o + 3] = 255;
        }
      }
      context.putImageData(image, margin, margin);
      viewer.dataset.checksum = values.reduce((s, v, i) => s + v * ((i % 7) + 1), 0).toPrecision(6);
      if (row >= 0) {
        context.strokeStyle = "#0a0"; context.lineWidth = Math.max(1, Math.min(4, cell / 6));
        context.strokeRect(margin + 0.5, margin + row * cell + 0.5, size - 1, cell - 1);
      }
    }
    slider.addEventListener("input", draw);
    picker.addEventListener("change", function () {
      // a channel's map exists for one layer only: go to a layer that has what was picked
      if (!current().values) {
        const at = layers.findIndex(l => picker.value in (example.matrices[String(l.index)] || {}));
        if (at >= 0) slider.value = at;
      }
      draw();
    });
    canvas.addEventListener("mousemove", function (event) {
      const box = canvas.getBoundingClientRect();
      const j = Math.floor(((event.clientX - box.left) * canvas.width / box.width - margin) / cell);
      const i = Math.floor(((event.clientY - box.top) * canvas.height / box.height - margin) / cell);
      const {values} = current();
      if (!values || i < 0 || j < 0 || i >= n || j >= n) return;
      readout.textContent = "A[" + i + ", " + j + "] = " + values[i * n + j].toPrecision(4) + "   (row " +
        JSON.stringify(tokens[i]) + " reads " + JSON.stringify(tokens[j]) + ")";
    });
    document.querySelectorAll('.tokens[data-example="' + k + '"] .tok').forEach(function (span) {
      span.addEventListener("mouseenter", function () { row = Number(span.dataset.i); draw(); });
      span.addEventListener("mouseleave", function () { row = -1; draw(); });
    });
    draw();
  });
  document.querySelectorAll(".method-switch").forEach(function (picker) {
    const k = Number(picker.dataset.example), example = data.examples[k];
    picker.addEventListener("change", function () {
      const chosen = example.explanations[picker.value];
      document.querySelectorAll('.tokens[data-example="' + k + '"] .tok').forEach(function (span) {
        const i = Number(span.dataset.i), w = chosen.normalized[i];
        const tip = "#" + i + " " + span.dataset.token + ": relevance " + Number(chosen.values[i]).toPrecision(4) +
          " (normalised " + (w >= 0 ? "+" : "") + w.toFixed(3) + ")";
        if (example.in_span[i]) {
          const [r, g, b] = colour(w, 1, true);
          span.style.background = "rgb(" + r + ", " + g + ", " + b + ")";
          span.title = tip;
        } else {
          span.title = tip + "; prompt template";
        }
      });
      document.querySelectorAll('.tokens[data-example="' + k + '"]').forEach(box => box.dataset.shown = picker.value);
    });
  });
  document.querySelectorAll(".tokens").forEach(function (box) {
    const status = box.nextElementSibling;
    box.querySelectorAll(".tok").forEach(function (span) {
      span.addEventListener("mouseenter", function () { status.textContent = span.title; });
    });
  });
})();
"""


def _html(info: dict, page: dict | None = None, inline: dict[str, str] | None = None) -> str:
    settings = info.get("settings") or {}
    rows = [("model", info["model"]), ("method", info["method"]), ("variant", info["variant"])]
    rows += [(k, v) for k, v in settings.items() if v is not None]
    rows += [("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())), ("created", info["created"])]
    meta = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    lay = "".join(
        f"<tr><td class=num>{_e(l['index'])}</td><td><code>{_e(l['name'])}</code></td><td>{_e(l['architecture'])}</td>"
        f"<td>{'exact' if l['exact'] else 'ablation'}</td><td class=num>{_e(_fmt(l['error']))}"
        f"{_e(_sampled(l))}</td></tr>"
        for l in info["layers"])
    sampled = (" On long inputs the check covers a sample: every channel on a few rows spread over the input "
               "(the last row among them) where the architecture reads rows cheaply, else a sample of each "
               "layer's channels (spread over the width); the layers marked sampled were checked on those only.") \
        if any(l.get("sampled") for l in info["layers"]) else ""
    layer_table = (f"<table><tr><th>layer</th><th>module</th><th>architecture</th><th>variant is</th>"
                   f"<th>relative reconstruction error</th></tr>{lay}</table>"
                   f"<p class=note>Maximum error: {_e(_fmt(info['max_error']))}. The error is "
                   f"‖reconstruction − module output‖ / ‖module output‖ over the whole batch.{_e(sampled)}</p>") \
        if info["layers"] else "<p class=note>No layer was decomposed.</p>"
    legend = ('<p class="legend">Relevance: <span style="background: rgb(255, 0, 0)">for the explained score</span> '
              '<span style="background: rgb(255, 255, 255)">0</span> '
              '<span style="background: rgb(0, 0, 255); color: #fff">against it</span> '
              "(normalised by the largest |relevance| of the example's own input; tokens that are not the user's "
              "input, a prompt template or a class token, are <span class=template>greyed</span>; hover a token "
              "for its value)</p>")
    sections = []
    for i, ex in enumerate(info["examples"]):
        pred = ex["prediction"] or {}
        probs = "".join(f"<tr><td>{_e(k)}</td><td class=num>{_e(_fmt(v, '.4f'))}</td></tr>"
                        for k, v in (pred.get("probabilities") or {}).items())
        kind = "label" if pred.get("kind") == "label" else "next token"
        tgt = ex["target"] or {}
        id_word = "class id" if kind == "label" else "token id"    # a classifier's target is a class
        target = (f"{_e(tgt.get('label') or repr(tgt.get('token')))} ({id_word} {_e(tgt.get('id'))}, "
                  f"output position {_e(tgt.get('position'))})")
        page_example = (page or {}).get("examples", [{}] * (i + 1))[i] or {"matrices": {}}
        matrices = _viewer_html(i, ex, page_example, (page or {}).get("layers", []))
        shown = "".join(f'<figure><img src="{_e((inline or {}).get(p["file"], p["file"]))}" alt="{_e(p["caption"])}"><figcaption>'
                        f'{_e(p["caption"])}</figcaption></figure>' for p in ex.get("pictures", []))
        pictures = f"<h3>Relevance on the image</h3><div class=matrices>{shown}</div>" if shown else ""
        sections.append(
            f"<h2>Example {i + 1}</h2><p class=text>{_e(ex['text'])}</p>"
            f"<p class=pred>Prediction ({kind}): <strong>{_e(pred.get('label', ''))}</strong> "
            f"with probability {_e(_fmt(pred.get('probability'), '.4f'))}</p>"
            f"<table><tr><th>{'label' if kind == 'label' else 'token'}</th><th>probability</th></tr>{probs}</table>"
            + (f"<p>Explained score: <strong>{_e(tgt['score'])}</strong> at output position "
               f"{_e(tgt.get('position'))} (target {_e(tgt.get('label') or repr(tgt.get('token')))}, {id_word} "
               f"{_e(tgt.get('id'))})</p>" if tgt.get("score") else
               f"<p>Explained score: logit of {target}</p>")
            + pictures + f"<h3>Relevance of the input {'patches' if shown else 'tokens'}</h3>{legend}"
            f"{_switcher(i, info, ex)}"
            f"<div class=tokens data-example={i}>"
            f"{_token_html(ex['tokens'], ex['relevance'], ex['relevance_normalized'], ex['in_span'])}</div>"
            f"<div class=token-readout>&nbsp;</div>"
            f"{matrices}")
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>implicit attention: {_e(info['method'])} explanation</title><style>{_CSS}</style></head><body>"
            f"<h1>Implicit attention explanation</h1><table class=meta>{meta}</table>"
            f"<h2>Per-layer reconstruction error</h2>{layer_table}{''.join(sections)}"
            f"<p class=note>Written by implicit_attention {_e(info['versions'].get('implicit_attention', ''))}; "
            f"the data is in <a href=explanation.json>explanation.json</a>.</p>"
            + (f'<script id=report-data type="application/json">{_json_for_script(page)}</script>'
               f"<script>{_SCRIPT}</script>" if page else "")
            + "</body></html>\n")


# ------------------------------------------------------------------------------ data set index
#: ``index.html`` of ``explain-dataset`` shows at most this many examples (all are in results.jsonl).
MAX_INDEX_ROWS = 2000

_INDEX_CSS = """
.examples td { vertical-align: top; }
.examples th { cursor: pointer; user-select: none; white-space: nowrap; }
.examples th[data-order=ascending]::after { content: " \\25B2"; }
.examples th[data-order=descending]::after { content: " \\25BC"; }
.examples .tokens { border: none; padding: 0; line-height: 1.7; }
.examples tr.wrong td.correct { color: #b00; font-weight: 600; }
.examples details { font-size: 0.85em; color: #444; }
.filters { margin: 0.8em 0; display: flex; gap: 1.5em; align-items: center; }
"""

_INDEX_SCRIPT = r"""
(function () {
  const table = document.querySelector("table.examples"), body = table.tBodies[0];
  const headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach(function (header, column) {
    if (!header.dataset.type) return;
    header.addEventListener("click", function () {
      const ascending = header.dataset.order !== "ascending";
      headers.forEach(h => delete h.dataset.order);
      header.dataset.order = ascending ? "ascending" : "descending";
      const numeric = header.dataset.type === "number";
      const key = row => row.cells[column].dataset.value;
      const rows = Array.from(body.rows).sort(function (a, b) {
        const x = key(a), y = key(b);
        const order = numeric ? (Number(x) - Number(y)) : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach(row => body.appendChild(row));
    });
  });
  const wrong = document.getElementById("only-wrong"), search = document.getElementById("search");
  const count = document.getElementById("shown");
  function filter() {
    const needle = search.value.toLowerCase();
    let shown = 0;
    Array.from(body.rows).forEach(function (row) {
      const visible = (!wrong.checked || row.classList.contains("wrong")) &&
        (!needle || row.dataset.text.includes(needle));
      row.hidden = !visible; shown += visible ? 1 : 0;
    });
    count.textContent = shown;
  }
  wrong.addEventListener("change", filter);
  search.addEventListener("input", filter);
  filter();
})();
"""


def dataset_index_html(summary: dict, rows: Sequence[dict], reports: dict[int, str] | None = None) -> str:
    """``index.html`` of an ``explain-dataset`` run: the run's figures (accuracy, reconstruction error,
    counts) and a sortable, filterable table of the examples (at most :data:`MAX_INDEX_ROWS`), each
    with its tokens coloured by relevance and a row of its own (``index.html#ex-<index>``).

    Args:
        summary: the run's ``summary.json`` object.
        rows: its ``results.jsonl`` objects (:func:`implicit_attention.dataset.read_results`).
        reports: ``{index: relative path of its report.html}`` of the examples that have a full report:
            their number links to it (the others' to their own row).
    """
    reports = reports or {}
    counts = summary.get("counts", {})
    accuracy = summary.get("accuracy")
    error = (summary.get("reconstruction_error") or {}).get("max")
    facts = [("model", summary.get("model")), ("method", summary.get("method")), ("variant", summary.get("variant")),
             ("explained score", summary.get("score")), ("input", summary.get("input")),
             ("explained", f"{counts.get('explained', len(rows))} of {counts.get('inputs', len(rows))} inputs"),
             ("accuracy", "n/a (no gold labels)" if accuracy is None else
              f"{accuracy:.4f} ({counts.get('correct')} of {counts.get('labelled')} labelled)"),
             ("max reconstruction error", _fmt(error))]
    meta = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in facts if v is not None)
    has_id = any("id" in row for row in rows)
    shown = list(rows[:MAX_INDEX_ROWS])
    lines = []
    for row in shown:
        relevance = [0.0 if r is None else r for r in row.get("relevance") or []]
        tokens = row.get("tokens") or []
        normalized = normalize_relevance(relevance, row.get("in_span")) if tokens else []
        correct = row.get("correct")
        link = (f'<a class=report href="{_e(reports[row["index"]])}" title="its full report">{row["index"]}</a>'
                if row["index"] in reports else f'<a href="#ex-{row["index"]}">{row["index"]}</a>')
        mark = "" if correct is None else ("yes" if correct else "no")
        details = "".join(f"<div>{_e(k)}: {_e(_fmt(v, '.4f'))}</div>" for k, v in
                          (row.get("probabilities") or {}).items())
        cells = [
            f"<td class=num data-value={row['index']}>{link}</td>",
            (f"<td data-value=\"{_e(row.get('id', ''))}\">{_e(row.get('id', ''))}</td>" if has_id else ""),
            f"<td data-value=\"{_e(row.get('text', ''))}\"><div class=tokens>"
            f"{_token_html(tokens, relevance, normalized, row.get('in_span'))}</div>"
            f"<details><summary>probabilities</summary>{details}</details></td>",
            f"<td data-value=\"{_e(row.get('gold') if row.get('gold') is not None else '')}\">"
            f"{_e(row.get('gold') if row.get('gold') is not None else '')}</td>",
            f"<td data-value=\"{_e(row.get('prediction', ''))}\">{_e(row.get('prediction', ''))}</td>",
            f"<td class=num data-value={row.get('probability') or 0}>{_e(_fmt(row.get('probability'), '.4f'))}</td>",
            f"<td class=correct data-value=\"{mark}\">{mark}</td>",
            f"<td class=num data-value={row.get('batch_max_error') or 0}>{_e(_fmt(row.get('batch_max_error')))}</td>",
        ]
        lines.append(f"<tr id=ex-{row['index']} class=\"{'wrong' if correct is False else ''}\" "
                     f"data-text=\"{_e(str(row.get('text', '')).lower())}\">{''.join(cells)}</tr>")
    head = ("<th data-type=number>#</th>" + ("<th data-type=text>id</th>" if has_id else "")
            + "<th data-type=text>text (tokens coloured by relevance)</th><th data-type=text>gold</th>"
            "<th data-type=text>prediction</th><th data-type=number>probability</th><th data-type=text>correct</th>"
            "<th data-type=number>batch max error</th>")
    cut = (f"<p class=note>The first {len(shown)} of {len(rows)} examples; all are in results.jsonl.</p>"
           if len(rows) > len(shown) else "")
    legend = ('<p class="legend">Relevance: <span style="background: rgb(255, 0, 0)">for the explained score</span> '
              '<span style="background: rgb(255, 255, 255)">0</span> '
              '<span style="background: rgb(0, 0, 255); color: #fff">against it</span> '
              "(the score of each example's prediction; each example normalised by its own largest |relevance|; "
              "hover a token for its value; click a "
              "column's header to sort)</p>"
              + (f"<p class=note>The first {len(reports)} examples' numbers link to their full reports (the "
                 "per-layer matrices; --reports N for more).</p>" if reports else ""))
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>implicit attention: {_e(summary.get('method', ''))} over a data set</title>"
            f"<style>{_CSS}{_INDEX_CSS}</style></head><body>"
            f"<h1>Explanations of a data set</h1><table class=meta>{meta}</table>{legend}{cut}"
            f"<div class=filters><label><input type=checkbox id=only-wrong> only the misclassified</label>"
            f"<label>text contains <input type=search id=search></label>"
            f"<span><span id=shown>{len(shown)}</span> shown</span></div>"
            f"<table class=examples><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"
            f"<p class=note>The data: results.jsonl (one object per example) and summary.json.</p>"
            f"<script>{_INDEX_SCRIPT}</script></body></html>\n")
