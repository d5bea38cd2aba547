"""``flash-linear-attention``'s layers (PyPI ``flash-linear-attention``; the ``fla`` extra: ``pip install -e ".[fla]"``).

Adapters only: each ``fla`` layer is read (:mod:`.factors`) into the factors of the architecture with
the same math, whose operator, fast paths and slow reference it shares:

- ``fla.layers.GatedDeltaNet`` and ``fla.layers.DeltaNet`` -> :mod:`..gated_deltanet`;
- ``fla.layers.GatedLinearAttention`` -> :mod:`..gla` (an RMS norm per head instead of our GLA's group norm);
- ``fla.layers.MultiScaleRetention`` (RetNet) -> :mod:`..gla` with a fixed decay per head and rotary ``q, k``;
- ``fla.layers.HGRNAttention`` -> :mod:`..hgrn` (the swish output gate after the RMS norm);
- ``fla.layers.HGRN2Attention`` -> :mod:`..gla` (keys ``1 - f``; one RMS norm over all heads, applied with the
  output projection in one fused call, so the layer is decomposed through ``o_proj``: ``projection``);
- ``fla.layers.GatedSlotAttention`` (GSA) -> :mod:`..gla` over the slots (the second of its two chained
  recurrences, queried by the softmax of the first; ``sigmoid(o)`` of its SiLU as a row scale), through
  ``o_proj`` as HGRN2;
- ``fla.layers.RWKV6Attention`` -> :mod:`..rwkv6` (fla's LoRA token shift, run with the module's own submodules);
- ``fla.layers.RWKV7Attention`` -> :mod:`..rwkv7` (fla's LoRAs likewise; ``v_first`` from the model's call).

``fla`` imports Triton, whose kernels need a GPU driver (or ``TRITON_INTERPRET=1``, slowly, on a CPU);
without ``fla`` installed this package registers classes that never match, and
``implicit-attention info`` lists them as absent.
"""

from __future__ import annotations

from ...memory import LayerFootprint
from ..gated_deltanet import FOOTPRINT, record_core
from ..gated_deltanet.factors import delta_factors
from ..gated_deltanet.layer import DeltaLayerDecomposition
from ..gated_deltanet.operator import EXACT_VARIANTS, VARIANTS
from ..gla.layer import GLALayerDecomposition
from ..gla.operator import VARIANTS as GLA_VARIANTS
from ..hgrn.layer import HGRNLayerDecomposition
from ..hgrn.operator import VARIANTS as HGRN_VARIANTS
from ..primitives import to_batch
from ..registry import Architecture, CapturedLayer, input_and_mask, layer_builder, register
from ..rwkv6.layer import Rwkv6LayerDecomposition
from ..rwkv6.operator import EXACT_VARIANTS as RWKV6_EXACT_VARIANTS
from ..rwkv6.operator import VARIANTS as RWKV6_VARIANTS
from ..rwkv7.layer import Rwkv7LayerDecomposition
from ..rwkv7.operator import VARIANTS as RWKV7_VARIANTS
from .factors import (
    fla_deltanet_inputs,
    fla_gated_deltanet_inputs,
    fla_gla_factors,
    fla_gsa_factors,
    fla_hgrn2_factors,
    fla_hgrn_factors,
    fla_retnet_factors,
    fla_rwkv6_factors,
    fla_rwkv7_factors,
)


def _short_conv_bias_free(module) -> bool:
    """Padding stays out of real tokens unless a short convolution has a non-zero bias (``fla`` runs a
    padded batch unpadded, so only that could differ from the zero-padded recomputation)."""
    if not getattr(module, "use_short_conv", False):
        return True
    return all(conv.bias is None or not bool(conv.bias.detach().any())
               for conv in (module.q_conv1d, module.k_conv1d, module.v_conv1d))


def _reader(read_inputs):
    def read(captured: CapturedLayer, dtype):
        return delta_factors(captured.module, captured.inputs, captured.attention_mask, dtype,
                             core=captured.extra.get("core"), read_inputs=read_inputs)
    return read


register(Architecture(
    "fla_gated_deltanet", ("fla.layers.gated_deltanet.GatedDeltaNet",),
    ("fla.models.GatedDeltaNetForCausalLM", "fla.models.GatedDeltaNetModel"), VARIANTS, "o_proj",
    layer_builder(DeltaLayerDecomposition, _reader(fla_gated_deltanet_inputs)), lambda module: module.value_dim,
    extra_hooks=record_core, footprint=FOOTPRINT, exact_variants=EXACT_VARIANTS,
    ignores_padding=_short_conv_bias_free, rounds_in_float32=True))

register(Architecture(
    "fla_deltanet", ("fla.layers.delta_net.DeltaNet",), ("fla.models.DeltaNetForCausalLM", "fla.models.DeltaNetModel"), VARIANTS, "o_proj",
    layer_builder(DeltaLayerDecomposition, _reader(fla_deltanet_inputs)), lambda module: module.value_dim,
    extra_hooks=record_core, footprint=FOOTPRINT, exact_variants=EXACT_VARIANTS,
    ignores_padding=_short_conv_bias_free, rounds_in_float32=True))

