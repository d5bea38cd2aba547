"""HGRN layers as :class:`~..base.LayerDecomposition` (fast aggregates by the tiles of :mod:`..tiled`)."""

from __future__ import annotations

import torch

from ..tiled import DiagonalDecomposition, DiagonalOperator
from .operator import HGRNFactors, hgrn_block, hgrn_operator


class HGRNLayerDecomposition(DiagonalDecomposition):
    """An HGRN recurrence layer as per-channel implicit attention over its width ``E``.

    The signed channel mean (and single rows) come from hierarchical tiles (:mod:`..tiled`), never
    from per-channel blocks; ``recurrence``'s ``R >= 0`` makes its ``abs`` and ``pos`` maps the mean.
    """

    block_temporaries = 5

    def __init__(self, factors: HGRNFactors, *, variant: str, **kwargs):
        self.factors = factors
        values = factors.recurrence_input if variant == "recurrence" else factors.x
        super().__init__(variant=variant, exact=variant == "unified", values=values, offset=None,
                         mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return hgrn_block(self.factors, channels, self.variant)

    def diagonal_operator(self) -> DiagonalOperator:
        return hgrn_operator(self.factors, self.variant)

    @property
    def nonnegative(self) -> bool:
        return self.variant == "recurrence"     # products of f in (0, 1), 1 - f > 0 and the 0/1 mask

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # out = w s g ⊙ (R i): the recurrence variant leaves the norm and gate out of its matrix.
        return grad if self.variant == "unified" else grad * self.factors.row_scale
