"""The tiling of the lower triangle shared by the eager (:mod:`.fast`) and fused (:mod:`.triton`) means.

Rows are counted in the coordinate ``i' = i - (K - 1)`` (``K`` the conv width), so that a tile
whose ``i'`` block comes after its ``j`` block only meets causal conv taps. Results are cached CPU
tensors: callers move them, never modify them.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def tile_pairs(length: int, width: int, size: int, parent: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_blocks, col_blocks)`` ``[P]`` of the tiles of ``size`` (row coordinate ``i' = i - K + 1``):
    ``i'`` block after ``j`` block, both inside one block of ``parent`` (anywhere if None)."""
    count = -(-(length - width + 1) // size)                  # rows i' = 0 .. L - K
    rb, cb = torch.tril_indices(count, count, offset=-1)
    if parent is not None:
        rb, cb = (t[rb // (parent // size) == cb // (parent // size)] for t in (rb, cb))
    return rb, cb


@functools.lru_cache(maxsize=16)
def band_entries(length: int, width: int, band: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i, i - j)`` ``[M]`` of the band: ``j <= i < band (j // band + 1) + K - 1``."""
    rows = torch.arange(length)[:, None]
    slots = torch.arange(band + width - 1)[None, :]
    cols = rows - slots
    inside = (cols >= 0) & (rows < band * (cols.div(band, rounding_mode="floor") + 1) + width - 1)
    rows, slots = torch.broadcast_tensors(rows, slots)
    return rows[inside], slots[inside]
