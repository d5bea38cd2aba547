"""Slow, obviously-correct Vision Mamba implicit attention: the test oracle for :mod:`.operator`.

Each scan's matrices come from Mamba's loops (:func:`..mamba.naive.naive_mamba`); the backward scan's
are brought to token order with an explicit reversal matrix ``J`` (``J A J``, ``J o``), then combined
as the formulation page writes it, ``s (A_f + J A_b J)`` (folded variants: the two side by side, see
:mod:`.operator`).
"""

from __future__ import annotations

import torch

from ..mamba.naive import naive_mamba
from .factors import VimFactors
from .operator import FOLDED_VARIANTS


def naive_vim(f: VimFactors, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices ``[B, C, L, L]`` and offset ``[B, L, C]`` of ``variant`` (``C = E``, or ``2E`` folded)."""
    M_f, o_f = naive_mamba(f.forward, variant)
    M_b, o_b = naive_mamba(f.backward, variant)
    length = f.x.shape[1]
    J = torch.eye(length, dtype=f.x.dtype).flip(0)
    batch, channels = M_b.shape[:2]
    back = torch.zeros_like(M_b)
    back_offset = torch.zeros_like(o_b)
    for b in range(batch):
        for d in range(channels):
            back[b, d] = J @ M_b[b, d] @ J
            back_offset[b, :, d] = J @ o_b[b, :, d]
    s = f.scale
    if variant in FOLDED_VARIANTS:
        return torch.cat([2 * s * M_f, 2 * s * back], dim=1), torch.cat([s * o_f, s * back_offset], dim=-1)
    return s * (M_f + back), s * (o_f + back_offset)
