"""Showing explanations in a notebook and in a console.

- :func:`text_html` / :func:`texts_html`: a self-contained HTML fragment (inline styles, no script,
  nothing fetched) of one or several :class:`~.explanations.texts.TextExplanation`: the text, the
  prediction, the explained score and the tokens coloured by relevance on the scale of the report
  and the command line (:func:`~.render.relevance_rgb`: red positive, blue negative), the prompt
  template greyed, each token's exact value in its hover title. ``TextExplanation._repr_html_``
  returns it, so Jupyter shows it inline.
- :func:`text_console` / :func:`texts_console`: the command line's view (``print(example)``):
  coloured with 24-bit ANSI backgrounds when stdout is a terminal and ``NO_COLOR`` is unset (the
  command line's rule), else each token followed by its normalised relevance in brackets.
- :func:`explanation_html`: a relevance bar per position for a token-level
  :class:`~.explanations.api.Explanation` (token ids as labels).
- :func:`show`: the HTML through ``IPython.display`` when IPython is importable (a notebook shows the
  HTML, a terminal IPython the console view), else the console view printed.
"""

from __future__ import annotations

import html
import math

from .render import color_tokens, display_token, normalize_relevance, relevance_rgb

__all__ = ["MAX_SHOWN", "explanation_html", "explanation_repr", "show", "text_console", "text_html", "text_repr",
           "texts_console", "texts_html", "texts_repr", "use_color"]

#: The most texts (or rows of an :class:`~.explanations.api.Explanation`) one view shows; the rest are counted.
MAX_SHOWN = 20

_BOX = ("font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; line-height: 1.45; color: #222; "
        "margin: 0.4em 0 0.8em 0")
_TOKENS = ("font-family: ui-monospace, 'SFMono-Regular', Menlo, monospace; white-space: pre-wrap; line-height: 2; "
           "padding: 0.4em 0.6em; border: 1px solid #ddd; border-radius: 4px; background: #fff")
_TOKEN = "color: #000; border-radius: 2px; padding: 0.1em 0"
_TEMPLATE = "color: #999; padding: 0.1em 0"
_NOTE = "font-size: 0.85em; color: #555"


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def use_color(color: bool | None = None) -> bool:
    """Whether the console view is coloured: ``color`` if given, else the command line's rule (stdout is a
    terminal and ``NO_COLOR`` is unset)."""
    from .cli import _use_color

    return _use_color(color)


# ------------------------------------------------------------------------------------ console
def _prediction_line(prediction) -> str:
    from .cli import _prediction_line as line

    return line(prediction)


def _where(example) -> str:
    target = example.target
    if target.position is not None and 0 <= target.position < len(example.tokens):
        return f"after token {target.position} ({example.tokens[target.position]!r})"
    return f"at padded position {target.batch_position} (inside the left padding of this text)"


def _score(example) -> str:
    target = example.target
    return target.score or f"logit({target.label or repr(target.token)})"


def _scale_note(example, color: bool) -> str:
    template = ("" if all(example.in_span) else "; the prompt template greyed" if color
                else "; the prompt template's values in parentheses")
    return f"normalised by max |r| = {example.span_scale:.3g} over the text{template}"


def text_console(example, color: bool | None = None, *, header: str | None = None) -> str:
    """The console view of a :class:`~.explanations.texts.TextExplanation`: the lines ``implicit-attention
    explain`` prints for it (text, prediction, explained score, coloured tokens)."""
    color = use_color(color)
    lines = [header if header is not None else f"text: {example.text!r}",
             f"  {_prediction_line(example.prediction)}",
             f"  explaining: {_score(example)} (token id {example.target.id}) {_where(example)}",
             f"  relevance (red +, blue -; {_scale_note(example, color)}):",
             "  " + color_tokens(example.tokens, example.relevance, color=color, span=example.in_span)]
    lines += [f"  {key}: {value:.3g}" for key, value in example.diagnostics.items()]
    return "\n".join(lines)


def texts_console(explanations, color: bool | None = None) -> str:
    """The console view of :class:`~.explanations.texts.TextExplanations`: each text's view, numbered, then
    the largest reconstruction error."""
    color = use_color(color)
    examples = list(explanations)
    if len(examples) == 1:
        blocks = [text_console(examples[0], color)]
    else:
        blocks = [text_console(ex, color, header=f"[{i}] {ex.text!r}")
                  for i, ex in enumerate(examples[:MAX_SHOWN], 1)]
    if len(examples) > MAX_SHOWN:
        blocks.append(f"... {len(examples) - MAX_SHOWN} more texts ({MAX_SHOWN} of {len(examples)} shown; index or "
                      "iterate for the others)")
    blocks.append(f"max reconstruction error: {_error(explanations)}")
    return "\n\n".join(blocks)


def _error(explanations) -> str:
    """The largest reconstruction error, or why there is none."""
    from .catalog import MATRIX_METHODS

    error = explanations.max_error
    if error is not None:
        return f"{error:.2e}"
    runs = list(explanations.runs)
    if runs and all(run.explanation.method in MATRIX_METHODS for run in runs):
        return "n/a (the decomposition was not kept)"
    return "n/a (the method does not decompose the layers)"


