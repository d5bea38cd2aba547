"""RetNet multi-scale retention (our ``implicit_attention.models.retnet.RetNetRetention``).

``factors`` reads a layer, ``operator`` is the math, ``layer`` the :class:`~..base.LayerDecomposition`,
``naive`` the slow reference.
"""

from ..registry import Architecture, input_and_mask, layer_builder, register
from .factors import retnet_factors
from .layer import RetNetLayerDecomposition
from .operator import VARIANTS, RetNetFactors, retention_heads, retnet_block

register(Architecture(
    "retnet", ("implicit_attention.models.retnet.modeling_retnet.RetNetRetention",), ("RetNetForCausalLM", "RetNetModel"),
    VARIANTS, "o_proj", layer_builder(RetNetLayerDecomposition, input_and_mask(retnet_factors)),
    lambda module: module.value_dim))

__all__ = ["VARIANTS", "RetNetFactors", "RetNetLayerDecomposition", "retention_heads", "retnet_block",
           "retnet_factors"]
