"""Vision Mamba (our ``implicit_attention.models.vim.VimMixer``): bidirectional Mamba, two scans combined.

``factors`` reads a mixer (both scans as Mamba factors), ``operator`` is the math (per channel
``s (A_f + J A_b J)``, Mamba's blocks reused), ``layer`` the :class:`~..base.LayerDecomposition` with
Mamba's fast signed mean and rows run on each scan, ``naive`` the slow reference.
"""

from ...memory import LayerFootprint
from ..registry import Architecture, input_and_mask, layer_builder, register
from .factors import VimFactors, vim_factors
from .layer import VimLayerDecomposition
from .operator import EXACT_VARIANTS, FOLDED_VARIANTS, VARIANTS, vim_block

register(Architecture(
    "vim", ("implicit_attention.models.vim.modeling_vim.VimMixer",), ("VimForImageClassification", "VimModel"),
    VARIANTS, "out_proj", layer_builder(VimLayerDecomposition, input_and_mask(vim_factors)),
    lambda module: module.intermediate_size,
    # Mamba's fused signed mean on CUDA, once per scan
    footprint=LayerFootprint(cuda_path_bytes=2**30), exact_variants=EXACT_VARIANTS))

__all__ = ["EXACT_VARIANTS", "FOLDED_VARIANTS", "VARIANTS", "VimFactors", "VimLayerDecomposition", "vim_block",
           "vim_factors"]
