"""Kimi Delta Attention: ``KimiLinearDeltaAttention`` (Kimi Linear), ``Glm5NextTextLinearAttention``
(GLM-5 Next), ``BailingHybridDeltaAttention`` (Bailing hybrid).

The delta rule with a decay per key channel, ``Diag(alpha_t)`` in place of Gated DeltaNet's scalar:
the factors, the operator (whose WY form takes either), the layer and the slow reference are
:mod:`..gated_deltanet`'s (its factor reader recognises KDA by its ``forget_gate``).
"""

from ..gated_deltanet import FOOTPRINT, no_conv_bias, read_factors, record_core
from ..gated_deltanet.layer import DeltaLayerDecomposition
from ..gated_deltanet.operator import EXACT_VARIANTS, VARIANTS
from ..registry import Architecture, layer_builder, register

_HF = "transformers.models"


def block_input(model, name: str):
    """The module whose input is the layer's residual stream (``paper`` reads the gradient there): the
    parent block, except under GLM-5 Next's hyper-connections, whose residual is ``[B, L, streams, D]``:
    there the input of the block's ``input_layernorm``, the streams mixed for this layer (``[B, L, D]``)."""
    parent = model.get_submodule(name.rpartition(".")[0])
    return parent.input_layernorm if hasattr(parent, "attn_hc") else parent

register(Architecture(
    "kda", tuple(f"{_HF}.{path}" for path in (
        "kimi_linear.modeling_kimi_linear.KimiLinearDeltaAttention",
        "glm5_next.modeling_glm5_next.Glm5NextTextLinearAttention",
        "bailing_hybrid.modeling_bailing_hybrid.BailingHybridDeltaAttention")),
    ("KimiLinearForCausalLM", "KimiLinearModel", "Glm5NextForConditionalGeneration", "Glm5NextModel", "Glm5NextTextModel",
     "BailingHybridForCausalLM", "BailingHybridModel"),
    VARIANTS, "o_proj", layer_builder(DeltaLayerDecomposition, read_factors), lambda module: module.qkv_dim,
    extra_hooks=record_core, block_input=block_input, footprint=FOOTPRINT, exact_variants=EXACT_VARIANTS,
    ignores_padding=no_conv_bias, rounds_in_float32=True))
