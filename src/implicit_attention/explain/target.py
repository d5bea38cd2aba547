"""Which number an explanation explains: a class logit or a token logit at a position."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Target:
    """The explained score of every example.

    Attributes:
        ids: ``[B]`` the class or token id whose logit is explained.
        position: the explained output position in ``[0, L)`` (causal LMs); ignored for classifiers.
    """

    ids: torch.Tensor
    position: int

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]`` the target logit of each example from ``[B, L, V]`` or ``[B, K]`` logits."""
        if logits.dim() == 3:
            logits = logits[:, self.position]
        return logits.gather(1, self.ids.to(logits.device)[:, None])[:, 0]


def resolve_target(logits: torch.Tensor | None, target, position: int, length: int) -> Target:
    """Turn the user's ``target`` / ``position`` into a :class:`Target`, validating both."""
    if logits is None:
        raise ValueError("this model returns no logits: explain needs a model with a head "
                         "(e.g. MambaForCausalLM rather than MambaModel)")
    if not -length <= position < length:
        raise IndexError(f"position {position} out of range for {length} tokens")
    position %= length
    row = logits[:, position] if logits.dim() == 3 else logits
    batch, vocab = row.shape
    if target is None:
        ids = row.argmax(dim=-1)
    else:
        ids = torch.as_tensor(target, device=row.device).long().reshape(-1)
        if ids.numel() == 1:
            ids = ids.expand(batch)
        if ids.numel() != batch:
            raise ValueError(f"target must be one id or one per example ({batch}), got {ids.numel()}")
        if ((ids < 0) | (ids >= vocab)).any():
            raise IndexError(f"target ids must lie in [0, {vocab})")
    return Target(ids=ids.detach().clone(), position=position)
