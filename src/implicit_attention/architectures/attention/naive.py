"""Slow, obviously-correct softmax attention probabilities: the test oracle for :mod:`.operator`."""

from __future__ import annotations

import torch


def attention_probabilities_naive(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                                  empty_rows: torch.Tensor | None) -> torch.Tensor:
    """Slow reference of :func:`attention_probabilities`: loops over examples, heads and query rows."""
    batch, heads, length, _ = q.shape
    probs = torch.zeros(batch, heads, length, k.shape[-2], dtype=q.dtype, device=q.device)
    full = None if bias is None else bias.expand(batch, heads, length, k.shape[-2])
    dead = None if empty_rows is None else empty_rows.expand(batch, heads, length)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                if dead is not None and dead[b, h, i]:
                    continue
                logits = torch.stack([(q[b, h, i] * k[b, h, j]).sum() * scale for j in range(k.shape[-2])])
                if full is not None:
                    logits = logits + full[b, h, i]
                top = logits.max()
                weights = torch.exp(logits - top)
                probs[b, h, i] = weights / weights.sum()
    return probs
