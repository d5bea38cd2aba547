"""Short gated convolutions: ``Lfm2ShortConv`` and ``Lfm3ShortConv`` (LFM2, LFM2-MoE, LFM3).

``y = C~ * conv(B~ * x)``: per channel the banded operator ``diag(C~_c) M_c diag(B~_c)``, exact.
``factors`` reads a layer, ``operator`` is the math (blocks and the banded aggregates), ``layer`` the
:class:`~..base.LayerDecomposition`, ``naive`` the slow reference. LFM's attention layers are
decomposed by ``..attention``.
"""

from ..primitives import no_in_proj_bias
from ..registry import Architecture, input_and_mask, layer_builder, register
from .factors import shortconv_factors
from .layer import ShortConvLayerDecomposition
from .operator import VARIANTS, ShortConvFactors, band_aggregate, shortconv_block

_HF = "transformers.models"

register(Architecture(
    "shortconv", (f"{_HF}.lfm2.modeling_lfm2.Lfm2ShortConv", f"{_HF}.lfm2_moe.modeling_lfm2_moe.Lfm2MoeShortConv",
                  f"{_HF}.lfm3.modeling_lfm3.Lfm3ShortConv"),
    ("Lfm2ForCausalLM", "Lfm2Model", "Lfm2MoeForCausalLM", "Lfm2MoeModel", "Lfm3ForCausalLM", "Lfm3Model"),
    VARIANTS, "out_proj", layer_builder(ShortConvLayerDecomposition, input_and_mask(shortconv_factors)),
    lambda module: module.conv.in_channels, ignores_padding=no_in_proj_bias))

__all__ = ["VARIANTS", "ShortConvFactors", "ShortConvLayerDecomposition", "band_aggregate", "shortconv_block",
           "shortconv_factors"]
