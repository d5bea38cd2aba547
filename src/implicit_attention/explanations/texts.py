"""Explaining raw strings with a loaded model: the task's template, tokens, padding, target and prediction.

:func:`explain_texts` is what the ``explain`` and ``explain-dataset`` commands run, and what a
Python user calls on strings::

    from implicit_attention import explain_texts, load_model
    loaded = load_model()                                   # the bundled sentiment model
    result = explain_texts(loaded, ["an utterly charming film", "a dull mess"])
    for example in result:
        print(example.prediction.label, list(zip(example.tokens, example.relevance.tolist())))
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..architectures.registry import padding_leaks
from ..catalog import SCORES
from ..errors import LongInputWarning
from ..inputs import call_model
from ..loading import LoadedModel
from ..text import (
    Prediction,
    decode_token,
    encode_texts,
    long_input_message,
    predict,
    predict_next_token,
    target_token_id,
    token_strings,
)
from .api import Explanation, run_explanation
from .target import Contrast, LogProb


def text_score(loaded: LoadedModel, target_id, score: str, batch: int):
    """The ``target`` of :func:`~.api.run_explanation` for ``score`` about ``target_id`` (an id, ``[B]`` ids or ``None``)."""
    if score == "logit":
        return target_id
    labels = list(loaded.label_ids.values())
    if score == "log_prob":
        return LogProb(target_id, over=labels if loaded.label_ids else None)
    ids = torch.as_tensor(target_id).long().reshape(-1).expand(batch)
    others = [[label for label in labels if label != int(i)] for i in ids]
    if any(len(row) != len(labels) - 1 for row in others):
        raise ValueError("score='contrast' explains a label of the task: give target as one of "
                         f"{', '.join(loaded.label_ids)}")
    return Contrast(ids, others)


def _label_or_token(loaded: LoadedModel, token_id: int) -> str:
    return next((name for name, tid in loaded.label_ids.items() if tid == token_id), None) or \
        repr(decode_token(loaded, token_id))


@dataclass
class ExplainedTarget:
    """The explained score of one text: the logit of token ``id`` at one output position.

    Attributes:
        id: the token id whose logit is explained.
        token: its display string.
        label: the task label it is the label word of, or ``None``.
        position: the explained position among the text's own tokens (``None`` when it falls inside
            the text's left padding).
        batch_position: the explained position in the padded batch.
        score: the explained score in words (``"logit(positive) - logit(negative)"``).
    """

    id: int
    token: str
    label: str | None
    position: int | None
    batch_position: int
    score: str = ""

    def to_dict(self) -> dict:
        return {"id": self.id, "token": self.token, "label": self.label, "position": self.position,
                "batch_position": self.batch_position, "score": self.score}


@dataclass
class TextRun:
    """One forward and backward pass over a left-padded batch of texts (or one text alone).

    Attributes:
        explanation: its :class:`~.api.Explanation` (relevance ``[B, L]``, target, logits and, for
            the matrix methods, the decomposition).
        input_ids: ``[B, L]`` the left-padded prompts; attention_mask: ``[B, L]``.
    """

    explanation: Explanation
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def max_error(self) -> float | None:
        """The largest reconstruction error of the decomposed layers (``None`` for the baselines)."""
        decomposition = self.explanation.decomposition
        return max(decomposition.errors) if decomposition is not None and decomposition.errors else None


@dataclass
class TextExplanation:
    """One text's explanation.

    Attributes:
        text: the text as given.
        tokens: display strings of the prompt's tokens (the task template filled in, padding removed).
        token_ids: their ids.
        relevance: ``[T]`` on the CPU (the compute dtype of :func:`~.api.explain`), one value per token of
            :attr:`tokens`.
        prediction: what the model predicts at the explained position.
        target: the explained score.
        run: the :class:`TextRun` the text was explained in; row: the text's row in it.
        in_span: ``[T]`` whether each token comes from the user's text (the task template's ``{text}``
            slot) rather than the template or BOS: the span that :meth:`normalized` and
            :meth:`top_tokens` read.
        offsets: each token's ``(start, end)`` characters in :attr:`span_text`, ``None`` outside the span.
        span_text: the user's text as the model read it (whitespace collapsed for task models).
    """

    text: str
    tokens: list[str]
    token_ids: list[int]
    relevance: torch.Tensor
    prediction: Prediction
    target: ExplainedTarget
    run: TextRun
    row: int
    in_span: list[bool] = field(default_factory=list)
    offsets: list[tuple[int, int] | None] = field(default_factory=list)
    span_text: str = ""

    def __post_init__(self):
        if not self.in_span:
            self.in_span = [True] * len(self.tokens)
            self.offsets = self.offsets or [None] * len(self.tokens)

    @property
    def span_scale(self) -> float:
        """``max |relevance|`` over the span (what :meth:`normalized` divides by)."""
        inside = self.relevance[torch.tensor(self.in_span, dtype=torch.bool)]
        return float(inside.abs().max()) if inside.numel() else 0.0

    def normalized(self) -> torch.Tensor:
        """``[T]`` relevance divided by the largest ``|relevance|`` of the span; template tokens keep their
        values on the same scale (they may exceed 1)."""
        scale = self.span_scale
        return self.relevance / scale if scale > 0 else torch.zeros_like(self.relevance)

    def top_tokens(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most relevant tokens of the span: ``[(token, relevance), ...]``, largest first."""
        inside = [(tok, float(r)) for tok, r, keep in zip(self.tokens, self.relevance, self.in_span) if keep]
        return sorted(inside, key=lambda pair: -pair[1])[:k]

    def words(self) -> list[tuple[str, float]]:
        """The span's relevance merged into words: ``[(word, summed relevance), ...]`` in order.

        Sub-word tokens are merged by their character offsets (a token that starts with a space or
        follows a space starts a word); relevance adds up, as it is additive over tokens.
        """
        merged: list[list] = []
        previous_end = None
        for r, keep, offset in zip(self.relevance.tolist(), self.in_span, self.offsets):
            if not keep or offset is None:
                previous_end = None
                continue
            start, end = offset
            piece = self.span_text[start:end]
            new_word = (previous_end is None or start > previous_end or piece[:1].isspace()
                        or (start > 0 and self.span_text[start - 1].isspace()))
            if new_word or not merged:
                merged.append([piece.strip(), r])
            else:
                merged[-1][0] += piece
                merged[-1][1] += r
            previous_end = end
        return [(word, value) for word, value in merged]

    @property
    def diagnostics(self) -> dict[str, float]:
        """What the method reported for this text beside its relevance (e.g. ``convergence_delta``)."""
        return {key: float(values[self.row]) for key, values in self.run.explanation.diagnostics.items()}

    @property
    def real_positions(self) -> torch.Tensor:
        """``[T]`` the positions of :attr:`tokens` in its run's padded batch."""
        return self.run.attention_mask[self.row].bool().nonzero().reshape(-1)

    # display (implicit_attention.display): Jupyter's inline HTML, the console view, a one-line repr
    def __repr__(self) -> str:
        from ..display import text_repr

        return text_repr(self)

    def __str__(self) -> str:
        return self.console()

    def console(self, color: bool | None = None) -> str:
        """The console view (what ``print`` shows): text, prediction, explained score and the tokens, coloured
        with ANSI backgrounds when ``color`` (default: stdout is a terminal and ``NO_COLOR`` is unset), else
        each followed by its normalised relevance in brackets."""
        from ..display import text_console

        return text_console(self, color)

    def _repr_html_(self) -> str:
        from ..display import text_html

        return text_html(self)

    def show(self) -> None:
        """Display the HTML view inline with IPython (a notebook), else print the console view."""
        from ..display import show

        show(self)