# --------------------------------------------------------------------------------------- repr
def text_repr(example) -> str:
    """One line: ``<TextExplanation 'an utterly charming film': positive (p=0.9999), 10 tokens, explaining ...>``."""
    prediction = example.prediction
    label = prediction.label if prediction.is_label else repr(prediction.label)
    return (f"<TextExplanation {_shorten(example.text)!r}: {label} (p={prediction.probability:.4f}), "
            f"{len(example.tokens)} tokens, explaining {_score(example)}>")


def texts_repr(explanations) -> str:
    """One line: ``<TextExplanations: 2 texts in 1 run, attribution, max reconstruction error 1.2e-07>``."""
    examples = list(explanations)
    runs = list(explanations.runs)
    method = runs[0].explanation.method if runs else "?"
    error = explanations.max_error
    return (f"<TextExplanations: {len(examples)} text{'s' if len(examples) != 1 else ''} in {len(runs)} "
            f"run{'s' if len(runs) != 1 else ''}, {method}, max reconstruction error "
            f"{'n/a' if error is None else f'{error:.2e}'}>")


def explanation_repr(explanation) -> str:
    """One line: ``<Explanation attribution (unified): relevance [2, 15], contrast of token 824 at position 14, ...>``."""
    target = explanation.target
    shape = ", ".join(map(str, explanation.relevance.shape))
    ids = target.ids.reshape(-1).tolist() if target.ids is not None else []
    about = f"token {ids[0]}" if len(set(ids)) == 1 else f"{len(ids)} targets"
    variant = f" ({explanation.variant})" if explanation.variant else ""
    decomposition = explanation.decomposition
    layers = "" if decomposition is None else (
        f", {len(decomposition.layers)} decomposed layers"
        + (f" (max error {max(decomposition.errors):.2e})" if decomposition.layers else ""))
    return (f"<Explanation {explanation.method}{variant}: relevance [{shape}], {target.kind} of {about} at "
            f"position {target.position}{layers}>")


# --------------------------------------------------------------------------------------- HTML
def _tokens_html(tokens, relevance, in_span) -> str:
    values = [float(r) for r in relevance.detach().cpu().double().reshape(-1).tolist()] \
        if hasattr(relevance, "detach") else [float(r) for r in relevance]
    weights = normalize_relevance(values, in_span)
    spans = []
    for i, (token, value, weight, keep) in enumerate(zip(tokens, values, weights, in_span)):
        shown = display_token(token)
        exact = repr(value) if math.isfinite(value) else str(value)
        tip = f"#{i} {shown!r}: relevance {exact} (normalised {weight:+.3f})"
        if not keep:
            spans.append(f'<span style="{_TEMPLATE}" title="{_e(tip + "; prompt template")}" '
                         f'data-relevance="{_e(exact)}">{_e(shown)}</span>')
            continue
        r, g, b = relevance_rgb(weight)
        spans.append(f'<span style="{_TOKEN}; background: rgb({r}, {g}, {b})" title="{_e(tip)}" '
                     f'data-relevance="{_e(exact)}">{_e(shown)}</span>')
    return "".join(spans)


def _probabilities(prediction) -> str:
    return ", ".join(f"{_e(label if prediction.is_label else repr(label))} {p:.4f}"
                     for label, p in prediction.probabilities.items())


def text_html(example, *, title: str | None = None) -> str:
    """A self-contained HTML fragment of a :class:`~.explanations.texts.TextExplanation` (inline styles only)."""
    prediction = example.prediction
    label = prediction.label if prediction.is_label else repr(prediction.label)
    kind = "label" if prediction.is_label else "next token"
    templated = not all(example.in_span)
    legend = (f'<span style="background: rgb(255, 0, 0); padding: 0 0.4em">for the explained score</span> '
              f'<span style="background: rgb(0, 0, 255); color: #fff; padding: 0 0.4em">against it</span> '
              f"normalised by max |r| = {_e(f'{example.span_scale:.3g}')} over the text"
              + ('; the prompt template <span style="color: #999">greyed</span>' if templated else "")
              + "; hover a token for its value")
    diagnostics = "".join(f'<div style="{_NOTE}">{_e(key)}: {_e(f"{value:.3g}")}</div>'
                          for key, value in example.diagnostics.items())
    heading = f"<div><strong>{_e(title)}</strong></div>" if title else ""
    return (f'<div class="implicit-attention-explanation" style="{_BOX}">{heading}'
            f'<div style="font-style: italic">{_e(example.text)}</div>'
            f"<div>Prediction ({kind}): <strong>{_e(label)}</strong> (p = {prediction.probability:.4f}; "
            f"{_probabilities(prediction)})</div>"
            f"<div>Explaining: <strong>{_e(_score(example))}</strong> (token id {_e(example.target.id)}) "
            f"{_e(_where(example))}</div>"
            f'<div style="{_TOKENS}">{_tokens_html(example.tokens, example.relevance, example.in_span)}</div>'
            f'<div style="{_NOTE}">{legend}</div>{diagnostics}</div>')


