"""Mamba-2 family: decompose() against the real mixers' forward, fast operator against the naive loops, explain().

Classes: Mamba2 (``Mamba2Mixer``), Bamba, Zamba2, NemotronH, GraniteMoeHybrid, FalconH1 (its Mamba-2
mixers). Hybrid models also hold attention layers, registered elsewhere: these tests select the
Mamba-2 layers by name and never assume the total number of token-mixing layers.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import find_layers
from implicit_attention.architectures.mamba2 import Mamba2LayerDecomposition, mamba2_factors
from implicit_attention.architectures.mamba2.naive import naive_mamba2, naive_scan
from implicit_attention.architectures.mamba2.operator import VARIANTS, mamba2_block, signed_mean, ssd_output
from implicit_attention.architectures.primitives import naive_conv_matrix
from implicit_attention.hooks import capture

from conftest import assert_attribution_matches_blocks, assert_close, check_explanation, gradient_at, left_padded

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
VOCAB = 40

#: tiny stock configs: hidden 8, 4 heads of 4 channels in 2 groups, state 3, chunks of 4 tokens (so
#: the module's inter-chunk path runs for L > 4), biases on.
CONFIGS = {
    "Mamba2ForCausalLM": (tf.Mamba2Config, tf.Mamba2ForCausalLM, dict(
        hidden_size=8, num_heads=4, head_dim=4, state_size=3, n_groups=2, num_hidden_layers=2, expand=2,
        conv_kernel=4, chunk_size=4, use_bias=True, use_conv_bias=True)),
    "BambaForCausalLM": (tf.BambaConfig, tf.BambaForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=4, mamba_n_groups=2, mamba_d_state=3,
        mamba_chunk_size=4, mamba_proj_bias=True)),
    "Zamba2ForCausalLM": (tf.Zamba2Config, tf.Zamba2ForCausalLM, dict(
        hidden_size=8, num_hidden_layers=2, layers_block_type=["linear_attention", "hybrid"], mamba_d_state=3,
        n_mamba_heads=4, mamba_ngroups=2, chunk_size=4, num_attention_heads=2, intermediate_size=16,
        add_bias_linear=True)),
    "NemotronHForCausalLM": (tf.NemotronHConfig, tf.NemotronHForCausalLM, dict(
        hidden_size=8, layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16, ssm_state_size=3,
        mamba_num_heads=4, mamba_head_dim=4, n_groups=2, chunk_size=4, use_bias=True)),
    "GraniteMoeHybridForCausalLM": (tf.GraniteMoeHybridConfig, tf.GraniteMoeHybridForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        layer_types=["linear_attention", "full_attention", "linear_attention"], mamba_n_heads=4, mamba_n_groups=2,
        mamba_d_state=3, mamba_chunk_size=4, num_local_experts=0, shared_intermediate_size=16,
        mamba_proj_bias=True)),
    "FalconH1ForCausalLM": (tf.FalconH1Config, tf.FalconH1ForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        mamba_d_ssm=16, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=3, mamba_chunk_size=4,
        mamba_rms_norm=True, mamba_norm_before_gate=False, ssm_multipliers=[0.7, 1.3, 0.9, 1.1, 0.8],
        ssm_in_multiplier=1.2, mamba_proj_bias=True)),
}


def randomise(model: torch.nn.Module) -> None:
    """Every parameter non-trivial: A_log in (-1, 1), dt_bias ~ N(0, 1) (so that dt ~ 0.1..2 and the
    decays matter), and constants (biases, D, norm weights) perturbed."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            elif name.endswith("dt_bias"):
                param.copy_(torch.randn_like(param))
            elif name.endswith(("bias", ".D")) or param.numel() == 1 or bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.5)


def tiny(class_name: str, *, dtype=torch.float64, seed: int = 0, **overrides):
    config_cls, model_cls, settings = CONFIGS[class_name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=VOCAB, **{**settings, **overrides}))
    randomise(model)
    return model.to(dtype).eval()


def mixer_names(model) -> list[str]:
    return [name for name, _, arch in find_layers(model) if arch.name == "mamba2"]


def decompose_mine(model, *args, **kwargs):
    """decompose() restricted to the Mamba-2 layers (a hybrid's attention layers are tested elsewhere)."""
    indices = [i for i, (_, _, arch) in enumerate(find_layers(model)) if arch.name == "mamba2"]
    return ia.decompose(model, *args, layers=indices, **kwargs)


