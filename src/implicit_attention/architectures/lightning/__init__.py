"""MiniMax lightning attention (``MiniMaxLightningAttention``): linear attention with a fixed decay per head.

``factors`` reads a layer, ``operator`` is the math, ``layer`` the :class:`~..base.LayerDecomposition`
(aggregates per head, :mod:`..heads`), ``naive`` the slow reference. MiniMax's softmax attention
layers are decomposed by ``..attention``; its MoE MLP mixes no tokens.
"""

from ..registry import Architecture, input_and_mask, layer_builder, register
from .factors import lightning_factors
from .layer import LightningLayerDecomposition
from .operator import VARIANTS, LightningFactors, lightning_block, lightning_heads

register(Architecture(
    "lightning", ("transformers.models.minimax.modeling_minimax.MiniMaxLightningAttention",),
    ("MiniMaxForCausalLM", "MiniMaxModel"), VARIANTS, "out_proj",
    layer_builder(LightningLayerDecomposition, input_and_mask(lightning_factors)),
    lambda module: module.out_proj.in_features, rounds_in_float32=True))

__all__ = ["VARIANTS", "LightningFactors", "LightningLayerDecomposition", "lightning_block", "lightning_factors",
           "lightning_heads"]
