"""Softmax self-attention of Transformers and of the attention layers inside hybrids.

A softmax attention layer *is* an attention operator already; this package puts it in the same
``[B, C, L, L]`` form as the implicit attention of the recurrent layers, so that a hybrid model
(Mamba + attention) is explained in one rollout and a Transformer is compared with a Mamba by the
same code. Per channel ``c`` of head ``h = c // D``: ``matrix[b, c] = P_h``, ``values[..., c] =
v[..., c]`` (key/value heads repeated for GQA) and ``offset = 0``: ``P V`` equals the attention
output before the output projection exactly (``c_proj`` / ``o_proj``; for BERT the projection lives
in ``BertSelfOutput``, outside the module, and the module's own first return value is that output).

Because all ``D`` channels of a head share one matrix, the layer computes aggregates and
attributions per head (``H`` matrices, not ``C``), and keeps ``q, k, v`` (``[B, L, C]``-sized),
recomputing ``P`` for a few heads at a time. Since ``P >= 0``: ``mean = abs = pos = mean_h P_h``.
Attribution follows Chefer et al. per head: ``mean_h clamp(dP_h * P_h, 0)`` with ``dP_h = G_h V_h^T``
the exact gradient with respect to the head's probabilities.

The newer hybrids' attention layers add data-controlled factors that stay exact: an output gate
before the projection is a row scale per channel, ``diag(g_c) P_h`` (Qwen3-Next, Qwen3.5, Qwen4-Exp:
``sigmoid`` of half of ``q_proj``; LFM3 and Bailing: ``sigmoid(g_proj(h))`` per head); q/k RMS norms
(LFM2, LFM3, the Qwens, OLMo-Hybrid, Lara) and partial or absent rotary embeddings change only ``P``;
multi-head latent attention (Kimi Linear, Bailing, GLM-5 Next) only how ``q, k, v`` are made; the
sparse attentions (Qwen4-Exp's QSA, GLM-5 Next's top-k) only the mask, recomputed by the module's own
indexer. The probabilities are softmax over keys; the values are what the matrix multiplies.

``factors`` reads a module (``q, k, v`` per class, mask, rotary embeddings, gate), ``operator`` holds
the masks and probabilities, ``layer`` the :class:`~..base.LayerDecomposition`, ``naive`` the slow
reference. The variant is ``unified`` (the attention probabilities, gated where the module is); a
gated layer also offers ``no_gate``, its gate left out (an ablation). Inside a hybrid an attention
layer keeps ``unified`` under the recurrent layers' other variants (``Architecture.keeps_unified``).
"""

from ...memory import LayerFootprint, eager_weights, heads
from ..registry import Architecture, layer_builder, register
from .factors import (
    attention_factors,
    attention_reader,
    bailing_qkv,
    bert_qkv,
    gated_qkv,
    glm5_qkv,
    gpt2_qkv,
    latent_qkv,
    minimax_qkv,
    projection_qkv,
    qwen4_qkv,
    record_arguments,
    recurrent_gemma_qkv,
)
from .layer import AttentionLayerDecomposition
from .operator import AttentionFactors, additive_mask, attention_probabilities, repeat_kv, split_heads

VARIANTS: tuple[str, ...] = ("unified",)
#: An attention layer with an output gate also offers ``no_gate`` (the gate left out: an ablation).
GATED_VARIANTS: tuple[str, ...] = ("unified", "no_gate")
#: Probabilities recomputed per chunk of heads, the additive mask per chunk; eager modules return
#: their [B, H, L, L] weights, which the hooks capture.
FOOTPRINT = LayerFootprint(vectors=8, build_vectors=8, build_maps=2, units=heads, path_vectors=4, path_maps=4,
                           captured_maps=eager_weights)
_HF = "transformers.models"


def attention_builder(qkv):
    """The ``build`` of an attention architecture whose module gives ``q, k, v`` by ``qkv``."""
    return layer_builder(AttentionLayerDecomposition, attention_reader(qkv))


register(Architecture(
    "attention_gpt2", (f"{_HF}.gpt2.modeling_gpt2.GPT2Attention",), ("GPT2LMHeadModel", "GPT2Model"), VARIANTS,
    "c_proj", attention_builder(gpt2_qkv), lambda m: m.embed_dim, extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))
register(Architecture(
    # the pre-5.x ViTSelfAttention is BERT-like; the output projection is BertSelfOutput.dense, outside the module
    "attention_bert", (f"{_HF}.bert.modeling_bert.BertSelfAttention", f"{_HF}.vit.modeling_vit.ViTSelfAttention"),
    ("BertModel", "BertForSequenceClassification"), VARIANTS, None, attention_builder(bert_qkv),
    lambda m: m.all_head_size, extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))