def mamba2_layers(result) -> list[Mamba2LayerDecomposition]:
    return [layer for layer in result.layers if isinstance(layer, Mamba2LayerDecomposition)]


def captured_factors(model, ids, mask, dtype=torch.float64):
    targets = [t for t in find_layers(model) if t[2].name == "mamba2"]
    with torch.no_grad(), capture(model, targets) as captured:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return [(r, mamba2_factors(r.module, r.inputs, r.attention_mask, dtype)) for r in captured]


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_unified_reconstructs_module_output(class_name, dtype):
    model = tiny(class_name, dtype=dtype)
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB)
    result = decompose_mine(model, ids, mask)
    layers = mamba2_layers(result)
    assert [layer.name for layer in layers] == mixer_names(model) and len(layers) >= 1
    for layer in layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        mixer = model.get_submodule(layer.name)
        assert layer.matrix.shape == (3, mixer.intermediate_size, 7, 7) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0


@pytest.mark.parametrize("norm", ["gate_then_norm", "norm_then_gate", "no_norm"])
def test_falcon_h1_norm_placements(norm):
    """FalconH1's gated norm is optional and may normalise before the gate: each is mirrored exactly."""
    model = tiny("FalconH1ForCausalLM", mamba_rms_norm=norm != "no_norm",
                 mamba_norm_before_gate=norm == "norm_then_gate", seed=3)
    ids, mask = left_padded(batch=2, length=9, vocab=VOCAB, seed=3)
    layers = mamba2_layers(decompose_mine(model, ids, mask))
    assert len(layers) == 2 and max(layer.error for layer in layers) <= 1e-6
    if norm == "no_norm":
        assert all(layer.factors.norm_scale is None for layer in layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("conv_kernel,use_conv_bias,use_bias,n_groups", [
    (2, False, False, 1), (3, True, False, 4), (4, False, True, 2), (5, True, True, 1)])
def test_mamba2_configurations(dtype, conv_kernel, use_conv_bias, use_bias, n_groups):
    model = tiny("Mamba2ForCausalLM", dtype=dtype, conv_kernel=conv_kernel, use_conv_bias=use_conv_bias,
                 use_bias=use_bias, n_groups=n_groups, seed=conv_kernel)
    ids, mask = left_padded(batch=3, length=9, vocab=VOCAB, seed=conv_kernel)
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) == 2 and max(result.errors) <= TOL[dtype]


def test_time_step_limit_clamp_is_mirrored():
    """A ``time_step_limit`` that actually clips dt (both ends) is a data-controlled constant too."""
    model = tiny("Mamba2ForCausalLM", time_step_limit=(0.4, 0.9), seed=5)
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB, seed=5)
    layer = ia.decompose(model, ids, mask).layers[0]
    dt = layer.factors.dt
    assert layer.error <= 1e-6 and bool((dt == 0.4).any()) and bool((dt == 0.9).any())


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_odd_lengths_and_unbatched_input(length):
    model = tiny("Mamba2ForCausalLM")
    ids = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    result = ia.decompose(model, ids)
    assert max(result.errors) <= 1e-6 and result.layers[0].matrix.shape[-1] == length


def test_padding_does_not_change_real_tokens_matrices():
    """Without an in_proj bias, a left-padded row gives the same matrices on its real tokens as alone.

    (First layer only: the module's float32 scan makes later layers' inputs differ by float32 roundings.)
    """
    model = tiny("Mamba2ForCausalLM", use_bias=False)
    ids, mask = left_padded(batch=3, length=8, vocab=VOCAB)
    batched = ia.decompose(model, ids, mask).layers[0]
    alone = ia.decompose(model, ids[2:, 2:]).layers[0]
    assert torch.all(batched.values[2, :2] == 0)
    assert_close(batched.matrix[2, :, 2:, 2:], alone.matrix[0], 1e-10, "padded vs unpadded")


