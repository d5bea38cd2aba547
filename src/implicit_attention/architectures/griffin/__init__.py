"""Griffin / RecurrentGemma: the RG-LRU recurrent blocks and the local attention layers.

``factors`` reads a recurrent block, ``operator`` is the math, ``layer`` the
:class:`~..base.LayerDecomposition` (fast aggregates by the tiles of :mod:`..tiled`), ``naive`` the
slow reference; the local attention is decomposed by :mod:`..attention`.
"""

from ..attention import FOOTPRINT as ATTENTION_FOOTPRINT
from ..attention import attention_builder, record_arguments, recurrent_gemma_qkv
from ..registry import Architecture, layer_builder, register
from .factors import griffin_factors
from .layer import GriffinLayerDecomposition
from .operator import EXACT_VARIANTS, VARIANTS, GriffinFactors, griffin_block, griffin_operator, rglru_matrices

_RG = "transformers.models.recurrent_gemma.modeling_recurrent_gemma"


def _read(captured, dtype) -> GriffinFactors:
    return griffin_factors(captured.module, captured.inputs, captured.kwargs, dtype)


register(Architecture(
    "griffin", (f"{_RG}.RecurrentGemmaRecurrentBlock",), ("RecurrentGemmaForCausalLM", "RecurrentGemmaModel"),
    VARIANTS, "linear_out", layer_builder(GriffinLayerDecomposition, _read), lambda block: block.lru_width,
    exact_variants=EXACT_VARIANTS, ignores_padding=False))   # the recurrent block ignores the mask
register(Architecture(
    # softmax attention within a sliding window, exact under every recurrent variant name
    "griffin_attention", (f"{_RG}.RecurrentGemmaAttention",), (), VARIANTS, "o_proj",
    attention_builder(recurrent_gemma_qkv), lambda attn: attn.num_attention_heads * attn.head_dim,
    extra_hooks=record_arguments, footprint=ATTENTION_FOOTPRINT, exact_variants=frozenset(VARIANTS)))

__all__ = ["EXACT_VARIANTS", "VARIANTS", "GriffinFactors", "GriffinLayerDecomposition", "griffin_block",
           "griffin_factors", "griffin_operator", "rglru_matrices"]
