"""Mamba-1 mixers inside hybrids (Jamba, Zamba): decompose() against their forward, fast vs naive, explain().

The hybrids also hold attention layers, registered elsewhere: these tests select the Mamba layers
by name and never assume the total number of token-mixing layers.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import find_layers
from implicit_attention.architectures.mamba.factors import jamba_factors, zamba_factors
from implicit_attention.architectures.mamba.naive import naive_mamba
from implicit_attention.architectures.mamba.operator import VARIANTS
from implicit_attention.hooks import capture

from conftest import assert_close, check_explanation, left_padded

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
VOCAB = 40
ARCH = {"JambaForCausalLM": "jamba_mamba", "ZambaForCausalLM": "zamba_mamba"}

#: tiny stock configs; Jamba without experts (its grouped-mm experts have no float64 kernel).
CONFIGS = {
    "JambaForCausalLM": (tf.JambaConfig, tf.JambaForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        attn_layer_period=3, attn_layer_offset=1, num_experts=1, mamba_d_state=3, mamba_dt_rank=2,
        mamba_d_conv=4, mamba_proj_bias=True, mamba_conv_bias=True)),
    "ZambaForCausalLM": (tf.ZambaConfig, tf.ZambaForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=3,
        layers_block_type=["hybrid", "linear_attention", "hybrid"], num_attention_heads=2,
        num_key_value_heads=2, n_mamba_heads=2, mamba_d_state=3, mamba_dt_rank=2, mamba_d_conv=4,
        mamba_proj_bias=True, mamba_conv_bias=True)),
}


def randomise(model: torch.nn.Module) -> None:
    """Every parameter non-trivial: A_log in (-1, 1), dt biases ~ N(0, 1), constants (biases, D, norm
    weights) perturbed."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            elif "dt_proj" in name and "bias" in name:
                param.copy_(torch.randn_like(param))
            elif name.endswith(("bias", ".D")) or bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.5)


def tiny(class_name: str, *, dtype=torch.float64, seed: int = 0, **overrides):
    config_cls, model_cls, settings = CONFIGS[class_name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=VOCAB, **{**settings, **overrides}))
    randomise(model)
    return model.to(dtype).eval()


def mine(model, class_name):
    return [(name, module, arch) for name, module, arch in find_layers(model) if arch.name == ARCH[class_name]]


def indices(model, class_name):
    return [i for i, (_, _, arch) in enumerate(find_layers(model)) if arch.name == ARCH[class_name]]


def mine_of(result, model, class_name):
    names = {name for name, _, _ in mine(model, class_name)}
    return [layer for layer in result.layers if layer.name in names]


def captured(model, class_name, ids, mask):
    with torch.no_grad(), capture(model, mine(model, class_name)) as records:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return records


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(CONFIGS))
@pytest.mark.parametrize("conv_kernel,conv_bias,proj_bias", [(4, True, True), (2, False, False), (3, True, False)])
def test_unified_reconstructs_module_output(class_name, dtype, conv_kernel, conv_bias, proj_bias):
    model = tiny(class_name, dtype=dtype, mamba_d_conv=conv_kernel, mamba_conv_bias=conv_bias,
                 mamba_proj_bias=proj_bias, seed=conv_kernel)
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB, seed=conv_kernel)
    result = ia.decompose(model, ids, mask, layers=indices(model, class_name))
    layers = mine_of(result, model, class_name)
    expected = [name for name, module in model.named_modules() if type(module).__name__ in
                ("JambaMambaMixer", "ZambaMambaMixer")]
    assert [layer.name for layer in layers] == expected and len(layers) >= 1
    for layer in layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, 16, 7, 7) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0


@pytest.mark.parametrize("class_name", list(CONFIGS))
@pytest.mark.parametrize("length", [1, 9])
def test_odd_lengths_and_unbatched_input(class_name, length):
    model = tiny(class_name)
    ids = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    layers = mine_of(ia.decompose(model, ids, layers=indices(model, class_name)), model, class_name)
    assert max(layer.error for layer in layers) <= 1e-6 and layers[0].matrix.shape[-1] == length


