"""Which number an explanation explains: a logit, a contrast of logits, a log-probability, or a function.

``target`` of :func:`~implicit_attention.explain` may be

- ``None`` (the predicted class or token), an id, or ``[B]`` ids: that logit;
- :class:`Contrast` ``(target, other)``: ``logit[target] - mean(logit[other])``, the natural score of a
  two-label task (``other`` one id or several);
- :class:`LogProb` ``(target, over=None)``: ``log_softmax(logits)[target]``, over the whole vocabulary
  or over the ids ``over`` (a task's label words);
- a callable ``f(logits [B, V]) -> [B]`` on the logits at the explained position (``[B, K]`` for a
  classifier), applied row by row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

IdLike = int | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class Contrast:
    """``logit[target] - mean over other of logit[other]``. ``target``, ``other``: an id, or one per example
    (``other`` may also hold several ids per example, averaged)."""

    target: IdLike
    other: IdLike


@dataclass(frozen=True)
class LogProb:
    """``log_softmax(logits)[target]``, over the whole output or over the ids ``over`` (which must hold
    ``target``)."""

    target: IdLike = None
    over: Sequence[int] | torch.Tensor | None = None


@dataclass
class Target:
    """The explained score of every example.

    Attributes:
        ids: ``[B]`` the class or token id the score is about.
        position: the explained output position in ``[0, L)`` (causal LMs); ignored for classifiers.
        row: the row of the ``[L, L]`` maps whose relevance is read: ``position`` for a causal LM,
            the token a classifier reads (the class token of BERT / ViT, given by the input; the
            last token of a causal classifier). Defaults to ``position``.
        kind: ``"logit"``, ``"contrast"``, ``"log_prob"`` or ``"function"``.
        other: ``[B, M]`` the ids a contrast subtracts (their mean logit), else ``None``.
        over: ``[K]`` the ids a log-probability is normalised over (``None``: every output).
        fn: the callable of ``kind="function"``.
    """

    ids: torch.Tensor
    position: int
    row: int | None = None
    kind: str = "logit"
    other: torch.Tensor | None = None
    over: torch.Tensor | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.row is None:
            self.row = self.position

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` the logits at the explained position (``[B, K]`` logits as they are)."""
        return logits[:, self.position] if logits.dim() == 3 else logits

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]`` the explained score of each example from ``[B, L, V]`` or ``[B, K]`` logits."""
        chosen = self.select(logits)
        ids = self.ids.to(chosen.device)[:, None]
        if self.kind == "function":
            return self.fn(chosen)
        if self.kind == "contrast":
            return chosen.gather(1, ids)[:, 0] - chosen.gather(1, self.other.to(chosen.device)).mean(dim=1)
        if self.kind == "log_prob":
            if self.over is None:
                return chosen.log_softmax(dim=-1).gather(1, ids)[:, 0]
            over = self.over.to(chosen.device)
            return chosen.gather(1, ids)[:, 0] - chosen.index_select(1, over).logsumexp(dim=-1)
        return chosen.gather(1, ids)[:, 0]

    def with_ids(self, ids: torch.Tensor, other: torch.Tensor | None = None) -> Target:
        """The same score for other ids (captum expands the batch when it batches interpolation steps)."""
        return dataclasses.replace(self, ids=ids, other=other if self.other is not None else None)

    def describe(self, name: Callable[[int], str] = str) -> str:
        """The score in words, e.g. ``"logit(positive) - logit(negative)"`` (``name`` names an id; first example)."""
        main = name(int(self.ids[0]))
        if self.kind == "contrast":
            others = [name(int(i)) for i in self.other[0].tolist()]
            rest = others[0] if len(others) == 1 else f"mean({', '.join(others)})"
            return f"logit({main}) - logit({rest})" if len(others) == 1 else f"logit({main}) - {rest} of logits"
        if self.kind == "log_prob":
            over = "" if self.over is None else f" over {', '.join(name(int(i)) for i in self.over.tolist())}"
            return f"log p({main}){over}"
        if self.kind == "function":
            return f"{getattr(self.fn, '__name__', 'function')}(logits)"
        return f"logit({main})"


def _integer_ids(value, device: torch.device, what: str) -> torch.Tensor:
    """``value`` as a long tensor; text, floats and bools are refused (they are not token ids)."""
    if isinstance(value, str) or (isinstance(value, Sequence) and any(isinstance(v, str) for v in value)):
        raise ValueError(f"{what} {value!r} is text, but explain() takes token ids: pass the token's id (e.g. "
                         "tokenizer.convert_tokens_to_ids), or explain texts with implicit_attention.explain_texts "
                         "or the command line, whose target may be a label or a one-token string")
    try:
        ids = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what} must be integer token ids, got {value!r} ({exc})") from None
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{what} must be integer token ids, got {value!r} ({ids.dtype}); a token id is an int")
    return ids.long()


def _ids(value: IdLike, choices: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``[B]`` ids from one id (for every example) or one per example (``None``: the argmax of ``choices [B, V]``),
    validated: a list or tensor of ids must hold exactly one id per example."""
    vocab = choices.shape[-1]
    if value is None:
        return choices.argmax(dim=-1)
    ids = _integer_ids(value, choices.device, what)
    if ids.dim() == 0:
        ids = ids.reshape(1).expand(batch)
    ids = ids.reshape(-1)
    if ids.numel() != batch:
        raise ValueError(f"{what} holds {ids.numel()} id(s) for a batch of {batch}: give one int (for every "
                         f"example) or exactly one id per example")
    if ((ids < 0) | (ids >= vocab)).any():
        raise IndexError(f"{what} ids must lie in [0, {vocab})")
    return ids


