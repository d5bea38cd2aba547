"""decompose() against the real module's forward on tiny random stock transformers models."""

from __future__ import annotations

import pytest
import torch

import implicit_attention as ia
from implicit_attention.architectures.mamba import mamba_factors
from implicit_attention.hooks import capture, select_layers

from conftest import MAMBA_CLASSES, assert_close, left_padded, tiny_mamba

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(MAMBA_CLASSES))
@pytest.mark.parametrize("conv_kernel", [2, 3, 4, 5])
@pytest.mark.parametrize("use_conv_bias", [True, False], ids=["convbias", "noconvbias"])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
def test_unified_reconstructs_module_output(dtype, class_name, conv_kernel, use_conv_bias, use_bias):
    model = tiny_mamba(class_name, dtype=dtype, conv_kernel=conv_kernel, use_conv_bias=use_conv_bias,
                       use_bias=use_bias, seed=conv_kernel)
    ids, mask = left_padded(batch=3, length=7, seed=conv_kernel)
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) == 2
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, model.config.intermediate_size, 7, 7)
        assert layer.matrix.dtype == dtype


@pytest.mark.parametrize("length", [1, 2, 5, 9, 13])
def test_odd_lengths_and_unbatched_input(length):
    model = tiny_mamba(dtype=torch.float64)
    ids = torch.randint(0, 40, (length,))
    result = ia.decompose(model, ids)
    assert all(e <= 1e-6 for e in result.errors)
    assert result.layers[0].matrix.shape[-1] == length


def test_matrices_are_causal_and_padding_columns_carry_nothing():
    model = tiny_mamba(dtype=torch.float64, use_bias=False)
    ids, mask = left_padded(batch=3, length=8)
    result = ia.decompose(model, ids, mask)
    for layer in result.layers:
        A = layer.matrix
        assert torch.count_nonzero(torch.triu(A, diagonal=1)) == 0
        # without an in_proj bias the values of padding tokens are exactly zero
        assert torch.all(layer.values[2, :2] == 0)


def test_padding_does_not_change_real_tokens_matrices():
    """The same sentence alone and left-padded in a batch gives the same matrix on its real tokens."""
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=3, length=8)
    batched = ia.decompose(model, ids, mask).layers[0].matrix[2, :, 2:, 2:]
    alone = ia.decompose(model, ids[2:, 2:]).layers[0].matrix[0]
    assert_close(batched, alone, 1e-10, "padded vs unpadded")


def test_float32_model_decomposed_in_float64():
    model = tiny_mamba(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask, dtype=torch.float64)
    assert result.layers[0].matrix.dtype == torch.float64
    assert max(result.errors) <= 1e-5


def test_bfloat16_model_is_computed_in_float32():
    model = tiny_mamba(dtype=torch.bfloat16)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask)
    assert result.layers[0].matrix.dtype == torch.float32
    assert max(result.errors) <= 5e-2


@pytest.mark.parametrize("variant", ["unified", "no_conv"])
def test_exact_variants_reconstruct(variant):
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=7)
    result = ia.decompose(model, ids, mask, variant=variant)
    assert all(layer.exact for layer in result.layers)
    assert max(result.errors) <= 1e-6


@pytest.mark.parametrize("variant", ["s6", "no_gate", "no_act"])
def test_ablations_report_what_they_miss(variant):
    """Ablations leave a factor out: they are flagged inexact and their error is large, not raised."""
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=7)
    result = ia.decompose(model, ids, mask, variant=variant)
    assert not any(layer.exact for layer in result.layers)
    assert min(result.errors) > 1e-2


def test_s6_variant_reproduces_the_scan():
    """S6 alone times u, plus D u, gated by silu(z), is the module's output: the predecessor's operator is S."""
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=7)
    layer = ia.decompose(model, ids, mask, variant="s6").layers[1]
    f = layer.factors
    scan = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
    rebuilt = (scan + f.D * f.ssm_input) * f.out_gate
    assert_close(rebuilt, layer.output, 1e-6, "s6 + D, gated")


def test_layers_selection_and_indices():
    model = tiny_mamba(num_hidden_layers=4)
    ids = torch.randint(0, 40, (1, 5))
    result = ia.decompose(model, ids, layers=[-1, 1])
    assert [layer.index for layer in result.layers] == [1, 3]
    assert result.layers[1].name == "backbone.layers.3.mixer"
    with pytest.raises(IndexError, match="out of range"):
        ia.decompose(model, ids, layers=[4])


def test_factors_match_the_module_intermediates():
    """The recomputed dt, B, C match the module's own x_proj / dt_proj on the captured input."""
    model = tiny_mamba(dtype=torch.float64)
    ids = torch.randint(0, 40, (1, 6))
    targets = select_layers(model, [0])
    with torch.no_grad(), capture(model, targets) as captured:
        model(ids)
    mixer = captured[0].module
    f = mamba_factors(mixer, captured[0].inputs, None, torch.float64)
    proj = mixer.x_proj(f.ssm_input)
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    assert_close(f.B, proj[..., R:R + N], 1e-12, "B")
    assert_close(f.C, proj[..., R + N:], 1e-12, "C")
    assert_close(f.dt, torch.nn.functional.softplus(mixer.dt_proj(proj[..., :R])), 1e-12, "dt")
