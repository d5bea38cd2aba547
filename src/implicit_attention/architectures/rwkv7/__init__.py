"""RWKV-7 time mixing (our :class:`~implicit_attention.models.rwkv7.Rwkv7TimeMix`).

``factors`` reads a layer, ``operator`` is the math (the delta-rule transitions in WY / UT form),
``layer`` the :class:`~..base.LayerDecomposition` (RWKV-6's multi-head one), ``naive`` the slow
reference.
"""

from ...memory import LayerFootprint, per_head
from ..registry import Architecture, layer_builder, register
from ..rwkv6.factors import record_wkv
from .factors import rwkv7_factors
from .layer import Rwkv7LayerDecomposition
from .operator import VARIANTS, Rwkv7Factors, rwkv7_attention


def _read(captured, dtype) -> Rwkv7Factors:
    return rwkv7_factors(captured.module, captured.inputs, captured.attention_mask, captured.kwargs.get("v_first"),
                         dtype)


register(Architecture(
    "rwkv7", ("implicit_attention.models.rwkv7.modeling_rwkv7.Rwkv7TimeMix",), ("Rwkv7ForCausalLM", "Rwkv7Model"),
    VARIANTS, "output", layer_builder(Rwkv7LayerDecomposition, _read), lambda module: module.hidden_size,
    extra_hooks=record_wkv,
    # per-head matrices kept by the factors; the WY form builds four of their size per head
    footprint=LayerFootprint(maps=per_head(), build_maps=per_head(2, 8), path_maps=per_head(4, 2))))

__all__ = ["VARIANTS", "Rwkv7Factors", "Rwkv7LayerDecomposition", "rwkv7_attention", "rwkv7_factors"]
