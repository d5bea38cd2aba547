"""Our HGRN: chunked scan vs the paper's recurrence, save/load, exact decomposition, fast vs naive, explain."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import implicit_attention as ia
from implicit_attention.architectures.hgrn import VARIANTS, hgrn_block
from implicit_attention.architectures.hgrn.naive import hgrn_naive
from implicit_attention.hooks import capture, select_layers
from implicit_attention.models.hgrn import HGRNConfig, HGRNForCausalLM, HGRNModel, HGRNRecurrence
from implicit_attention.models.hgrn.modeling_hgrn import chunked_scan

from conftest import (
    assert_close,
    check_explanation,
    check_fast_aggregates,
    check_long_fast_mean,
    fresh_aggregates,
    left_padded,
)

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def tiny_hgrn(*, seed: int = 0, dtype=torch.float64, model_cls=HGRNForCausalLM, **overrides):
    """A tiny HGRN with every parameter randomised (biases, conv, lower bounds, norms)."""
    settings = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, intermediate_size=12, conv_size=3,
                    attention_bias=True, chunk_size=3)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(HGRNConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.5 if "norm" not in name else 1.0))
    return model.to(dtype).eval()


def set_reference(model, on: bool):
    for module in model.modules():
        if isinstance(module, HGRNRecurrence):
            module.use_recurrent_reference = on


@pytest.mark.parametrize("length,chunk_size", [(1, 3), (4, 64), (7, 3), (9, 2)])
@pytest.mark.parametrize("use_short_conv", [True, False], ids=["conv", "noconv"])
def test_chunked_forward_matches_recurrence(length, chunk_size, use_short_conv):
    model = tiny_hgrn(seed=length, chunk_size=chunk_size, use_short_conv=use_short_conv)
    ids, mask = left_padded(batch=3, length=length, seed=length)
    chunked = model(ids, attention_mask=mask).logits
    set_reference(model, True)
    recurrent = model(ids, attention_mask=mask).logits
    assert_close(chunked, recurrent, 1e-10, "chunked vs recurrent logits")


def test_chunked_scan_by_hand():
    """h_t = f_t h_{t-1} + x_t with f = 1/2: h = [1, 2.5, 4.25] for x = [1, 2, 3], whatever the chunk."""
    log_f = torch.full((1, 3, 1), 0.5, dtype=torch.float64).log()
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[None, :, None]
    for chunk in (1, 2, 3):
        assert torch.allclose(chunked_scan(log_f, x, chunk)[0, :, 0], torch.tensor([1.0, 2.5, 4.25], dtype=torch.float64))


def test_lower_bounds_rise_with_depth_from_zero():
    model = tiny_hgrn(num_hidden_layers=3)
    bounds = model.model.layer_lower_bounds()
    assert torch.all(bounds[0] == 0) and torch.all(bounds[1] > 0) and torch.all(bounds[2] > bounds[1])
    assert torch.all(bounds < 1)


def test_padding_tokens_change_nothing():
    model = tiny_hgrn()
    ids, mask = left_padded(batch=3, length=7)
    assert_close(model(ids, attention_mask=mask).logits[2, 2:], model(ids[2:, 2:]).logits[0], 1e-10, "padded vs alone")


def test_save_load_round_trip(tmp_path):
    model = tiny_hgrn(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HGRNConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HGRNForCausalLM
    assert torch.equal(loaded.model.lower_bounds, model.model.lower_bounds)
    assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is HGRNModel
    assert torch.equal(base(ids, attention_mask=mask).last_hidden_state,
                       model.model(ids, attention_mask=mask).last_hidden_state)


def test_inputs_embeds_and_input_embeddings():
    model = tiny_hgrn()
    ids, mask = left_padded(batch=2, length=6)
    embeds = model.get_input_embeddings()(ids)
    assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                 1e-14, "inputs_embeds")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("conv_size,conv_bias,bias,lower_bound", [
    (2, True, True, True), (3, False, False, True), (4, True, True, False), (0, False, True, True)],
    ids=["k2-bias-lb", "k3-noconvbias-nobias", "k4-nolb", "noconv"])
def test_unified_reconstructs_module_output(dtype, conv_size, conv_bias, bias, lower_bound):
    model = tiny_hgrn(dtype=dtype, conv_size=max(conv_size, 1), conv_bias=conv_bias, use_short_conv=conv_size > 0,
                      attention_bias=bias, use_lower_bound=lower_bound, expand_ratio=2, seed=conv_size)
    ids, mask = left_padded(batch=3, length=7, seed=conv_size)
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) == 2
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, 16, 7, 7) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
        assert torch.count_nonzero(layer.matrix[2, :, :, :2]) == 0


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_odd_lengths_and_unbatched_input(length):
    model = tiny_hgrn()
    result = ia.decompose(model, torch.randint(0, 40, (length,)))
    assert max(result.errors) <= 1e-6
    assert result.layers[0].matrix.shape[-1] == length


def test_float32_model_decomposed_in_float64():
    model = tiny_hgrn(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask, dtype=torch.float64)
    assert result.layers[0].matrix.dtype == torch.float64 and max(result.errors) <= 1e-5


def test_bfloat16_model_is_computed_in_float32():
    model = tiny_hgrn(dtype=torch.bfloat16)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask)
    assert result.layers[0].matrix.dtype == torch.float32 and max(result.errors) <= 5e-2


def test_padding_does_not_change_real_tokens_matrices():
    model = tiny_hgrn()
    ids, mask = left_padded(batch=3, length=8)
    batched = ia.decompose(model, ids, mask).layers[1]
    alone = ia.decompose(model, ids[2:, 2:]).layers[1]
    assert_close(batched.matrix[2, :, 2:, 2:], alone.matrix[0], 1e-10, "matrices")
    assert_close(batched.offset[2, 2:], alone.offset[0], 1e-10, "offset")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_size,use_short_conv", [(2, True), (4, True), (3, False)], ids=["k2", "k4", "noconv"])
def test_fast_operator_matches_naive(variant, conv_size, use_short_conv):
    model = tiny_hgrn(conv_size=conv_size, use_short_conv=use_short_conv, seed=conv_size)
    ids, mask = left_padded(batch=2, length=6, seed=conv_size)
    for layer in ia.decompose(model, ids, mask, variant=variant).layers:
        expected, expected_offset = hgrn_naive(layer.factors, variant)
        assert_close(layer.matrix, expected, 1e-12, f"{variant} matrix")
        assert_close(layer.offset, expected_offset, 1e-12, f"{variant} offset")
        parts = torch.cat([hgrn_block(layer.factors, slice(s, min(s + 3, 8)), variant)[0] for s in range(0, 8, 3)], dim=1)
        assert torch.equal(parts, layer.matrix)


def test_naive_recurrence_matrix_times_input_is_the_recurrence():
    """R i from the naive matrices equals h_t = f_t h_{t-1} + (1 - f_t) i_t run token by token."""
    model = tiny_hgrn()
    ids, mask = left_padded(batch=2, length=7)
    layer = ia.decompose(model, ids, mask, variant="recurrence").layers[1]
    f = layer.factors
    R, _ = hgrn_naive(f, "recurrence")
    i = f.recurrence_input
    h = torch.zeros_like(i[:, 0])
    hs = []
    for t in range(i.shape[1]):
        h = f.forget[:, t] * h + (1 - f.forget[:, t]) * i[:, t]
        hs.append(h)
    assert_close(torch.einsum("bcij,bjc->bic", R, i), torch.stack(hs, dim=1), 1e-12, "R i vs recurrence")


def test_recurrence_variant_is_inexact_and_rebuilds_through_norm_and_gate():
    model = tiny_hgrn()
    ids, mask = left_padded(batch=2, length=7)
    layer = ia.decompose(model, ids, mask, variant="recurrence").layers[1]
    assert not layer.exact and layer.error > 1e-2
    h = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
    assert_close(layer.factors.row_scale * h, layer.output, 1e-10, "rmsnorm(g h)")
    grad = torch.randn_like(h)
    assert torch.equal(layer.matrix_gradient(grad), grad * layer.factors.row_scale)


@pytest.mark.parametrize("method", ia.METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_explain_every_method(method, variant):
    model = tiny_hgrn(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)


def test_attribution_uses_the_true_gradient_of_the_layer_output():
    torch.manual_seed(0)
    model = tiny_hgrn(num_hidden_layers=1)
    ids = torch.randint(1, 40, (1, 6))
    expl = ia.run_explanation(model, ids, method="attribution")
    layer = expl.decomposition.layers[0]
    leaf = layer.output.clone().requires_grad_(True)
    handle = model.model.layers[0].attn.o_proj.register_forward_pre_hook(lambda module, args: (leaf,))
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, -1, expl.target.ids[0]], leaf)
    cam = (grad.transpose(1, 2)[..., None] * layer.matrix * layer.values.transpose(1, 2)[:, :, None, :]).clamp(min=0).mean(1)
    assert_close(expl.relevance[0], cam[0, -1], 1e-9, "attribution (R - I)[row] = cam[row] for one layer")



@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_size,use_short_conv", [(2, True), (4, True), (3, False)], ids=["k2", "k4", "noconv"])
def test_fast_aggregates_match_channel_blocks(variant, conv_size, use_short_conv):
    """The tiled signed mean (abs/pos too for the >= 0 recurrence) and single rows, float64, left padding."""
    model = tiny_hgrn(conv_size=conv_size, use_short_conv=use_short_conv, seed=conv_size)
    ids, mask = left_padded(batch=3, length=37, seed=conv_size)
    for layer in ia.decompose(model, ids, mask, variant=variant).layers:
        check_fast_aggregates(layer, (None, 4), [0, 3, -1], variant)


def test_fast_mean_float32_and_long_inputs_with_strong_decays():
    """float32 fast maps against float32 blocks, and at L = 1024 (forget gates from ~0 to ~1, their
    products far past exp's range) against float64 blocks, with no inf or NaN."""
    model = tiny_hgrn(dtype=torch.float32, seed=1)
    ids, mask = left_padded(batch=2, length=37)
    for layer in ia.decompose(model, ids, mask).layers:
        generic, fast = fresh_aggregates(layer, "mean")
        assert_close(fast, generic, 1e-5, "float32")

    model = tiny_hgrn(seed=2, use_lower_bound=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HGRNRecurrence):
                module.f_proj.bias.copy_(torch.randn_like(module.f_proj.bias) * 5)
    ids = torch.randint(1, 40, (1, 1024), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture(model, select_layers(model, None)) as records:
        model(input_ids=ids)
    for record in records:
        f64 = record.architecture.build(record, variant="unified", dtype=torch.float64, index=0)
        f32 = record.architecture.build(record, variant="unified", dtype=torch.float32, index=0)
        total = -torch.log(f64.factors.forget).sum(dim=1)
        assert float(total.max()) > 1000 and float(total.min()) < 100      # strong and weak channels
        check_long_fast_mean(f64, f32)