def test_float32_model_decomposed_in_float64():
    model = tiny("BambaForCausalLM", dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    layer = mamba2_layers(decompose_mine(model, ids, mask, dtype=torch.float64))[0]
    assert layer.matrix.dtype == torch.float64 and layer.error <= 1e-5


# ------------------------------------------------------------------------------------ variants
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_exactness_flags(variant):
    model = tiny("Mamba2ForCausalLM")
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    result = ia.decompose(model, ids, mask, variant=variant)
    if variant in ("unified", "no_conv"):
        assert all(layer.exact for layer in result.layers) and max(result.errors) <= 1e-6
    else:  # ablations leave a factor out: flagged inexact, their error measured, not raised
        assert not any(layer.exact for layer in result.layers) and min(result.errors) > 1e-2


def test_ssd_variant_is_the_scan():
    """S_h alone times u, plus D u, times the gated-norm factor, is the module's output."""
    model = tiny("NemotronHForCausalLM")
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    for layer in mamba2_layers(decompose_mine(model, ids, mask, variant="ssd")):
        f = layer.factors
        scan = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
        D = f.D.repeat_interleave(f.head_dim)
        assert_close((scan + D * f.ssm_input) * f.out_gate, layer.output, 1e-6, "ssd + D, gated norm")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("class_name,overrides", [
    ("Mamba2ForCausalLM", dict(conv_kernel=3, n_groups=2)),
    ("Mamba2ForCausalLM", dict(conv_kernel=4, n_groups=1, use_conv_bias=False)),
    ("FalconH1ForCausalLM", dict(mamba_norm_before_gate=True)),
])
def test_fast_operator_matches_naive(variant, class_name, overrides):
    model = tiny(class_name, seed=1, **overrides)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB, seed=2)
    for _, f in captured_factors(model, ids, mask)[:1]:
        expected_matrix, expected_offset = naive_mamba2(f, variant)
        matrix, offset = mamba2_block(f, slice(0, f.x.shape[-1]), variant)
        assert_close(matrix, expected_matrix, 1e-12, f"{variant} matrix")
        if offset is None:
            assert torch.count_nonzero(expected_offset) == 0
        else:
            assert_close(offset, expected_offset, 1e-12, f"{variant} offset")


def test_channel_blocks_agree_with_one_block():
    """Blocks that cut heads in the middle give the same matrices and offsets as one block."""
    model = tiny("Mamba2ForCausalLM")
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    f = captured_factors(model, ids, mask)[0][1]
    whole, whole_offset = mamba2_block(f, slice(0, 16), "unified")
    parts = [mamba2_block(f, slice(s, min(s + 3, 16)), "unified") for s in range(0, 16, 3)]
    assert torch.equal(whole, torch.cat([m for m, _ in parts], dim=1))
    assert torch.equal(whole_offset, torch.cat([o for _, o in parts], dim=-1))