register(Architecture(
    "attention", tuple(f"{_HF}.{path}" for path in (
        "llama.modeling_llama.LlamaAttention", "vit.modeling_vit.ViTAttention", "deit.modeling_deit.DeiTAttention",
        "jamba.modeling_jamba.JambaAttention", "zamba.modeling_zamba.ZambaAttention",
        "zamba2.modeling_zamba2.Zamba2Attention", "bamba.modeling_bamba.BambaAttention",
        "nemotron_h.modeling_nemotron_h.NemotronHAttention",
        "granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridAttention",
        "falcon_h1.modeling_falcon_h1.FalconH1Attention")),
    ("LlamaForCausalLM", "ViTForImageClassification", "ViTModel", "DeiTForImageClassification", "JambaForCausalLM",
     "ZambaForCausalLM", "Zamba2ForCausalLM", "BambaForCausalLM", "NemotronHForCausalLM",
     "GraniteMoeHybridForCausalLM", "FalconH1ForCausalLM"),
    VARIANTS, "o_proj", attention_builder(projection_qkv), lambda m: m.o_proj.in_features,
    extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))

# the softmax attention layers of the newer hybrids: q/k norms, output gates, partial or no rotary embeddings
register(Architecture(
    "attention_lfm2", (f"{_HF}.lfm2.modeling_lfm2.Lfm2Attention", f"{_HF}.lfm2_moe.modeling_lfm2_moe.Lfm2MoeAttention"),
    ("Lfm2ForCausalLM", "Lfm2Model", "Lfm2MoeForCausalLM", "Lfm2MoeModel"), VARIANTS, "out_proj",
    attention_builder(gated_qkv), lambda m: m.out_proj.in_features, extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))
register(Architecture(
    "attention_gated", tuple(f"{_HF}.{path}" for path in (
        "lfm3.modeling_lfm3.Lfm3Attention", "qwen3_next.modeling_qwen3_next.Qwen3NextAttention",
        "qwen3_5.modeling_qwen3_5.Qwen3_5Attention", "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeAttention",
        "olmo_hybrid.modeling_olmo_hybrid.OlmoHybridAttention", "lara_mini.modeling_lara_mini.LaraMiniAttention")),
    ("Lfm3ForCausalLM", "Lfm3Model", "Qwen3NextForCausalLM", "Qwen3NextModel", "Qwen3_5ForCausalLM",
     "Qwen3_5TextModel", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextModel", "OlmoHybridForCausalLM",
     "OlmoHybridModel", "LaraMiniForCausalLM", "LaraMiniModel"),
    GATED_VARIANTS, "o_proj", attention_builder(gated_qkv), lambda m: m.o_proj.in_features,
    extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))
register(Architecture(
    "attention_minimax", (f"{_HF}.minimax.modeling_minimax.MiniMaxAttention",), ("MiniMaxForCausalLM", "MiniMaxModel"),
    VARIANTS, "o_proj", attention_builder(minimax_qkv), lambda m: m.o_proj.in_features,
    extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))
register(Architecture(
    "attention_latent", (f"{_HF}.kimi_linear.modeling_kimi_linear.KimiLinearAttention",),
    ("KimiLinearForCausalLM", "KimiLinearModel"), VARIANTS, "o_proj", attention_builder(latent_qkv),
    lambda m: m.o_proj.in_features, extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))
register(Architecture(
    "attention_bailing", (f"{_HF}.bailing_hybrid.modeling_bailing_hybrid.BailingHybridAttention",),
    ("BailingHybridForCausalLM", "BailingHybridModel"), GATED_VARIANTS, "o_proj", attention_builder(bailing_qkv),
    lambda m: m.o_proj.in_features, extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))
register(Architecture(
    # sparse attentions: the mask comes from a top-k selection of keys, recomputed by the module's own indexer
    "attention_qwen4", (f"{_HF}.qwen4_exp.modeling_qwen4_exp.Qwen4ExpTextAttention",),
    ("Qwen4ExpForCausalLM", "Qwen4ExpTextModel"), GATED_VARIANTS, "o_proj", attention_builder(qwen4_qkv),
    lambda m: m.o_proj.in_features, extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))
register(Architecture(
    "attention_glm5", (f"{_HF}.glm5_next.modeling_glm5_next.Glm5NextTextAttention",),
    ("Glm5NextTextModel", "Glm5NextForConditionalGeneration"), VARIANTS, "o_proj", attention_builder(glm5_qkv),
    lambda m: m.o_proj.in_features, extra_hooks=record_arguments, footprint=FOOTPRINT, keeps_unified=True))

__all__ = ["FOOTPRINT", "VARIANTS", "AttentionFactors", "AttentionLayerDecomposition", "additive_mask", "attention_builder",
           "attention_factors", "attention_probabilities", "bailing_qkv", "bert_qkv", "gated_qkv", "glm5_qkv", "gpt2_qkv", "latent_qkv",
           "minimax_qkv", "projection_qkv", "qwen4_qkv", "record_arguments", "recurrent_gemma_qkv", "repeat_kv", "split_heads"]
