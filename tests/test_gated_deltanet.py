"""Gated DeltaNet mixers: decompose() against the real mixers' forward, the chunkwise WY form against the
sequential products, every variant against the naive loops, fast aggregates against the blocks, explain().

Classes: ``Qwen3NextGatedDeltaNet``, ``Qwen3_5GatedDeltaNet``, ``Qwen3_5MoeGatedDeltaNet``,
``LaraMiniGatedDeltaNet``, ``Qwen4ExpTextGatedDeltaNet`` (architecture ``gated_deltanet``) and
``OlmoHybridGatedDeltaNet`` (``olmo_gated_deltanet``). The Kimi Delta Attention classes share the
package; their tests (``test_kda.py``) reuse the helpers here. The hybrids' attention layers are
registered elsewhere: these tests select the delta-rule layers by architecture name.

Tiny stock configs: 2 key heads repeated to 4 value heads (``Dk = 4``, ``Dv = 3``), conv width 3,
every parameter randomised. The modules honour left padding (their input is zeroed on padding and
every projection is bias-free), so the exactness tests run left-padded batches of odd length.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import find_layers
from implicit_attention.architectures.gated_deltanet import delta_factors
from implicit_attention.architectures.gated_deltanet.naive import naive_delta, naive_delta_attention, naive_recurrence
from implicit_attention.architectures.gated_deltanet.operator import VARIANTS, delta_attention, delta_block, signed_mean
from implicit_attention.hooks import capture

from conftest import assert_attribution_matches_blocks, assert_close, check_explanation, fresh_aggregates, left_padded

#: float32: the module's own float32 kernel against ours; float64: the module still runs its recurrence
#: and gated norm in float32 whatever its dtype (measured ~1e-7 on 7 tokens)
TOL = {torch.float32: 1e-5, torch.float64: 1e-6}
#: float64 on 67 tokens (two of the module's chunks): its float32 kernel alone misses by up to ~1e-6
LONG_TOL = 5e-6
VOCAB = 40
MINE = ("gated_deltanet", "olmo_gated_deltanet", "kda")
_IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, experts_implementation="eager")
_GDN = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=3, linear_key_head_dim=4,
            linear_value_head_dim=3, linear_num_key_heads=2, linear_num_value_heads=4)
_MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=8)

CONFIGS = {
    "Qwen3NextForCausalLM": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM, dict(
        _GDN, head_dim=8, intermediate_size=16, num_experts=0, moe_intermediate_size=8,
        shared_expert_intermediate_size=8)),
    "Qwen3_5ForCausalLM": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM, dict(_GDN, head_dim=8, intermediate_size=16)),
    "Qwen3_5MoeForCausalLM": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM, dict(_GDN, head_dim=8, **_MOE)),
    "OlmoHybridForCausalLM": (tf.OlmoHybridConfig, tf.OlmoHybridForCausalLM, dict(_GDN, intermediate_size=16)),
    "LaraMiniForCausalLM": (tf.LaraMiniConfig, tf.LaraMiniForCausalLM, dict(_GDN, head_dim=8, **_MOE)),
    "Qwen4ExpForCausalLM": (tf.Qwen4ExpTextConfig, tf.Qwen4ExpForCausalLM, dict(
        _GDN, head_dim=8, hc_count=2, hc_lowrank=4, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
        indexer_budget=4, indexer_compress_ratio=2, **_MOE)),
}


def randomise(model: torch.nn.Module) -> None:
    """Every parameter non-trivial: A_log in (-1, 1), dt_bias ~ N(0, 1), gated-norm weights around 1,
    conv taps ~ N(0, 0.5) (the rest keeps its random initialisation)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            elif name.endswith("dt_bias"):
                param.copy_(torch.randn_like(param))
            elif "conv1d" in name:
                param.copy_(torch.randn_like(param) * 0.5)
            elif name.endswith("weight") and bool((param == param.flatten()[0]).all()):  # norms
                param.copy_(1 + 0.5 * torch.randn_like(param))


