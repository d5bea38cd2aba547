"""Which number an explanation explains: a class logit or a token logit at a position."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Target:
    """The explained score of every example.

    Attributes:
        ids: ``[B]`` the class or token id whose logit is explained.
        position: the explained output position in ``[0, L)`` (causal LMs); ignored for classifiers.
        row: the row of the ``[L, L]`` maps whose relevance is read: ``position`` for a causal LM,
            the token a classifier reads (the class token of BERT / ViT, given by the input; the
            last token of a causal classifier). Defaults to ``position``.
    """

    ids: torch.Tensor
    position: int
    row: int | None = None

    def __post_init__(self):
        if self.row is None:
            self.row = self.position

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]`` the target logit of each example from ``[B, L, V]`` or ``[B, K]`` logits."""
        if logits.dim() == 3:
            logits = logits[:, self.position]
        return logits.gather(1, self.ids.to(logits.device)[:, None])[:, 0]


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
    choices = logits[:, position] if logits.dim() == 3 else logits
    batch, vocab = choices.shape
    if target is None:
        ids = choices.argmax(dim=-1)
    else:
        ids = torch.as_tensor(target, device=choices.device).long().reshape(-1)
        if ids.numel() == 1:
            ids = ids.expand(batch)
        if ids.numel() != batch:
            raise ValueError(f"target must be one id or one per example ({batch}), got {ids.numel()}")
        if ((ids < 0) | (ids >= vocab)).any():
            raise IndexError(f"target ids must lie in [0, {vocab})")
    return Target(ids=ids.detach().clone(), position=position, row=row)
