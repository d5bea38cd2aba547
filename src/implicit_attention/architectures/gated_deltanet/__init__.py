"""Delta-rule mixers: Gated DeltaNet (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, LaraMini, Qwen4-Exp, OLMo-Hybrid).

``factors`` reads a mixer (Gated DeltaNet and Kimi Delta Attention alike), ``operator`` is the math
(the per-head delta-rule matrices in WY / UT form, per-channel blocks, factorised signed mean and
rows), ``layer`` the :class:`~..base.LayerDecomposition`, ``naive`` the slow reference. Kimi Delta
Attention (per-key-channel decays) shares all of it: see :mod:`..kda`.
"""

from ...memory import LayerFootprint
from ..registry import Architecture, layer_builder, register
from .factors import delta_factors, read_factors, record_core
from .layer import DeltaLayerDecomposition
from .operator import EXACT_VARIANTS, VARIANTS, DeltaFactors, delta_attention, delta_block

_HF = "transformers.models"


def value_heads(module) -> int:
    """Value heads of a delta-rule mixer (the number of per-head matrices it keeps)."""
    return getattr(module, "num_v_heads", None) or module.num_heads


def no_conv_bias(module) -> bool:
    """Whether padding stays out of real tokens: the input is zeroed on padding and every projection is
    bias-free, so only a conv bias could carry padding tokens into the state."""
    return module.conv1d.bias is None or not bool(module.conv1d.bias.detach().any())


#: the per-head matrices kept by the factors; the WY form builds a few more of their size per head
FOOTPRINT = LayerFootprint(maps=value_heads, build_maps=lambda m: 2 * value_heads(m) + 2,
                           path_maps=lambda m: value_heads(m) + 4)

_BUILD = layer_builder(DeltaLayerDecomposition, read_factors)

register(Architecture(
    "gated_deltanet", tuple(f"{_HF}.{path}" for path in (
        "qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet", "qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet",
        "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeGatedDeltaNet", "lara_mini.modeling_lara_mini.LaraMiniGatedDeltaNet",
        "qwen4_exp.modeling_qwen4_exp.Qwen4ExpTextGatedDeltaNet")),
    ("Qwen3NextForCausalLM", "Qwen3NextModel", "Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration",
     "Qwen3_5TextModel", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeTextModel",
     "LaraMiniForCausalLM", "LaraMiniModel", "Qwen4ExpForCausalLM", "Qwen4ExpForConditionalGeneration",
     "Qwen4ExpTextModel"),
    VARIANTS, "out_proj", _BUILD, lambda module: module.value_dim, extra_hooks=record_core, footprint=FOOTPRINT,
    exact_variants=EXACT_VARIANTS, ignores_padding=no_conv_bias, rounds_in_float32=True))

# OLMo-Hybrid's mixer has the same math; its output projection is o_proj
register(Architecture(
    "olmo_gated_deltanet", (f"{_HF}.olmo_hybrid.modeling_olmo_hybrid.OlmoHybridGatedDeltaNet",),
    ("OlmoHybridForCausalLM", "OlmoHybridModel"),
    VARIANTS, "o_proj", _BUILD, lambda module: module.value_dim, extra_hooks=record_core, footprint=FOOTPRINT,
    exact_variants=EXACT_VARIANTS, ignores_padding=no_conv_bias, rounds_in_float32=True))

__all__ = ["EXACT_VARIANTS", "FOOTPRINT", "VARIANTS", "DeltaFactors", "DeltaLayerDecomposition", "delta_attention",
           "delta_block", "delta_factors", "no_conv_bias", "read_factors", "record_core", "value_heads"]