def build(configs: dict, class_name: str, *, dtype=torch.float64, seed: int = 0, **overrides):
    config_cls, model_cls, settings = configs[class_name]
    torch.manual_seed(seed)
    if "text_config" in settings:                     # a multimodal config: the overrides go to its text part
        settings = dict(settings, text_config={**settings["text_config"], **overrides})
        config = config_cls(**settings)
    else:
        config = config_cls(**_IDS, **{**settings, **overrides})
    model = model_cls(config).double()
    randomise(model)
    return model.to(dtype).eval()


def tiny(class_name: str, **kwargs):
    return build(CONFIGS, class_name, **kwargs)


def indices(model) -> list[int]:
    return [i for i, (_, _, arch) in enumerate(find_layers(model)) if arch.name in MINE]


def mine(model):
    return [t for t in find_layers(model) if t[2].name in MINE]


def decompose_mine(model, *args, **kwargs):
    """decompose() restricted to the delta-rule layers (a hybrid's attention layers are tested elsewhere)."""
    return ia.decompose(model, *args, layers=indices(model), **kwargs)


def captured(model, ids, mask=None):
    with torch.no_grad(), capture(model, mine(model)) as records:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return records


def check_exact(model, dtype, ids, mask, tol=None):
    """Every delta-rule layer of ``model`` rebuilt from its matrices, within the float tolerance."""
    tol = tol or TOL[dtype]
    layers = decompose_mine(model, ids, mask, tolerance=tol).layers
    assert [layer.name for layer in layers] == [name for name, _, _ in mine(model)] and layers
    for layer in layers:
        assert layer.exact and layer.error <= tol, (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
        assert_close(rebuilt if layer.offset is None else rebuilt + layer.offset, layer.output, tol, layer.name)
        assert layer.matrix.dtype == dtype and layer.matrix.shape[-1] == ids.shape[-1]
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
    return layers


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_unified_reconstructs_module_output(class_name, dtype):
    model = tiny(class_name, dtype=dtype)
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB)
    for layer in check_exact(model, dtype, ids, mask):
        mixer = model.get_submodule(layer.name)
        assert layer.matrix.shape == (3, mixer.value_dim, 7, 7)


@pytest.mark.parametrize("class_name", ["Qwen3NextForCausalLM", "OlmoHybridForCausalLM"])
def test_longer_than_the_modules_chunk(class_name):
    """67 tokens: the module's own chunked kernel (chunks of 64) and ours both cross a chunk boundary."""
    model = tiny(class_name, seed=1)
    ids, mask = left_padded(batch=2, length=67, vocab=VOCAB, seed=1)
    check_exact(model, torch.float64, ids, mask, LONG_TOL)


def test_qwen4_sigmoid_output_gate_and_single_token():
    model = tiny("Qwen4ExpForCausalLM", output_gate_type="sigmoid", seed=2)
    assert model.model.layers[0].linear_attn.norm.activation == "sigmoid"
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB, seed=2)
    check_exact(model, torch.float64, ids, mask)
    check_exact(model, torch.float64, ids[:1, :1], None)


def test_conv_bias_goes_to_the_offset():
    """The stock convs have no bias; one added by hand is mirrored (q, k and values) and lands in the offset."""
    model = tiny("Qwen3_5ForCausalLM", seed=3)
    conv = model.model.layers[0].linear_attn.conv1d
    conv.bias = torch.nn.Parameter(torch.randn(conv.out_channels, dtype=torch.float64) * 0.5)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    layer = check_exact(model, torch.float64, ids, None)[0]
    assert layer.offset is not None and float(layer.offset.abs().max()) > 1e-3
    assert ia.architectures.registry.padding_leaks(model) == ["model.layers.0.linear_attn"]