register(Architecture(
    "fla_gla", ("fla.layers.gla.GatedLinearAttention",), ("fla.models.GLAForCausalLM", "fla.models.GLAModel"), GLA_VARIANTS, "o_proj",
    layer_builder(GLALayerDecomposition, input_and_mask(fla_gla_factors)), lambda module: module.value_dim,
    # the factors run our chunked scan: [B, T, T, K] temporaries for chunks of 64 tokens
    footprint=LayerFootprint(build_vectors=lambda m: 24 + -(-4 * 64 * m.key_dim // m.value_dim)),
    ignores_padding=_short_conv_bias_free))

register(Architecture(
    "fla_retnet", ("fla.layers.multiscale_retention.MultiScaleRetention",),
    ("fla.models.RetNetForCausalLM", "fla.models.RetNetModel"), GLA_VARIANTS, "o_proj",
    layer_builder(GLALayerDecomposition, input_and_mask(fla_retnet_factors)), lambda module: module.value_dim,
    footprint=LayerFootprint(build_vectors=lambda m: 24 + -(-4 * 64 * m.key_dim // m.value_dim)),
    ignores_padding=_short_conv_bias_free))

def _hgrn_short_conv_bias_free(module) -> bool:
    return not module.use_short_conv or all(conv.bias is None or not bool(conv.bias.detach().any())
                                            for conv in (module.i_conv1d, module.f_conv1d))


register(Architecture(
    "fla_hgrn", ("fla.layers.hgrn.HGRNAttention",), ("fla.models.HGRNForCausalLM", "fla.models.HGRNModel"),
    HGRN_VARIANTS, "o_proj",
    layer_builder(HGRNLayerDecomposition, lambda captured, dtype: fla_hgrn_factors(
        captured.module, captured.inputs, captured.attention_mask, captured.kwargs.get("lower_bound"), dtype)),
    lambda module: module.input_dim,
    footprint=LayerFootprint(build_vectors=lambda m: 24 + 4 * 64), ignores_padding=_hgrn_short_conv_bias_free))

def _hgrn2_short_conv_bias_free(module) -> bool:
    return not module.use_short_conv or all(conv.bias is None or not bool(conv.bias.detach().any())
                                            for conv in (module.q_conv1d, module.f_conv1d, module.i_conv1d))


def _through_projection(read_factors):
    """The ``build`` of a layer whose norm and output projection fla fuses into one call (HGRN2, GSA): captured
    at the module's own output and decomposed through ``o_proj`` (``LayerDecomposition.projection``)."""
    def build(captured: CapturedLayer, *, variant: str, dtype, index: int) -> GLALayerDecomposition:
        module = captured.module
        if module.o_proj.bias is not None and bool(module.o_proj.bias.detach().any()):
            raise NotImplementedError(f"{type(module).__name__} with an output projection bias is not written here")
        output = to_batch(captured.output.detach().to(dtype), captured.inputs, captured.attention_mask)
        return GLALayerDecomposition(read_factors(captured, dtype), variant=variant, index=index, name=captured.name,
                                     output=output, projection=module.o_proj.weight.detach().to(dtype))
    return build


_build_hgrn2 = _through_projection(lambda captured, dtype: fla_hgrn2_factors(
    captured.module, captured.inputs, captured.attention_mask, captured.kwargs.get("lower_bound"), dtype))


register(Architecture(
    "fla_hgrn2", ("fla.layers.hgrn2.HGRN2Attention",), ("fla.models.HGRN2ForCausalLM", "fla.models.HGRN2Model"),
    GLA_VARIANTS, None, _build_hgrn2, lambda module: module.input_dim,
    footprint=LayerFootprint(build_vectors=lambda m: 24 + -(-4 * 64 * m.forget_dim // m.input_dim)),
    ignores_padding=_hgrn2_short_conv_bias_free, rounds_in_float32=True))

register(Architecture(
    "fla_gsa", ("fla.layers.gsa.GatedSlotAttention",), ("fla.models.GSAForCausalLM", "fla.models.GSAModel"),
    GLA_VARIANTS, None, _through_projection(input_and_mask(fla_gsa_factors)), lambda module: module.value_dim,
    footprint=LayerFootprint(build_vectors=lambda m: 24 + -(-4 * 64 * m.num_slots * m.num_heads // m.value_dim)),
    ignores_padding=_short_conv_bias_free, rounds_in_float32=True))

register(Architecture(
    "fla_rwkv6", ("fla.layers.rwkv6.RWKV6Attention",), ("fla.models.RWKV6ForCausalLM", "fla.models.RWKV6Model"),
    RWKV6_VARIANTS, "o_proj", layer_builder(Rwkv6LayerDecomposition, input_and_mask(fla_rwkv6_factors)),
    lambda module: module.value_dim, exact_variants=RWKV6_EXACT_VARIANTS, rounds_in_float32=True,
    footprint=LayerFootprint(maps=lambda m: m.num_heads, build_maps=lambda m: 2 * m.num_heads + 4,
                             path_maps=lambda m: 4 * m.num_heads + 2)))

register(Architecture(
    "fla_rwkv7", ("fla.layers.rwkv7.RWKV7Attention",), ("fla.models.RWKV7ForCausalLM", "fla.models.RWKV7Model"),
    RWKV7_VARIANTS, "o_proj",
    layer_builder(Rwkv7LayerDecomposition, lambda captured, dtype: fla_rwkv7_factors(
        captured.module, captured.inputs, captured.attention_mask, captured.kwargs.get("v_first"), dtype)),
    lambda module: module.value_dim, rounds_in_float32=True,
    footprint=LayerFootprint(maps=lambda m: m.num_heads, build_maps=lambda m: 2 * m.num_heads + 8,
                             path_maps=lambda m: 4 * m.num_heads + 2)))

__all__ = ["fla_deltanet_inputs", "fla_gated_deltanet_inputs", "fla_gla_factors", "fla_gsa_factors", "fla_hgrn2_factors", "fla_hgrn_factors",
           "fla_retnet_factors", "fla_rwkv6_factors", "fla_rwkv7_factors"]