def texts_html(explanations) -> str:
    """A self-contained HTML fragment of :class:`~.explanations.texts.TextExplanations`: each text's view."""
    examples = list(explanations)
    parts = [text_html(ex, title=f"[{i}]" if len(examples) > 1 else None)
             for i, ex in enumerate(examples[:MAX_SHOWN], 1)]
    if len(examples) > MAX_SHOWN:
        parts.append(f'<div style="{_NOTE}">{len(examples) - MAX_SHOWN} more texts ({MAX_SHOWN} of '
                     f"{len(examples)} shown)</div>")
    parts.append(f'<div style="{_NOTE}">Max reconstruction error: {_e(_error(explanations))}</div>')
    return f'<div class="implicit-attention-explanations">{"".join(parts)}</div>'


def explanation_html(explanation, *, height: int = 40) -> str:
    """A self-contained HTML fragment of an :class:`~.explanations.api.Explanation`: per row, a bar per position
    (up for positive relevance, down for negative, normalised as :meth:`~.api.Explanation.normalized`), the
    token ids as labels when the decomposition holds them (else the positions), padding greyed."""
    relevance = explanation.relevance.detach().cpu().double()
    if relevance.dim() == 1:
        relevance = relevance[None]
    relevance = relevance.reshape(relevance.shape[0], -1)
    normalized = explanation.normalized().detach().cpu().double().reshape(relevance.shape)
    decomposition = explanation.decomposition
    ids = mask = None
    if decomposition is not None:
        values = decomposition.input_values
        if values.dim() == 2 and not values.is_floating_point() and tuple(values.shape) == tuple(relevance.shape):
            ids = values.detach().cpu()
        if decomposition.attention_mask is not None and tuple(decomposition.attention_mask.shape) == \
                tuple(relevance.shape):
            mask = decomposition.attention_mask.detach().cpu().bool()
    span = explanation.span.detach().cpu().reshape(relevance.shape) if explanation.span is not None else None
    target = explanation.target
    rows = []
    for b in range(min(relevance.shape[0], MAX_SHOWN)):
        bars = []
        for i in range(relevance.shape[1]):
            value, weight = float(relevance[b, i]), float(normalized[b, i])
            weight = weight if math.isfinite(weight) else 0.0
            padding = mask is not None and not bool(mask[b, i])
            outside = span is not None and not bool(span[b, i])
            label = str(int(ids[b, i])) if ids is not None else str(i)
            tip = f"position {i}" + (f", token id {label}" if ids is not None else "") + \
                  f": relevance {value!r} (normalised {weight:+.3f})" + \
                  ("; padding" if padding else "; outside the span" if outside else "")
            r, g, bl = relevance_rgb(weight if weight else 0.0)
            colour = f"rgb({r}, {g}, {bl})"
            size = 0 if padding else round(min(1.0, abs(weight)) * height)
            up = f'<div style="height: {size}px; width: 100%; background: {colour}"></div>' if weight > 0 else ""
            down = f'<div style="height: {size}px; width: 100%; background: {colour}"></div>' if weight < 0 else ""
            bars.append(
                f'<div style="display: inline-flex; flex-direction: column; width: 2.4em; margin: 0 1px; '
                f'{"opacity: 0.4; " if padding or outside else ""}" title="{_e(tip)}" data-relevance="{_e(repr(value))}">'
                f'<div style="height: {height}px; display: flex; flex-direction: column; justify-content: flex-end">'
                f"{up}</div>"
                f'<div style="height: {height}px; border-top: 1px solid #888">{down}</div>'
                f'<div style="font-size: 0.7em; text-align: center; overflow: hidden">{_e(label)}</div></div>')
        target_id = int(target.ids.reshape(-1)[b]) if target.ids is not None and target.ids.numel() > b else None
        rows.append(f'<div style="margin: 0.3em 0"><div style="{_NOTE}">row {b}: {_e(target.kind)} of token '
                    f"{_e(target_id)} at position {_e(target.position)}</div>"
                    f'<div style="display: flex; flex-wrap: wrap; align-items: flex-start">{"".join(bars)}</div></div>')
    if relevance.shape[0] > MAX_SHOWN:
        rows.append(f'<div style="{_NOTE}">{relevance.shape[0] - MAX_SHOWN} more rows</div>')
    return (f'<div class="implicit-attention-explanation" style="{_BOX}"><div>{_e(explanation_repr(explanation))}'
            f'</div>{"".join(rows)}<div style="{_NOTE}">Bars: relevance per position (red up: positive, blue down: '
            f"negative), normalised by each row's max |r|; labels: "
            f"{'token ids' if ids is not None else 'positions'}; hover a bar for its value</div></div>")


# --------------------------------------------------------------------------------------- show
def show(obj) -> None:
    """Display ``obj`` (anything with ``_repr_html_``) inline with ``IPython.display`` when IPython is
    importable: the HTML in a notebook, ``str(obj)`` (the console view) where only text is shown; without
    IPython, print ``str(obj)``."""
    try:
        from IPython.display import display
    except ImportError:
        print(str(obj))
        return
    display({"text/html": obj._repr_html_(), "text/plain": str(obj)}, raw=True)
