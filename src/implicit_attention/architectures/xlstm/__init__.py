"""xLSTM's mLSTM layers (HF ``xLSTMLayer``).

``factors`` reads a layer, ``operator`` is the math (the stabilised, normalised mLSTM matrix),
``layer`` the :class:`~..base.LayerDecomposition`, ``naive`` the slow reference.
"""

from ...memory import LayerFootprint, per_head
from ..registry import Architecture, layer_builder, register
from .factors import projections, xlstm_factors
from .layer import XlstmLayerDecomposition
from .operator import EXACT_VARIANTS, VARIANTS, XlstmFactors, mlstm_matrices, row_scale, xlstm_block


def _read(captured, dtype) -> XlstmFactors:
    return xlstm_factors(captured.module, captured.inputs, dtype)


register(Architecture(
    "xlstm", ("transformers.models.xlstm.modeling_xlstm.xLSTMLayer",), ("xLSTMForCausalLM", "xLSTMModel"),
    VARIANTS, "out_proj", layer_builder(XlstmLayerDecomposition, _read), lambda layer: layer.v_dim,
    # per-head matrices kept by the factors; building them takes a few more of their size
    footprint=LayerFootprint(maps=per_head(), build_maps=per_head(2, 6), path_maps=per_head(4, 2)),
    ignores_padding=False))   # xLSTMModel takes no attention mask

__all__ = ["EXACT_VARIANTS", "VARIANTS", "XlstmFactors", "XlstmLayerDecomposition", "mlstm_matrices",
           "projections", "row_scale", "xlstm_block", "xlstm_factors"]
