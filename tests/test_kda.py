"""Kimi Delta Attention (``KimiLinearDeltaAttention``, ``Glm5NextTextLinearAttention``,
``BailingHybridDeltaAttention``): the delta rule with per-key-channel decays, through the package of
``gated_deltanet`` (its helpers in ``test_gated_deltanet.py``): decompose() against the modules' forward,
the chunkwise WY form against the sequential products, variants against the naive loops, fast aggregates
against the blocks, explain().

Tiny stock configs: 3 heads of size 4, conv width 3, every parameter randomised; the modules honour left
padding. GLM-5 Next has no causal-LM class: its ``...ForConditionalGeneration`` runs on text alone.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures.gated_deltanet import delta_factors
from implicit_attention.architectures.gated_deltanet.operator import VARIANTS
from test_gated_deltanet import (
    LONG_TOL,
    TOL,
    VOCAB,
    build,
    captured,
    check_chunkwise_against_sequential,
    check_every_layer_explains,
    check_exact,
    check_fast_paths,
    check_variant_flags,
    check_variants_against_naive,
    indices,
)

from conftest import check_explanation, left_padded

_MLA = dict(kv_lora_rank=4, qk_rope_head_dim=4, v_head_dim=4, qk_nope_head_dim=4)

CONFIGS = {
    "KimiLinearForCausalLM": (tf.KimiLinearConfig, tf.KimiLinearForCausalLM, dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        layer_types=["linear_attention", "full_attention"], moe_intermediate_size=8, num_local_experts=2,
        num_experts_per_tok=1, linear_attn_config=dict(head_dim=4, num_heads=3, short_conv_kernel_size=3), **_MLA)),
    "BailingHybridForCausalLM": (tf.BailingHybridConfig, tf.BailingHybridForCausalLM, dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
        head_dim=4, short_conv_kernel_size=3, layer_types=["linear_attention", "full_attention"],
        moe_intermediate_size=8, num_local_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=2, **_MLA)),
    "Glm5NextForConditionalGeneration": (tf.Glm5NextConfig, tf.Glm5NextForConditionalGeneration, dict(
        text_config=dict(
            vocab_size=VOCAB, pad_token_id=0, hidden_size=16, intermediate_size=16, moe_intermediate_size=8,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2,
            num_experts_per_tok=1, kv_lora_rank=4, q_lora_rank=4, qk_rope_head_dim=0, v_head_dim=4,
            qk_nope_head_dim=4, index_topk=4, index_head_dim=4, index_n_heads=2, index_kpool=2,
            layer_types=["linear_attention", "indexed_attention"], mlp_layer_types=["dense", "dense"], hc_mult=2,
            linear_head_dim=4, linear_num_heads=3, linear_conv_kernel_dim=3),
        vision_config=dict(depth=1, hidden_size=8, num_heads=2, intermediate_size=8, out_hidden_size=16,
                           patch_size=2, image_size=4, projection_intermediate_size=8))),
}


def tiny(class_name: str, **kwargs):
    return build(CONFIGS, class_name, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_unified_reconstructs_module_output(class_name, dtype):
    model = tiny(class_name, dtype=dtype)
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB)
    for layer in check_exact(model, dtype, ids, mask):
        assert layer.matrix.shape == (3, 12, 7, 7) and layer.factors.log_decay.shape[-1] == 4


@pytest.mark.parametrize("class_name,overrides", [
    ("KimiLinearForCausalLM", {}),
    ("BailingHybridForCausalLM", dict(kda_safe_gate=False)),        # softplus gate instead of the bounded sigmoid
    ("Glm5NextForConditionalGeneration", dict(linear_lower_bound=None)),
])
def test_forget_gates(class_name, overrides):
    """Each class's forget gate (softplus, lower-bounded sigmoid) gives per-channel decays; 67 tokens cross the
    module's chunk of 64 (float64 model, whose float32 kernel misses the exact operator by ~1e-6 there)."""
    model = tiny(class_name, seed=1, **overrides)
    ids, mask = left_padded(batch=2, length=67, vocab=VOCAB, seed=1)
    layer = check_exact(model, torch.float64, ids, mask, LONG_TOL)[0]
    g = layer.factors.log_decay
    assert bool((g < 0).all()) and float((g - g[..., :1]).abs().max()) > 1e-3   # decays differ per key channel


