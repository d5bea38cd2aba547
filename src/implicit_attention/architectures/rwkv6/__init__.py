"""RWKV-6 time mixing (our :class:`~implicit_attention.models.rwkv6.Rwkv6TimeMix`).

``factors`` reads a layer, ``operator`` is the math (per-head wkv matrices), ``layer`` the
:class:`~..base.LayerDecomposition` shared with RWKV-7, ``naive`` the slow reference.
"""

from ...memory import LayerFootprint, per_head
from ..registry import Architecture, input_and_mask, layer_builder, register
from .factors import record_wkv, rwkv6_factors, token_shift
from .layer import Rwkv6LayerDecomposition, RwkvHeadsDecomposition
from .operator import EXACT_VARIANTS, VARIANTS, Rwkv6Factors, decay_matrices, rwkv6_attention

register(Architecture(
    "rwkv6", ("implicit_attention.models.rwkv6.modeling_rwkv6.Rwkv6TimeMix",), ("Rwkv6ForCausalLM", "Rwkv6Model"),
    VARIANTS, "output", layer_builder(Rwkv6LayerDecomposition, input_and_mask(rwkv6_factors)),
    lambda module: module.hidden_size, extra_hooks=record_wkv,
    # per-head matrices kept by the factors; building them takes a few more of their size
    footprint=LayerFootprint(maps=per_head(), build_maps=per_head(2, 4), path_maps=per_head(4, 2))))

__all__ = ["EXACT_VARIANTS", "VARIANTS", "Rwkv6Factors", "Rwkv6LayerDecomposition", "RwkvHeadsDecomposition",
           "decay_matrices", "record_wkv", "rwkv6_attention", "rwkv6_factors", "token_shift"]