# ------------------------------------------------------------------------------------ factors
def test_scan_output_is_the_recurrence_and_the_modules_norm_input():
    """(S + D) u equals the token-by-token recurrence and the input the module's gated norm received."""
    model = tiny("Zamba2ForCausalLM")
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    norm_inputs = {}
    handles = [model.get_submodule(name).norm.register_forward_pre_hook(
        lambda module, args, name=name: norm_inputs.__setitem__(name, args[0].detach()))
        for name in mixer_names(model)]
    try:
        factors = captured_factors(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    for record, f in factors:
        y = ssd_output(f)
        assert_close(y, naive_scan(f), 1e-12, "matrix form vs recurrence")
        assert_close(y, ssd_output(f, heads_per_block=3), 1e-14, "head blocks")
        # the module's chunked scan runs in float32 whatever the model dtype
        assert_close(y, norm_inputs[record.name].to(y.dtype), 1e-6, "vs the module's scan")


def test_conv_matrix_is_pytorch_conv1d():
    model = tiny("Mamba2ForCausalLM")
    ids = torch.randint(1, VOCAB, (1, 7))
    f = captured_factors(model, ids, None)[0][1]
    for d in (0, 5, 15):
        M = naive_conv_matrix(f.conv_weight, d, f.x.shape[1])
        assert_close(M @ f.x[0, :, d] + f.conv_bias[d], f.conv_out[0, :, d], 1e-12, "conv")


def test_norm_scale_is_the_modules_gated_norm():
    """w * r(group) * silu(z) * y is what the module's own norm returns on (y, z)."""
    model = tiny("GraniteMoeHybridForCausalLM")
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    for record, f in captured_factors(model, ids, mask):
        y = ssd_output(f)
        assert_close(f.out_gate * y, record.module.norm(y, f.z), 1e-6, "gated norm")


# ------------------------------------------------------------------------------------ explain
@pytest.mark.parametrize("method", ia.METHODS)
@pytest.mark.parametrize("variant", ["unified", "ssd"])
def test_explain_every_method_on_mamba2(method, variant):
    model = tiny("Mamba2ForCausalLM", dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)


def test_attribution_uses_the_true_gradient_of_the_layer_output():
    """One layer: relevance = (R - I)[row] = cam[row], cam from an independently computed gradient."""
    model = tiny("Mamba2ForCausalLM", num_hidden_layers=1)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    expl = ia.run_explanation(model, ids, method="attribution")
    layer = expl.decomposition.layers[0]
    grad = gradient_at(model.backbone.layers[0].mixer.out_proj, layer.output, model, ids, expl.target.ids[0])
    cam = (grad.transpose(1, 2)[..., None] * layer.matrix
           * layer.values.transpose(1, 2)[:, :, None, :]).clamp(min=0).mean(1)
    assert_close(expl.relevance[0], cam[0, -1], 1e-9, "attribution")


@pytest.mark.parametrize("variant", ["ssd", "no_gate"])
def test_ablations_fold_the_left_out_output_factor_into_the_gradient(variant):
    model = tiny("Mamba2ForCausalLM", num_hidden_layers=1)
    ids = torch.randint(1, VOCAB, (1, 5))
    layer = ia.decompose(model, ids, variant=variant).layers[0]
    f = layer.factors
    expected = f.out_gate if variant == "ssd" else f.gate
    assert torch.equal(layer.matrix_gradient(torch.ones_like(layer.values)), expected)
    # the gradient of out = factor * (matrix v + offset) with respect to the matrix output
    rebuilt = (torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
               + (layer.offset if variant == "no_gate" else f.D.repeat_interleave(f.head_dim) * f.ssm_input)) * expected
    assert_close(rebuilt, layer.output, 1e-6, variant)


@pytest.mark.parametrize("class_name", [name for name in CONFIGS if name != "Mamba2ForCausalLM"])
def test_hybrid_models_explain_with_all_their_layers(class_name):
    """Every registered layer kind of a hybrid (attention too) in one rollout / attribution."""
    model = tiny(class_name, dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) > len(mixer_names(model)) and max(result.errors) <= 1e-4
    for method in ("rollout", "attribution"):
        check_explanation(model, ids, mask, method=method)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_match_the_blocks(variant):
    """aggregate_rows (O(R L E), from the rows alone) equals the rows of the block-built aggregates."""
    model = tiny("FalconH1ForCausalLM", seed=2)
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    for layer in mamba2_layers(decompose_mine(model, ids, mask, variant=variant)):
        full = layer.matrix
        for rows in ([6], [0, 3, -1]):
            index = torch.tensor(rows) % 7
            for how, reduce in (("mean", lambda t: t), ("abs", torch.abs), ("pos", lambda t: t.clamp(min=0))):
                expected = reduce(full[:, :, index]).mean(dim=1)
                assert_close(layer.aggregate_rows(rows, how), expected, 1e-12, f"{variant} {how} rows {rows}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("class_name,overrides", [("Mamba2ForCausalLM", dict(conv_kernel=3)),
                                                  ("FalconH1ForCausalLM", dict(mamba_rms_norm=False))])
def test_factorised_signed_mean_matches_the_blocks(variant, class_name, overrides):
    model = tiny(class_name, seed=4, **overrides)
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    for layer in mamba2_layers(decompose_mine(model, ids, mask, variant=variant)):
        expected = layer.matrix.mean(dim=1)
        assert_close(layer.aggregate("mean"), expected, 1e-12, f"{variant} signed mean")
        assert_close(signed_mean(layer.factors, variant, heads_per_block=3), expected, 1e-12, "head blocks")


@pytest.mark.parametrize("class_name,groups", [("Mamba2ForCausalLM", {"n_groups": 1}),
                                               ("Mamba2ForCausalLM", {"n_groups": 2}),
                                               ("FalconH1ForCausalLM", {}), ("NemotronHForCausalLM", {})])
@pytest.mark.parametrize("variant", ["unified", "ssd", "no_conv", "no_gate", "no_act"])
def test_per_head_reductions_equal_the_channel_blocks(class_name, groups, variant):
    """|A|, relu(A) and attribution (clamped, signed), each head's S'_h built once and its channels' conv taps
    accumulated in place, equal the channel blocks (FalconH1's norm before or after the gate, grouped B, C)."""
    model = tiny(class_name, **groups)
    ids, mask = left_padded(batch=2, length=13, vocab=VOCAB)
    for layer in mamba2_layers(decompose_mine(model, ids, mask, variant=variant)):
        for how in ("abs", "pos"):
            assert_close(layer._per_head(how), layer.aggregate_by_blocks(how), 1e-12, f"{variant} {how}")
        assert_attribution_matches_blocks(layer, variant)