@pytest.mark.parametrize("class_name", ["KimiLinearForCausalLM", "Glm5NextForConditionalGeneration"])
def test_chunkwise_attention_matches_sequential_products(class_name):
    check_chunkwise_against_sequential(tiny(class_name, seed=4))


def test_forget_gate_is_the_modules():
    model = tiny("BailingHybridForCausalLM")
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    record = captured(model, ids, mask)[0]
    f = delta_factors(record.module, record.inputs, record.attention_mask, torch.float64)
    expected = record.module.forget_gate(record.inputs * mask[..., None])
    assert torch.equal(f.log_decay, expected.float().double())


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_naive(variant):
    check_variants_against_naive(tiny("KimiLinearForCausalLM", seed=1), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_exactness_flags(variant):
    check_variant_flags(tiny("BailingHybridForCausalLM"), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_aggregates_match_the_blocks(variant):
    check_fast_paths(tiny("KimiLinearForCausalLM", seed=5), variant)


@pytest.mark.parametrize("class_name,method", [
    ("KimiLinearForCausalLM", method) for method in ("raw", "rollout", "attribution", "paper", "grad_x_input")] + [
    ("Glm5NextForConditionalGeneration", "paper")])      # its hyper-connections: the block input is 4-D
def test_explain_on_the_kda_layers(class_name, method):
    model = tiny(class_name, dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    check_explanation(model, ids, mask, method=method, layers=indices(model))


@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_hybrid_models_explain_with_all_their_layers(class_name):
    """Every registered layer kind of the hybrid (its softmax attention too) in one rollout / attribution."""
    check_every_layer_explains(tiny(class_name, dtype=torch.float32))


def test_float64_tolerance_is_the_kernels_float32():
    """The float64 error is the module's float32 kernel, not ours: well below TOL on these configs."""
    model = tiny("KimiLinearForCausalLM")
    ids, mask = left_padded(batch=2, length=9, vocab=VOCAB)
    assert max(layer.error for layer in check_exact(model, torch.float64, ids, mask)) <= TOL[torch.float64]


def test_the_default_float64_tolerance_of_a_float32_kernel_is_the_kernels(monkeypatch):
    """A float64 model's delta-rule layers are held to FLOAT32_KERNEL_TOLERANCE by default (their
    module rounds through float32), a tolerance the caller gives is kept as given."""
    from implicit_attention import decomposition
    from implicit_attention.errors import ReconstructionError

    model = tiny("KimiLinearForCausalLM", dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=9, vocab=VOCAB)
    mine_only = indices(model)
    layers = ia.decompose(model, ids, mask, layers=mine_only).layers
    error = max(layer.error for layer in layers)
    assert 1e-12 < error < decomposition.FLOAT32_KERNEL_TOLERANCE  # float32 rounding, not ours
    with pytest.raises(ReconstructionError):
        ia.decompose(model, ids, mask, layers=mine_only, tolerance=error / 2)
    # even where the float64 default is stricter than that rounding, the default check passes
    monkeypatch.setitem(decomposition.DEFAULT_TOLERANCE, torch.float64, error / 2)
    assert max(layer.error for layer in ia.decompose(model, ids, mask, layers=mine_only).layers) == pytest.approx(error)
    relevance = ia.explain(model, ids, mask, method="raw", layers=mine_only)
    assert torch.isfinite(relevance).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_attribution_per_head_matches_the_blocks(variant):
    """Kimi Delta Attention's attribution per head (per-channel decays inside A_h) equals the channel blocks."""
    from test_gated_deltanet import check_attribution_per_head

    check_attribution_per_head(tiny(next(iter(CONFIGS)), seed=2), variant)