@pytest.mark.parametrize("class_name", list(CONFIGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_exactness_flags(class_name, variant):
    model = tiny(class_name)
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    layers = mine_of(ia.decompose(model, ids, mask, variant=variant, layers=indices(model, class_name)),
                     model, class_name)
    if variant in ("unified", "no_conv"):
        assert all(layer.exact for layer in layers) and max(layer.error for layer in layers) <= 1e-6
    else:
        assert not any(layer.exact for layer in layers) and min(layer.error for layer in layers) > 1e-2


def test_zamba_mixers_each_run_once():
    """Zamba's shared transformer blocks run several times; each Mamba mixer is captured exactly once."""
    model = tiny("ZambaForCausalLM")
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    records = captured(model, "ZambaForCausalLM", ids, mask)
    assert len(records) == 3 and all(r.inputs is not None and r.output is not None for r in records)


# ------------------------------------------------------------------------------------ factors
def test_jamba_factors_match_the_module_norms():
    """dt, B and C include the weighted RMS norms exactly as the module applies them."""
    model = tiny("JambaForCausalLM")
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    record = captured(model, "JambaForCausalLM", ids, mask)[0]
    mixer = record.module
    f = jamba_factors(mixer, record.inputs, record.attention_mask, torch.float64)
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    proj = mixer.x_proj(f.ssm_input)
    assert_close(f.B, mixer.b_layernorm(proj[..., R:R + N]), 1e-7, "B")   # B rounded through float32
    assert_close(f.C, mixer.c_layernorm(proj[..., R + N:]), 1e-12, "C")
    dt = torch.nn.functional.softplus(mixer.dt_proj(mixer.dt_layernorm(proj[..., :R])))
    assert_close(f.dt, dt, 1e-7, "dt")                                      # dt bias rounded through float32
    assert not torch.allclose(mixer.b_layernorm.weight, torch.ones_like(mixer.b_layernorm.weight))


def test_zamba_heads_have_their_own_projections():
    """Per head, the module's own x_proj / dt_proj weights give that head's B, C and dt."""
    model = tiny("ZambaForCausalLM")
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    record = captured(model, "ZambaForCausalLM", ids, mask)[1]
    mixer = record.module
    heads = zamba_factors(mixer, record.inputs, record.attention_mask, torch.float64)
    assert len(heads) == 2
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    for k, f in enumerate(heads):
        proj = f.ssm_input @ mixer.x_proj_weight[k].T
        assert_close(f.C, proj[..., R + N:], 1e-12, f"C head {k}")
        dt = torch.nn.functional.softplus(proj[..., :R] @ mixer.dt_proj_weight[k].T + mixer.dt_proj_bias[k])
        assert_close(f.dt, dt, 1e-7, f"dt head {k}")
    assert not torch.allclose(heads[0].B, heads[1].B)


@pytest.mark.parametrize("class_name", list(CONFIGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_operator_matches_naive(class_name, variant):
    """The layer's blocks (across Zamba's heads, with blocks cutting a head) equal the naive loops."""
    model = tiny(class_name, seed=1)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB, seed=2)
    result = ia.decompose(model, ids, mask, variant=variant, layers=indices(model, class_name))
    layers = mine_of(result, model, class_name)
    layer = layers[-1]
    heads = getattr(layer, "heads", None) or [layer.factors]
    expected = [naive_mamba(f, variant) for f in heads]
    expected_matrix = torch.cat([m for m, _ in expected], dim=1)
    expected_offset = torch.cat([o for _, o in expected], dim=-1)
    for chunk in (16, 5):
        parts = list(layer._blocks_with_offset(chunk))
        matrix = torch.cat([block for _, block, _ in parts], dim=1)
        offset = torch.cat([o if o is not None else torch.zeros_like(layer.values[..., sl]) for sl, _, o in parts], -1)
        assert_close(matrix, expected_matrix, 1e-12, f"{variant} matrix, blocks of {chunk}")
        if torch.count_nonzero(expected_offset):
            assert_close(offset, expected_offset, 1e-12, f"{variant} offset, blocks of {chunk}")
        else:
            assert torch.count_nonzero(offset) == 0


# ------------------------------------------------------------------------------------ explain
@pytest.mark.parametrize("class_name", list(CONFIGS))
@pytest.mark.parametrize("method", ["raw", "rollout", "attribution", "paper"])
def test_explain_on_the_mamba_layers(class_name, method):
    model = tiny(class_name, dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    check_explanation(model, ids, mask, method=method, layers=indices(model, class_name))


def test_s6_attribution_folds_the_gate_into_the_gradient_per_head():
    model = tiny("ZambaForCausalLM")
    ids = torch.randint(1, VOCAB, (1, 5))
    layer = ia.decompose(model, ids, variant="s6", layers=indices(model, "ZambaForCausalLM")[:1]).layers[0]
    gate = torch.cat([f.out_gate for f in layer.heads], dim=-1)
    assert torch.equal(layer.matrix_gradient(torch.ones_like(layer.values)), gate)
    scan = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
    D = torch.cat([f.D for f in layer.heads])
    u = torch.cat([f.ssm_input for f in layer.heads], dim=-1)
    assert_close((scan + D * u) * gate, layer.output, 1e-6, "s6 + D, gated")


@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_hybrid_models_explain_with_all_their_layers(class_name):
    """Every registered layer kind of the hybrid (attention too) in one rollout / attribution."""
    model = tiny(class_name, dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) > len(mine(model, class_name)) and max(result.errors) <= 1e-4
    for method in ("rollout", "attribution"):
        check_explanation(model, ids, mask, method=method)


@pytest.mark.parametrize("class_name", list(CONFIGS))
@pytest.mark.parametrize("variant", ["unified", "s6", "no_gate"])
def test_fast_aggregates_match_the_blocks(class_name, variant):
    """The factorised signed mean and the row aggregates equal what the full matrices give."""
    model = tiny(class_name, seed=3)
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    result = ia.decompose(model, ids, mask, variant=variant, layers=indices(model, class_name))
    for layer in mine_of(result, model, class_name):
        full = layer.matrix
        assert_close(layer.aggregate("mean"), full.mean(dim=1), 1e-10, f"{variant} signed mean")
        for how, reduce in (("mean", lambda t: t), ("abs", torch.abs), ("pos", lambda t: t.clamp(min=0))):
            layer._aggregates.clear()
            expected = reduce(full[:, :, [0, 4, 6]]).mean(dim=1)
            assert_close(layer.aggregate_rows([0, 4, -1], how), expected, 1e-12, f"{variant} {how} rows")


@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_tile_reductions_equal_the_blocks(class_name):
    """|A|, relu(A) and the attribution of the hybrids' mixers (Zamba's heads side by side) from the
    per-channel tiles equal the generic channel blocks."""
    model = tiny(class_name)
    ids, mask = left_padded(batch=2, length=23, vocab=VOCAB)
    layers = mine_of(ia.decompose(model, ids, mask, layers=indices(model, class_name)), model, class_name)
    for layer in layers:
        for how in ("abs", "pos"):
            assert_close(layer.aggregate(how), layer.aggregate_by_blocks(how), 1e-12, how)
        grad = torch.randn(layer.output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        assert_close(layer.attribution(grad), layer.attribution_by_blocks(layer.matrix_gradient(grad)), 1e-12, "cam")


@pytest.mark.parametrize("class_name", sorted(CONFIGS))
def test_row_check_recurrence_equals_the_rows(class_name):
    """The exactness check's recurrence between sampled rows (Zamba: head by head) equals the explicit rows of
    every channel's matrix contracted with the values, and checks the module as exactly as the full check."""
    from implicit_attention.architectures.base import LayerDecomposition

    model = tiny(class_name)
    ids, mask = left_padded(batch=2, length=30, vocab=VOCAB)
    for layer in mine_of(ia.decompose(model, ids, mask), model, class_name):
        rows = torch.tensor([0, 9, 29])
        assert_close(layer._row_outputs(rows), LayerDecomposition._row_outputs(layer, rows), 1e-12, class_name)
        full = layer.error
        assert layer.measure_error(max_entries=0) < TOL[torch.float64] and full < TOL[torch.float64]
        assert layer.error_rows == 8