@dataclass
class TextExplanations:
    """The explanations of several texts (iterate over it for one :class:`TextExplanation` per text).

    Attributes:
        examples: one per text, in input order.
        runs: the passes they ran in: one left-padded batch, or one per text for a model whose
            predictions depend on padding (``PaddingError``).
    """

    examples: list[TextExplanation]
    runs: list[TextRun]

    def __iter__(self) -> Iterator[TextExplanation]:
        return iter(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TextExplanation:
        return self.examples[index]

    @property
    def max_error(self) -> float | None:
        """The largest reconstruction error of the decomposed layers (``None`` for the baselines)."""
        errors = [run.max_error for run in self.runs if run.max_error is not None]
        return max(errors) if errors else None

    def save(self, path, *, decomposition: bool = False, layers=None, aggregates=("mean",)):
        """Save to the directory ``path``: per text its tokens, relevance, prediction and target; per run its
        :class:`~.api.Explanation` (``runs/<i>/``). See :func:`implicit_attention.persistence.save_text_explanations`."""
        from ..persistence import save_text_explanations

        return save_text_explanations(self, path, decomposition=decomposition, layers=layers, aggregates=aggregates)

    @classmethod
    def load(cls, path) -> TextExplanations:
        """The text explanations saved at ``path`` by :meth:`save` (no model needed)."""
        from ..persistence import load_text_explanations

        return load_text_explanations(path)

    # display (implicit_attention.display): Jupyter's inline HTML, the console view, a one-line repr
    def __repr__(self) -> str:
        from ..display import texts_repr

        return texts_repr(self)

    def __str__(self) -> str:
        return self.console()

    def console(self, color: bool | None = None) -> str:
        """The console view of every text (what ``print`` shows; ``color`` as :meth:`TextExplanation.console`)."""
        from ..display import texts_console

        return texts_console(self, color)

    def _repr_html_(self) -> str:
        from ..display import texts_html

        return texts_html(self)

    def show(self) -> None:
        """Display the HTML view inline with IPython (a notebook), else print the console view."""
        from ..display import show

        show(self)



def default_score(loaded: LoadedModel) -> str:
    """``"contrast"`` for a model with a ``task.json`` (the label words' logit difference), else ``"logit"``."""
    return "contrast" if loaded.task is not None and len(loaded.label_ids) > 1 else "logit"


def explain_texts(loaded: LoadedModel, texts: str | Sequence[str], *, method: str = "attribution",
                  variant: str = "unified", layers: int | Sequence[int] | None = None,
                  target: str | int | None = None, score: str | None = None, position: int = -1,
                  aggregate: str = "abs", check: bool = True, **options) -> TextExplanations:
    """Explain the prediction of ``loaded`` for each text, from raw strings.

    Each text goes into the task's prompt template (if the model has a ``task.json``), is tokenised
    and left-padded into one batch; a model whose predictions depend on padding (it reads padding
    tokens) runs one text at a time instead. The explained score is about ``target`` at
    ``position``: by default, at the end of the prompt, the predicted label (task models) or the
    predicted next token.

    Args:
        loaded: a model from :func:`~implicit_attention.loading.load_model`.
        texts: one text or a list of texts (each non-empty).
        method, variant, layers, aggregate, check, **options: as for :func:`~.api.explain`.
        target: a task label (``"positive"``), a label word, a token id, or a string that is one
            token (``" Paris"``); default the prediction.
        score: ``"contrast"``: the target's logit minus the mean logit of the task's other labels (the
            default for models with a ``task.json``: for two labels, ``logit(positive) - logit(negative)``);
            ``"logit"``: the target's logit (the default otherwise, and what :func:`~.api.explain`
            explains); ``"log_prob"``: its log-probability (over the label words for task models).
        position: the explained output position in the padded batch (negatives count from the end);
            ``-1``, the end of every prompt, is the one position that means the same alone and in a batch.

    Returns:
        :class:`TextExplanations`: per text the tokens, relevance, prediction and explained target.

    Warns:
        :class:`~implicit_attention.errors.LongInputWarning`: a text is longer than the model was trained on
        (``max_sentence_tokens`` of its ``task.json``; :attr:`~implicit_attention.loading.LoadedModel.max_training_tokens`).
    """
    if not isinstance(loaded, LoadedModel):
        raise TypeError(f"explain_texts needs a LoadedModel from implicit_attention.load_model(...) (it reads the "
                        f"tokenizer and the task's prompt template), got {type(loaded).__name__}; for a model and "
                        "token ids use implicit_attention.explain")
    texts = [texts] if isinstance(texts, str) else list(texts)
    _, _, encoded = encode_texts(loaded, texts)             # every text is valid before anything runs
    message = long_input_message(loaded, encoded)
    if message is not None:
        warnings.warn(message, LongInputWarning, stacklevel=2)
    groups = [[text] for text in texts] if len(texts) > 1 and padding_leaks(loaded.model) else [texts]
    score = default_score(loaded) if score is None else score
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if score == "contrast" and len(loaded.label_ids) < 2:
        raise ValueError("score='contrast' subtracts the other labels' logits: it needs a model with a task.json "
                         "of two labels or more (or a classifier); use 'logit' or 'log_prob'")
    settings = dict(method=method, variant=variant, layers=layers, target=target, score=score, position=position,
                    aggregate=aggregate, check=check, **options)
    runs, examples = [], []
    for group in groups:
        run, group_examples = _explain_batch(loaded, group, **settings)
        runs.append(run)
        examples += group_examples
    return TextExplanations(examples=examples, runs=runs)


def _explain_batch(loaded: LoadedModel, texts: list[str], *, method: str, variant: str, layers, target, score: str,
                   position: int, aggregate: str, check: bool, **options) -> tuple[TextRun, list[TextExplanation]]:
    """One left-padded batch of texts through :func:`~.api.run_explanation`."""
    ids, mask, encoded = encode_texts(loaded, texts)
    length = ids.shape[1]
    if not -length <= position < length:
        raise ValueError(f"position {position} out of range for {length} tokens (the prompt template and BOS "
                         "included)")
    at_end = position % length == length - 1
    task_prediction = bool(loaded.label_ids) and (at_end or loaded.is_classifier)
    target_id = target_token_id(loaded, target)
    if target_id is None and (task_prediction or score == "contrast"):
        # explain the predicted label (the argmax over the label words), not the likeliest token
        with torch.no_grad():
            first = call_model(loaded.model, ids, mask).logits
        target_id = [p.token_id for p in predict(loaded, first, position)]
    explanation = run_explanation(loaded.model, ids, mask, method=method, variant=variant, layers=layers,
                                  target=text_score(loaded, target_id, score, len(texts)), position=position,
                                  aggregate=aggregate, check=check, **options)
    run = TextRun(explanation=explanation, input_ids=ids, attention_mask=mask)
    predictions = (predict(loaded, explanation.logits, position) if task_prediction
                   else predict_next_token(loaded, explanation.logits, position))
    examples = []
    for b, text in enumerate(texts):
        real = mask[b].bool()
        token_id = int(explanation.target.ids[b])
        row = int(explanation.target.row)                     # the explained position (a classifier's class token)
        positions = real.nonzero().reshape(-1).tolist()
        one = dataclasses.replace(explanation.target, ids=explanation.target.ids[b:b + 1],
                                  other=None if explanation.target.other is None else explanation.target.other[b:b + 1])
        explained = ExplainedTarget(
            id=token_id, token=decode_token(loaded, token_id),
            label=next((name for name, tid in loaded.label_ids.items() if tid == token_id), None),
            position=positions.index(row) if row in positions else None, batch_position=row,
            score=one.describe(lambda i: _label_or_token(loaded, i)))
        examples.append(TextExplanation(
            text=text, tokens=token_strings(loaded, ids[b], mask[b]), token_ids=ids[b][real].tolist(),
            relevance=explanation.relevance[b][real].detach().cpu(), prediction=predictions[b],
            target=explained, run=run, row=b, in_span=encoded[b].in_span, offsets=encoded[b].offsets,
            span_text=encoded[b].text))
    return run, examples
