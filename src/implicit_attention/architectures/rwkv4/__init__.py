"""RWKV-4 time mixing (HF ``RwkvSelfAttention``).

``factors`` reads a layer, ``operator`` is the math (with the value-path token shift inside the
operator on two value streams), ``fast`` the factorised channel aggregates, ``layer`` the
:class:`~..base.LayerDecomposition`, ``naive`` the slow reference.
"""

from ..registry import Architecture, layer_builder, register
from .factors import rwkv_factors
from .fast import wkv_channel_sum, wkv_log_normaliser, wkv_rows
from .layer import RwkvLayerDecomposition
from .operator import EXACT_VARIANTS, VARIANTS, RwkvFactors, rwkv_block, shift_left, wkv_matrices


def _read(captured, dtype) -> RwkvFactors:
    return rwkv_factors(captured.module, captured.inputs, dtype)


register(Architecture(
    "rwkv4", ("transformers.models.rwkv.modeling_rwkv.RwkvSelfAttention",), ("RwkvForCausalLM", "RwkvModel"),
    VARIANTS, "output", layer_builder(RwkvLayerDecomposition, _read), lambda layer: layer.attention_hidden_size,
    exact_variants=EXACT_VARIANTS, ignores_padding=False))   # RwkvModel reads every token, mask or not

__all__ = ["EXACT_VARIANTS", "VARIANTS", "RwkvFactors", "RwkvLayerDecomposition", "rwkv_block", "rwkv_factors",
           "shift_left", "wkv_channel_sum", "wkv_log_normaliser", "wkv_matrices", "wkv_rows"]
