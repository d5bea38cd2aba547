"""Griffin recurrent blocks as :class:`~..base.LayerDecomposition` (fast aggregates by the tiles of :mod:`..tiled`)."""

from __future__ import annotations

import torch

from ..tiled import DiagonalDecomposition, DiagonalOperator
from .operator import EXACT_VARIANTS, GriffinFactors, griffin_block, griffin_operator


class GriffinLayerDecomposition(DiagonalDecomposition):
    """A Griffin recurrent block as per-channel implicit attention over its width ``E``.

    The signed channel mean (and single rows) come from hierarchical tiles (:mod:`..tiled`), never
    from per-channel blocks; ``rglru``'s ``alpha >= 0`` makes its ``abs`` and ``pos`` maps the mean.
    """

    block_temporaries = 5

    def __init__(self, factors: GriffinFactors, *, variant: str, **kwargs):
        self.factors = factors
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=factors.values(variant),
                         offset=None, mask=factors.mask, **kwargs)

    def _block(self, channels: slice):
        return griffin_block(self.factors, channels, self.variant)

    def diagonal_operator(self) -> DiagonalOperator:
        return griffin_operator(self.factors, self.variant)

    @property
    def nonnegative(self) -> bool:
        return self.variant == "rglru"          # decays, m = sqrt(1 - a^2) and sigmoid(.) are >= 0

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # out = y * (alpha c): the gate that "rglru" and "no_gate" leave out multiplies the gradient.
        return grad * self.factors.gate if self.variant in ("rglru", "no_gate") else grad
