"""HGRN's gated linear recurrence (our ``implicit_attention.models.hgrn.HGRNRecurrence``).

``factors`` reads a layer, ``operator`` is the math, ``layer`` the :class:`~..base.LayerDecomposition`
(fast aggregates by the tiles of :mod:`..tiled`), ``naive`` the slow reference.
"""

from ...memory import LayerFootprint
from ..registry import Architecture, layer_builder, register
from .factors import hgrn_factors
from .layer import HGRNLayerDecomposition
from .operator import VARIANTS, HGRNFactors, hgrn_block, hgrn_operator, recurrence_matrices


def _read(captured, dtype) -> HGRNFactors:
    return hgrn_factors(captured.module, captured.inputs, captured.attention_mask,
                        captured.kwargs.get("lower_bound"), dtype)


register(Architecture(
    "hgrn", ("implicit_attention.models.hgrn.modeling_hgrn.HGRNRecurrence",), ("HGRNForCausalLM", "HGRNModel"),
    VARIANTS, "o_proj", layer_builder(HGRNLayerDecomposition, _read), lambda module: module.expand_dim,
    # the factors run the model's chunked scan: [B, T, T, E] temporaries for chunks of T tokens
    footprint=LayerFootprint(build_vectors=lambda m: 24 + 4 * getattr(m, "chunk_size", 64))))

__all__ = ["VARIANTS", "HGRNFactors", "HGRNLayerDecomposition", "hgrn_block", "hgrn_factors",
           "hgrn_operator", "recurrence_matrices"]