def test_padding_does_not_change_real_tokens_matrices():
    """A left-padded row gives the matrices of its real tokens alone (up to the float32 roundings of the norm
    scale, read from the module's float32 kernel output, which change with the batch)."""
    model = tiny("Qwen3_5ForCausalLM")
    ids, mask = left_padded(batch=3, length=8, vocab=VOCAB)
    batched = decompose_mine(model, ids, mask).layers[0]
    alone = decompose_mine(model, ids[2:, 2:]).layers[0]
    assert torch.all(batched.values[2, :2] == 0)
    assert_close(batched.matrix[2, :, 2:, 2:], alone.matrix[0], 1e-6, "padded vs unpadded")


def test_float32_model_decomposed_in_float64():
    model = tiny("Qwen3NextForCausalLM", dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    layer = decompose_mine(model, ids, mask, dtype=torch.float64).layers[0]
    assert layer.matrix.dtype == torch.float64 and layer.error <= 1e-5


# ------------------------------------------------------------------------------------ the delta rule
def check_chunkwise_against_sequential(model, length=9, seed=4):
    """``A_h`` in WY form (several chunk sizes) = explicit transition products; ``A_h u`` = the token-by-token
    recurrence = what the module's own kernel fed its gated norm (float32)."""
    ids, mask = left_padded(batch=2, length=length, vocab=VOCAB, seed=seed)
    for record in captured(model, ids, mask):
        f = delta_factors(record.module, record.inputs, record.attention_mask, torch.float64)
        expected = naive_delta_attention(f)
        for chunk in (1, 3, 4, 64):
            assert_close(delta_attention(f.q, f.k, f.beta, f.log_decay, chunk), expected, 1e-12, f"chunks of {chunk}")
        u = f.u.unflatten(-1, (f.num_heads, f.head_v))
        core = torch.einsum("bhij,bjhp->bihp", f.attention, u)
        assert_close(core, naive_recurrence(f, u), 1e-12, "A u vs the recurrence")
        module_core = record.extra["core"].reshape(core.shape).to(core.dtype)
        assert_close(core, module_core, 1e-6, "A u vs the module's kernel")
        with_core = delta_factors(record.module, record.inputs, record.attention_mask, torch.float64,
                                  core=record.extra["core"])
        assert_close(with_core.norm_scale, f.norm_scale, 1e-6, "norm scale: captured vs recomputed")


@pytest.mark.parametrize("class_name", ["Qwen3NextForCausalLM", "OlmoHybridForCausalLM"])
def test_chunkwise_attention_matches_sequential_products(class_name):
    check_chunkwise_against_sequential(tiny(class_name, seed=4))


def test_olmo_negative_eigenvalues_double_beta():
    model = tiny("OlmoHybridForCausalLM", linear_allow_neg_eigval=True)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    record = captured(model, ids, mask)[0]
    f = delta_factors(record.module, record.inputs, record.attention_mask, torch.float64)
    b = torch.sigmoid(record.module.b_proj(record.inputs * mask[..., None]))
    assert_close(f.beta, 2 * b, 1e-7, "beta = 2 sigmoid(b)")
    assert bool((f.beta > 1).any())


# ------------------------------------------------------------------------------------ variants
def check_variants_against_naive(model, variant, length=6, seed=2):
    ids, mask = left_padded(batch=2, length=length, vocab=VOCAB, seed=seed)
    record = captured(model, ids, mask)[0]
    f = delta_factors(record.module, record.inputs, record.attention_mask, torch.float64, core=record.extra["core"])
    expected_matrix, expected_offset = naive_delta(f, variant)
    channels = f.x.shape[-1]
    for step in (channels, 5):                               # blocks of 5 channels cut heads of 3
        parts = [delta_block(f, slice(s, min(s + step, channels)), variant) for s in range(0, channels, step)]
        assert_close(torch.cat([m for m, _ in parts], dim=1), expected_matrix, 1e-12, f"{variant} blocks of {step}")
        if parts[0][1] is None:
            assert torch.count_nonzero(expected_offset) == 0
        else:
            assert_close(torch.cat([o for _, o in parts], dim=-1), expected_offset, 1e-12, f"{variant} offset")


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_naive(variant):
    check_variants_against_naive(tiny("Qwen3NextForCausalLM", seed=1), variant)


def check_variant_flags(model, variant):
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    layers = decompose_mine(model, ids, mask, variant=variant).layers
    if variant in ("unified", "no_conv"):
        assert all(layer.exact for layer in layers) and max(layer.error for layer in layers) <= 1e-6
    else:  # ablations leave a factor out: flagged inexact, their error measured, not raised
        assert not any(layer.exact for layer in layers) and min(layer.error for layer in layers) > 1e-2
    if variant in ("delta", "no_gate"):      # the gradient at the matrix output puts the dropped factor back
        for layer in layers:
            factor = layer.matrix_gradient(torch.ones_like(layer.values))
            rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
            assert_close(factor * rebuilt, layer.output, 1e-6, f"{variant}: factor * matrix values")


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_exactness_flags(variant):
    check_variant_flags(tiny("Qwen3_5ForCausalLM"), variant)


# ------------------------------------------------------------------------------------ aggregates
def check_fast_paths(model, variant):
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB, seed=5)
    for layer in decompose_mine(model, ids, mask, variant=variant).layers:
        assert_close(signed_mean(layer.factors, variant, heads_per_block=3), layer.aggregate_by_blocks("mean"),
                     1e-12, f"{variant} signed mean by head blocks")
        for how in ("mean", "abs", "pos"):
            generic, fast = fresh_aggregates(layer, how)
            assert_close(fast, generic, 1e-12, f"{variant} {how}")
            generic, fast = fresh_aggregates(layer, how, rows=[0, 4, -1])
            assert_close(fast, generic, 1e-12, f"{variant} {how} rows")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_aggregates_match_the_blocks(variant):
    check_fast_paths(tiny("Qwen4ExpForCausalLM", seed=5), variant)


