"""Gated linear attention (our ``implicit_attention.models.gla.GLAAttention``).

``factors`` reads a layer, ``operator`` is the math, ``fast`` the heads by hierarchical tiles,
``layer`` the :class:`~..base.LayerDecomposition`, ``naive`` the slow reference.
"""

from ...memory import LayerFootprint
from ..registry import Architecture, input_and_mask, layer_builder, register
from .factors import gla_factors
from .fast import gla_heads_tiled, key_dim_operator
from .layer import GLALayerDecomposition
from .operator import VARIANTS, GLAFactors, gla_block, gla_heads

register(Architecture(
    "gla", ("implicit_attention.models.gla.modeling_gla.GLAAttention",), ("GLAForCausalLM", "GLAModel"),
    VARIANTS, "o_proj", layer_builder(GLALayerDecomposition, input_and_mask(gla_factors)),
    lambda module: module.value_dim,
    # the factors run the model's chunked scan: [B, T, T, K] temporaries for chunks of T tokens
    footprint=LayerFootprint(build_vectors=lambda m: 24 + -(-4 * getattr(m, "chunk_size", 64) * getattr(
        m, "key_dim", 1) // getattr(m, "value_dim", 1)))))

__all__ = ["VARIANTS", "GLAFactors", "GLALayerDecomposition", "gla_block", "gla_factors", "gla_heads",
           "gla_heads_tiled", "key_dim_operator"]
