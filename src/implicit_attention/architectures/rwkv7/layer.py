"""RWKV-7 time mixing as :class:`~..base.LayerDecomposition` (the multi-head decomposition of :mod:`..rwkv6`)."""

from __future__ import annotations

from ..rwkv6.layer import RwkvHeadsDecomposition
from .operator import Rwkv7Factors, rwkv7_attention_tiled


class Rwkv7LayerDecomposition(RwkvHeadsDecomposition):
    """An RWKV-7 time mixing as per-channel implicit attention over its ``C = H N`` value channels."""

    def __init__(self, factors: Rwkv7Factors, *, variant: str, **kwargs):
        self.factors = factors
        f = factors
        super().__init__(attention=rwkv7_attention_tiled(f.r, f.k, f.log_w, f.alpha, f.beta), v=f.v, gate=f.gate,
                         gn_weight=f.gn_weight, gn_bias=f.gn_bias, gn_eps=f.gn_eps, bonus=f.bonus,
                         variant=variant, mask=f.mask, **kwargs)
