"""Explanation rules on attention maps: pure tensor functions, small enough to check by hand.

All maps are ``[B, L, L]`` with rows = the token that attends (output position) and columns = the
token attended to (input position).
"""

from __future__ import annotations

from collections.abc import Iterable

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


def real_block(mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, L]`` bool: entries whose row and column are both real tokens (``mask [B, L]``)."""
    real = mask.to(torch.bool)
    return real[:, :, None] & real[:, None, :]


def mask_map(M: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, L]`` ``M`` with padding rows and columns set to 0 (so rules never route mass through padding)."""
    return M.masked_fill(~real_block(mask), 0)


def paper_layer_map(attention: torch.Tensor, saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``E_l = minmax(A_l diag(s_l))`` ``[B, L, L]``, one layer of the paper's recipe.

    ``attention [B, L, L]`` is the layer's channel mean of ``relu(A)``, ``saliency [B, L]`` the
    min-max normalised ``max_c relu(d y / d residual)`` of its tokens, which scales the columns;
    the product is min-max normalised over the whole matrix (its real rows and columns; padding
    gets 0).
    """
    E = attention * saliency[:, None, :]
    real = real_block(mask)
    big = torch.finfo(E.dtype).max
    lo = torch.where(real, E, big).amin(dim=(-2, -1), keepdim=True)
    hi = torch.where(real, E, -big).amax(dim=(-2, -1), keepdim=True)
    span = (hi - lo).clamp_min(torch.finfo(E.dtype).tiny)
    return torch.where(real, (E - lo) / span, torch.zeros_like(E))


def paper_rollout(attention: Iterable[torch.Tensor], saliency: Iterable[torch.Tensor], mask: torch.Tensor,
                  row: int) -> torch.Tensor:
    """The paper's recipe (Zimerman, Ali, Wolf 2025, as published for Vision Mamba): relevance ``[B, L]`` of ``row``.

    ``R = prod_l normalize_rows(I + E_l)`` over the given layers (first layer first), with ``E_l``
    from :func:`paper_layer_map`, read at ``row``.

    Args:
        attention: per layer ``[B, L, L]``, the channel mean of ``relu(A_l)``.
        saliency: per layer ``[B, L]``, already min-max normalised.
        mask: ``[B, L]`` padding mask.
        row: the explained row (the class token, or the explained output position).
    """
    return rollout(paper_layer_map(a, s, mask) for a, s in zip(attention, saliency))[:, row, :]