def _id_rows(value: IdLike, choices: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``[B, M]`` ids: one id, ``[M]`` ids for every example, or ``[B, M]``."""
    ids = _integer_ids(value, choices.device, what)
    if ids.dim() <= 1:
        ids = ids.reshape(1, -1).expand(batch, -1)
    if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] == 0:
        raise ValueError(f"{what} must be an id, a list of ids, or one list per example ({batch})")
    if ((ids < 0) | (ids >= choices.shape[-1])).any():
        raise IndexError(f"{what} ids must lie in [0, {choices.shape[-1]})")
    return ids


def resolve_target(logits: torch.Tensor | None, target, position: int, length: int,
                   row: int | Callable[[], int] | None = None) -> Target:
    """Turn the user's ``target`` / ``position`` into a :class:`Target`, validating both.

    ``row`` is the map row a classifier (logits ``[B, K]``) is explained from, given by the
    input (:meth:`~implicit_attention.inputs.ModelInputs.classifier_row`, which may be passed
    uncalled: it is only asked for classifiers); default the last token. ``position`` is
    ignored for classifiers.
    """
    if logits is None:
        raise ValueError("this model returns no logits: explain needs a model with a head "
                         "(e.g. MambaForCausalLM rather than MambaModel)")
    if logits.dim() == 3:
        if not -length <= position < length:
            raise IndexError(f"position {position} out of range for {length} tokens")
        position = row = position % length
    else:
        row = row() if callable(row) else row
        position = row = (length - 1) if row is None else row % length
    choices = (logits[:, position] if logits.dim() == 3 else logits).detach()
    batch = choices.shape[0]
    if isinstance(target, Contrast):
        return Target(ids=_ids(target.target, choices, batch, "the contrast's target").clone(), position=position,
                      row=row, kind="contrast", other=_id_rows(target.other, choices, batch, "the contrast's other"))
    if isinstance(target, LogProb):
        over = None if target.over is None else _id_rows(target.over, choices, 1, "over")[0]
        inner = choices if over is None else torch.full_like(choices, -torch.inf).index_copy(
            1, over, choices.index_select(1, over))               # the default: the likeliest of ``over``
        ids = _ids(target.target, inner, batch, "target")
        if over is not None and not torch.isin(ids, over).all():
            raise ValueError("a LogProb target must be one of its 'over' ids")
        return Target(ids=ids.clone(), position=position, row=row, kind="log_prob", over=over)
    if callable(target) and not isinstance(target, torch.Tensor):
        return Target(ids=choices.argmax(dim=-1).clone(), position=position, row=row, kind="function", fn=target)
    return Target(ids=_ids(target, choices, batch, "target").clone(), position=position, row=row)
