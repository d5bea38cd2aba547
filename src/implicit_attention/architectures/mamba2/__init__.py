"""Mamba-2 (SSD) mixers: Mamba-2 and the Mamba-2 layers of Bamba, Zamba2, NemotronH, GraniteMoeHybrid
and FalconH1.

``factors`` reads a mixer, ``operator`` is the math (per-head blocks, factorised signed mean and
rows), ``layer`` the :class:`~..base.LayerDecomposition`, ``naive`` the slow reference.
"""

from ...memory import default_block_bytes
from ..primitives import no_in_proj_bias
from ..registry import Architecture, layer_builder, register
from .factors import mamba2_factors
from .layer import Mamba2LayerDecomposition
from .operator import EXACT_VARIANTS, VARIANTS, Mamba2Factors, mamba2_block

_HF = "transformers.models"


def _read(captured, dtype) -> Mamba2Factors:
    return mamba2_factors(captured.module, captured.inputs, captured.attention_mask, dtype,
                          default_block_bytes(captured.inputs.device))


register(Architecture(
    "mamba2", tuple(f"{_HF}.{path}" for path in (
        "mamba2.modeling_mamba2.Mamba2Mixer", "bamba.modeling_bamba.BambaMixer",
        "zamba2.modeling_zamba2.Zamba2MambaMixer", "nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer",
        "granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer",
        "falcon_h1.modeling_falcon_h1.FalconH1Mixer")),
    ("Mamba2ForCausalLM", "Mamba2Model", "BambaForCausalLM", "Zamba2ForCausalLM", "NemotronHForCausalLM",
     "GraniteMoeHybridForCausalLM", "FalconH1ForCausalLM"),
    VARIANTS, "out_proj", layer_builder(Mamba2LayerDecomposition, _read), lambda mixer: mixer.intermediate_size,
    exact_variants=EXACT_VARIANTS, ignores_padding=no_in_proj_bias))

__all__ = ["EXACT_VARIANTS", "VARIANTS", "Mamba2Factors", "Mamba2LayerDecomposition", "mamba2_block",
           "mamba2_factors"]
