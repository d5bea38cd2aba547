"""Mamba (S6) mixers: ``MambaMixer``, ``FalconMambaMixer`` and the Mamba blocks of Jamba and Zamba.

``factors`` reads a mixer, ``operator`` is the math (per-channel blocks), ``layer`` the
:class:`~..base.LayerDecomposition`, ``fast`` / ``tiling`` / ``triton`` the factorised signed mean and
rows, ``naive`` the slow reference.
"""

from ...memory import LayerFootprint, per_head
from ..primitives import no_in_proj_bias
from ..registry import Architecture, input_and_mask, layer_builder, register
from .factors import jamba_factors, mamba_factors, zamba_factors
from .layer import MambaLayerDecomposition, ZambaLayerDecomposition
from .operator import EXACT_VARIANTS, VARIANTS, MambaFactors, mamba_block

_HF = "transformers.models"


def _inner_width(mixer) -> int:
    return mixer.intermediate_size


#: the fused signed mean of Mamba on CUDA sizes its factor tensors for up to 1 GiB
_FUSED = LayerFootprint(cuda_path_bytes=2**30, fast_rows=True)   # rows: MambaLayerDecomposition._matrix_rows


register(Architecture(
    "mamba", (f"{_HF}.mamba.modeling_mamba.MambaMixer", f"{_HF}.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer"),
    ("MambaForCausalLM", "MambaModel", "FalconMambaForCausalLM", "FalconMambaModel"), VARIANTS, "out_proj",
    layer_builder(MambaLayerDecomposition, input_and_mask(mamba_factors)), _inner_width, footprint=_FUSED,
    exact_variants=EXACT_VARIANTS, ignores_padding=no_in_proj_bias))
register(Architecture(
    "jamba_mamba", (f"{_HF}.jamba.modeling_jamba.JambaMambaMixer",),
    ("JambaForCausalLM", "JambaModel", "JambaForSequenceClassification"), VARIANTS, "out_proj",
    layer_builder(MambaLayerDecomposition, input_and_mask(jamba_factors)), _inner_width, footprint=_FUSED,
    exact_variants=EXACT_VARIANTS, ignores_padding=no_in_proj_bias))
register(Architecture(
    "zamba_mamba", (f"{_HF}.zamba.modeling_zamba.ZambaMambaMixer",),
    ("ZambaForCausalLM", "ZambaModel", "ZambaForSequenceClassification"), VARIANTS, "out_proj",
    layer_builder(ZambaLayerDecomposition, input_and_mask(zamba_factors)), _inner_width,
    # the signed mean stacks one map per head
    footprint=LayerFootprint(path_maps=per_head(4), cuda_path_bytes=2**30), exact_variants=EXACT_VARIANTS,
    ignores_padding=no_in_proj_bias))

__all__ = ["EXACT_VARIANTS", "VARIANTS", "MambaFactors", "MambaLayerDecomposition", "ZambaLayerDecomposition",
           "jamba_factors", "mamba_block", "mamba_factors", "zamba_factors"]
