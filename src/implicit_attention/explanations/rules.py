"""Explanation rules on attention maps: pure tensor functions, small enough to check by hand.

All maps are ``[B, L, L]`` with rows = the token that attends (output position) and columns = the
token attended to (input position).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def normalize_rows(M: torch.Tensor) -> torch.Tensor:
    """``[..., L, L]`` each row divided by its sum (rows summing to zero are left as they are)."""
    sums = M.sum(dim=-1, keepdim=True)
    return M / torch.where(sums == 0, torch.ones_like(sums), sums)


def minmax(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]`` rescaled to ``[0, 1]`` per row over the positions where ``mask`` is 1 (0 elsewhere)."""
    if mask is None:
        mask = torch.ones_like(x)
    mask = mask.to(torch.bool)
    big = torch.finfo(x.dtype).max
    lo = torch.where(mask, x, big).amin(dim=-1, keepdim=True)
    hi = torch.where(mask, x, -big).amax(dim=-1, keepdim=True)
    span = (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(mask, (x - lo) / span, torch.zeros_like(x))


def _identity_like(M: torch.Tensor) -> torch.Tensor:
    return torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)


def rollout(maps: Iterable[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): ``R = prod_l normalize_rows(I + A_l)``.

    ``maps`` are the non-negative ``[B, L, L]`` maps in model order (first layer first); the
    product applies the first layer first: ``R = Â_last ... Â_first``. ``maps`` may be a
    generator: each map is used as it comes and never kept, so a generator that computes the
    maps one by one holds ``R`` and one map at a time.
    """
    R = None
    for A in maps:
        R = _identity_like(A).clone() if R is None else R
        R = normalize_rows(_identity_like(A) + A) @ R
    if R is None:
        raise ValueError("rollout needs at least one map")
    return R


def attribution_rollout(cams: Iterable[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021 relevance propagation: ``R = I``; per layer ``R = R + cam_l @ R``.

    ``cams`` are ``[B, L, L]`` maps in model order; like :func:`rollout` it takes a generator
    and holds one map at a time.
    """
    R = None
    for cam in cams:
        R = _identity_like(cam).clone() if R is None else R
        R = R + cam @ R
    if R is None:
        raise ValueError("attribution_rollout needs at least one map")
    return R


def paper_rollout(row_attention: Sequence[torch.Tensor], saliency: Sequence[torch.Tensor],
                  mask: torch.Tensor, row: int, causal: bool = True) -> torch.Tensor:
    """The paper's recipe for Vision Mamba, as published; returns the relevance ``[B, L]`` of ``row``.

    Per layer ``e_l = minmax(a_l * s_l)`` with ``a_l [B, L]`` the target row of the channel mean
    of ``relu(A_l)`` and ``s_l [B, L]`` the min-max normalised ``max_c relu(d y / d residual_l)``;
    then rollout of ``normalize_rows(I + 1 e_l^T)`` over the given layers. For causal models the
    rank-one matrix is kept causal (``tril``): for the last row this is exactly the published
    recipe.

    Args:
        row_attention: per layer ``[B, L]``.
        saliency: per layer ``[B, L]`` (already min-max normalised).
        mask: ``[B, L]`` padding mask (padding gets no relevance).
        row: the target row (the explained output position).
        causal: keep the rank-one maps causal (``False`` for bidirectional models: BERT, ViT).
    """
    if not row_attention:
        raise ValueError("paper_rollout needs at least one layer")
    length = row_attention[0].shape[-1]
    visible = torch.ones(length, length, dtype=torch.bool, device=mask.device)
    visible = visible.tril() if causal else visible
    maps = (minmax(a * s, mask)[:, None, :].expand(-1, length, -1).masked_fill(~visible, 0)  # e_l: [B, L, L]
            for a, s in zip(row_attention, saliency))
    return rollout(maps)[:, row, :]