# ------------------------------------------------------------------------------------ explain
@pytest.mark.parametrize("method", ["raw", "rollout", "attribution", "paper", "grad_x_input"])
def test_explain_on_the_delta_rule_layers(method):
    model = tiny("Qwen3NextForCausalLM", dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    check_explanation(model, ids, mask, method=method, layers=indices(model))


@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_hybrid_models_explain_with_all_their_layers(class_name):
    """Every registered layer kind of the hybrid (its softmax attention too) in one rollout / attribution."""
    check_every_layer_explains(tiny(class_name, dtype=torch.float32))


def check_every_layer_explains(model) -> None:
    """All of a hybrid's layers (its softmax attention too) decompose and explain in one call."""
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) > len(mine(model)) and max(result.errors) <= 1e-4
    for method in ("rollout", "attribution"):
        check_explanation(model, ids, mask, method=method)


def test_base_model_class_and_memory_estimate():
    """The bare ``...Model`` decomposes like the causal LM; the memory estimate counts the per-head matrices."""
    from implicit_attention.memory import estimate

    config_cls, _, settings = CONFIGS["Qwen3NextForCausalLM"]
    torch.manual_seed(0)
    model = tf.Qwen3NextModel(config_cls(**_IDS, **settings)).double().eval()
    randomise(model)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    layers = decompose_mine(model, ids, mask).layers
    assert len(layers) == 1 and layers[0].error <= 1e-6
    selected = [(name, module, arch, torch.device("cpu")) for name, module, arch in mine(model)]
    small, large = (sum(e.total for e in estimate(selected, 2, length, torch.float64).values()) for length in (64, 128))
    assert 0 < small < large


def check_attribution_per_head(model, variant):
    """Attribution (clamped, signed) from each head's A_h with its channels' gate, taps and row scale accumulated
    in place equals the rule on the channel blocks."""
    ids, mask = left_padded(batch=2, length=9, vocab=VOCAB, seed=3)
    layers = decompose_mine(model, ids, mask, variant=variant).layers
    assert layers
    for layer in layers:
        assert_attribution_matches_blocks(layer, variant, fast_path=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("class_name", ["Qwen4ExpForCausalLM", "Qwen3NextForCausalLM"])
def test_attribution_per_head_matches_the_blocks(class_name, variant):
    check_attribution_per_head(tiny(class_name, seed=2), variant)
