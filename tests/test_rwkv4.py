"""RWKV-4 time mixing: decompose() against the real module, the fast operator against the slow loops."""

from __future__ import annotations

import pytest
import torch
from transformers import RwkvConfig, RwkvForCausalLM, RwkvModel

import implicit_attention as ia
from implicit_attention.architectures.rwkv4 import VARIANTS, rwkv_block, rwkv_factors, wkv_log_normaliser, wkv_matrices
from implicit_attention.architectures.rwkv4.naive import naive_rwkv, naive_wkv_recurrence
from implicit_attention.explanations import BASELINE_METHODS, MATRIX_METHODS
from implicit_attention.hooks import capture, select_layers

from conftest import (
    assert_attribution_matches_blocks,
    assert_close,
    check_explanation,
    check_fast_aggregates,
    check_long_fast_mean,
    fresh_aggregates,
    left_padded,
)

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def tiny_rwkv(*, dtype=torch.float32, seed: int = 0, key_scale: float = 0.6, model_cls=RwkvForCausalLM, **overrides):
    """A tiny RWKV-4 with every parameter randomised (mixes in (0, 1), decays, bonuses, norms)."""
    settings = dict(vocab_size=40, context_length=16, hidden_size=12, num_hidden_layers=2,
                    attention_hidden_size=10, intermediate_size=24, rescale_every=0)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(RwkvConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "time_mix" in name:
                param.copy_(torch.rand_like(param))
            elif "time_decay" in name or "time_first" in name:
                param.copy_(torch.randn_like(param))
            elif "ln" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("attention.key.weight"):
                param.copy_(torch.randn_like(param) * key_scale)
            else:
                param.copy_(torch.randn_like(param) * 0.6)
    return model.to(dtype).eval()


def captured(model, ids, mask=None):
    targets = select_layers(model, None)
    with torch.no_grad(), capture(model, targets) as records:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return records


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed,width", [(0, 10), (1, 12), (2, 7)])
def test_single_stream_reconstructs_module_output(dtype, seed, width):
    """variant no_shift: diag(r) alpha on the values after the token shift, C channels, exact."""
    model = tiny_rwkv(dtype=dtype, seed=seed, attention_hidden_size=width)
    ids, mask = left_padded(batch=3, length=7, seed=seed)
    result = ia.decompose(model, ids, mask, variant="no_shift")
    assert [layer.name for layer in result.layers] == ["rwkv.blocks.0.attention", "rwkv.blocks.1.attention"]
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, width, 7, 7) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
        assert torch.count_nonzero(layer.offset) == 0


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_odd_lengths_unbatched_and_base_model(length):
    for model in (tiny_rwkv(dtype=torch.float64), tiny_rwkv(dtype=torch.float64, model_cls=RwkvModel)):
        result = ia.decompose(model, torch.randint(0, 40, (length,)))
        assert max(result.errors) <= 1e-6
        assert result.layers[0].matrix.shape[-1] == length


def test_layer_rescaling_of_the_model_does_not_matter():
    """rescale_every halves the residual stream and the output weights in eval: the captured input and
    the pre-projection output are what the layer really saw and produced."""
    model = tiny_rwkv(dtype=torch.float64, rescale_every=1, num_hidden_layers=3)
    ids, mask = left_padded(batch=2, length=7)
    result = ia.decompose(model, ids, mask)
    assert model.rwkv.layers_are_rescaled and max(result.errors) <= 1e-6


def test_large_keys_do_not_overflow_in_float32():
    """Keys of a few hundred: exp(k) overflows float32, the softmax form (max-subtraction) does not."""
    model = tiny_rwkv(dtype=torch.float32, key_scale=40.0)
    ids, mask = left_padded(batch=2, length=9)
    result = ia.decompose(model, ids, mask)
    keys = [layer.factors.key.abs().max() for layer in result.layers]
    assert max(keys) > 100, keys
    for layer in result.layers:
        assert torch.isfinite(layer.matrix).all()
        assert layer.error <= 1e-4


def test_alpha_rows_are_a_distribution_and_gate_scales_rows():
    model = tiny_rwkv(dtype=torch.float64)
    layer = ia.decompose(model, torch.randint(0, 40, (2, 6)), variant="wkv").layers[1]
    alpha = layer.matrix
    assert bool((alpha >= 0).all())
    assert_close(alpha.sum(-1), torch.ones_like(alpha.sum(-1)), 1e-12, "softmax rows")
    unified = rwkv_block(layer.factors, slice(0, layer.channels), "unified")
    r = layer.factors.receptance.transpose(1, 2)[..., None]
    assert_close(unified, r * alpha, 1e-14, "diag(r) alpha")


def test_padding_is_read_like_the_module_reads_it():
    """RwkvModel ignores attention_mask: padded and unmasked runs agree and padding columns carry weight."""
    model = tiny_rwkv(dtype=torch.float64)
    ids, mask = left_padded(batch=3, length=8)
    masked = ia.decompose(model, ids, mask)
    unmasked = ia.decompose(model, ids)
    for a, b in zip(masked.layers, unmasked.layers):
        assert torch.equal(a.matrix, b.matrix)
        assert torch.all(a.mask == 1)
        assert torch.count_nonzero(a.matrix[2, :, 2:, :2]) > 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 3])
def test_fast_operator_matches_naive(variant, seed):
    model = tiny_rwkv(dtype=torch.float64, seed=seed)
    ids, mask = left_padded(batch=2, length=6, seed=seed)
    for record in captured(model, ids, mask):
        f = rwkv_factors(record.module, record.inputs, torch.float64)
        width = f.key.shape[-1] * (2 if variant == "unified" else 1)     # unified: two value streams
        fast = rwkv_block(f, slice(0, width), variant)
        assert_close(fast, naive_rwkv(f, variant), 1e-12, variant)
        if variant == "unified":   # blocks that straddle the two streams
            halves = torch.cat([rwkv_block(f, slice(s, min(s + 3, width)), variant) for s in range(0, width, 3)], 1)
            assert torch.equal(halves, fast)


def test_wkv_matrix_is_the_module_recurrence():
    """alpha v equals the module's stabilised numerator/denominator recurrence, written as loops."""
    model = tiny_rwkv(dtype=torch.float64, key_scale=5.0)
    ids, _ = left_padded(batch=2, length=7)
    for record in captured(model, ids):
        f = rwkv_factors(record.module, record.inputs, torch.float64)
        alpha = wkv_matrices(f.key, f.decay, f.first)
        assert_close(torch.einsum("bcij,bjc->bic", alpha, f.value), naive_wkv_recurrence(f), 1e-12, "wkv")


def test_factors_match_the_module_projections():
    model = tiny_rwkv(dtype=torch.float64)
    records = captured(model, torch.randint(0, 40, (2, 5)))
    for record in records:
        f = rwkv_factors(record.module, record.inputs, torch.float64)
        with torch.no_grad():
            receptance, key, value, _ = record.module.extract_key_value(record.inputs)
        assert_close(f.receptance, receptance, 1e-14, "r")
        assert_close(f.value, value, 1e-14, "v")
        assert torch.equal(f.key, key.float().double())        # the module reads k in float32


def test_channel_blocks_agree_with_one_block():
    model = tiny_rwkv(dtype=torch.float64)
    layer = ia.decompose(model, torch.randint(0, 40, (2, 5))).layers[0]
    parts = torch.cat([layer._block(slice(s, min(s + 3, 10)))[0] for s in range(0, 10, 3)], dim=1)
    assert torch.equal(parts, layer._block(slice(0, 10))[0])


def test_wkv_variant_is_flagged_and_carries_the_gate_in_its_gradient():
    model = tiny_rwkv(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=7)
    result = ia.decompose(model, ids, mask, variant="wkv")
    for layer in result.layers:
        assert not layer.exact and layer.error > 1e-2
        gated = layer.factors.receptance * torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
        assert_close(gated, layer.output, 1e-6, "r * (alpha v)")
        grad = torch.randn_like(layer.values)
        assert torch.equal(layer.matrix_gradient(grad), grad * layer.factors.receptance)
        # the gradient-weighted map of "wkv" equals no_shift's: g r alpha v = g (diag(r) alpha) v
    unified = ia.decompose(model, ids, mask, variant="no_shift").layers[0]
    grad = torch.randn_like(unified.values)
    assert_close(result.layers[0].attribution(grad), unified.attribution(grad), 1e-12, "attribution")


def test_aggregates_match_the_matrix():
    model = tiny_rwkv(dtype=torch.float64)
    layer = ia.decompose(model, torch.randint(0, 40, (2, 6))).layers[1]
    A = layer.matrix
    assert_close(layer.aggregate("mean"), A.mean(1), 1e-12, "mean")
    assert_close(layer.aggregate("abs"), A.abs().mean(1), 1e-12, "abs")
    assert_close(layer.aggregate_by_blocks("pos"), A.clamp(min=0).mean(1), 1e-12, "pos")


@pytest.mark.parametrize("method,variant", [(m, v) for m in MATRIX_METHODS for v in VARIANTS]
                         + [(m, "unified") for m in BASELINE_METHODS])
def test_explain_every_method(method, variant):
    # smoothgrad and gradient x input of this tiny model sum gradients that mostly cancel (relevance
    # ~1e-5 of the score): float32 rounding of a batch of 2 and of 1 then differs by ~1% of it (and by
    # the thread count), so their batch consistency is checked in float64, where it is held to 1e-6
    model = tiny_rwkv(dtype=torch.float64 if method in ("smoothgrad", "grad_x_input") else torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_unified_puts_the_value_token_shift_inside_the_operator(dtype):
    """Two value streams p = W_v diag(mu) h, q = W_v diag(1 - mu) h; q's matrices are alpha S; exact."""
    model = tiny_rwkv(dtype=dtype, seed=2)
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    result = ia.decompose(model, ids)
    for layer in result.layers:
        C = layer.output.shape[-1]
        assert layer.exact and layer.matrix.shape[1] == 2 * C and layer.values.shape[-1] == 2 * C
        assert layer.error <= (1e-4 if dtype == torch.float32 else 1e-6)
        f = layer.factors
        # the two streams add up to the module's value (after its token shift)
        shifted_prev = torch.nn.functional.pad(f.value_prev, (0, 0, 1, -1))
        assert_close(f.value_now + shifted_prev, f.value, 1e-5 if dtype == torch.float32 else 1e-12, "p + S q")
        # the matrices of the q stream carry the shift: alpha[i, j + 1]
        A = layer.matrix
        assert torch.equal(A[:, C:, :, :-1], A[:, :C, :, 1:]) and torch.count_nonzero(A[:, C:, :, -1]) == 0
        per_output = torch.einsum("bcij,bjc->bic", A, layer.values)
        assert_close(per_output[..., :C] + per_output[..., C:], layer.output, 1e-4, "folded")
    # attribution takes the output-shaped gradient
    grad = torch.randn_like(result.layers[0].output)
    assert result.layers[0].attribution(grad).shape == (2, 7, 7)



def test_log_normaliser_is_the_softmax_denominator():
    """The chunked scan of log Z against logsumexp over the dense logits, keys of hundreds, strong decays."""
    model = tiny_rwkv(dtype=torch.float64, key_scale=30.0)
    with torch.no_grad():
        for block in model.rwkv.blocks:
            block.attention.time_decay.mul_(3)
    ids, _ = left_padded(batch=2, length=41)
    for record in captured(model, ids):
        f = rwkv_factors(record.module, record.inputs, torch.float64)
        t = torch.arange(41)
        logits = f.decay[None, :, None, None] * (t[:, None] - 1 - t[None, :]) + f.key.transpose(1, 2)[:, :, None, :]
        logits = logits.diagonal_scatter(f.first[None, :, None] + f.key.transpose(1, 2), dim1=-2, dim2=-1)
        future = torch.ones(41, 41, dtype=torch.bool).triu(1)
        expected = torch.logsumexp(logits.masked_fill(future, float("-inf")), dim=-1).transpose(1, 2)
        for chunk in (1, 5, 64):
            assert_close(wkv_log_normaliser(f.key, f.decay, f.first, chunk), expected, 1e-14, f"chunk {chunk}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("key_scale", [0.6, 20.0])
def test_fast_aggregates_match_channel_blocks(variant, key_scale):
    """The tiled channel sum (mean = abs = pos: every entry is >= 0) and single rows, float64."""
    model = tiny_rwkv(dtype=torch.float64, key_scale=key_scale, seed=3)
    ids, mask = left_padded(batch=2, length=37, seed=3)
    for layer in ia.decompose(model, ids, mask, variant=variant).layers:
        check_fast_aggregates(layer, (1, 4, 16), [0, 5, -1], variant)


def test_fast_mean_float32_and_long_inputs_with_large_keys_and_decays():
    """float32 fast maps against float32 blocks, and at L = 1024 with keys of hundreds (exp(k)
    overflows float32) and per-step decays from exp(-9) to exp(9) against float64 blocks."""
    model = tiny_rwkv(dtype=torch.float32, seed=1)
    ids, mask = left_padded(batch=2, length=37)
    for layer in ia.decompose(model, ids, mask).layers:
        generic, fast = fresh_aggregates(layer, "mean")
        assert_close(fast, generic, 1e-5, "float32")

    model = tiny_rwkv(dtype=torch.float64, key_scale=40.0, seed=2)
    with torch.no_grad():
        for block in model.rwkv.blocks:
            block.attention.time_decay.copy_(torch.linspace(-9, 9, block.attention.time_decay.numel()))
    ids = torch.randint(1, 40, (1, 1024), generator=torch.Generator().manual_seed(3))
    for record in captured(model, ids):
        f64 = record.architecture.build(record, variant="unified", dtype=torch.float64, index=0)
        f32 = record.architecture.build(record, variant="unified", dtype=torch.float32, index=0)
        assert float(f64.factors.key.abs().max()) > 100
        check_long_fast_mean(f64, f32)


def test_sampled_check_rebuilds_output_channels_from_both_value_streams():
    """Above the full-check size the unified layer (2C operator channels folded into C) checks sampled
    *output* channels, each from its p and q streams: all outputs sampled equals the full reconstruction,
    and a q stream made wrong is caught by the sampled check."""
    from implicit_attention.architectures import base

    model = tiny_rwkv(dtype=torch.float64, seed=4, attention_hidden_size=40)
    ids = torch.randint(1, 40, (2, 9), generator=torch.Generator().manual_seed(4))
    layer = ia.decompose(model, ids).layers[1]
    C = layer.output.shape[-1]
    assert_close(layer._reconstruct_outputs(slice(0, C)), layer.reconstruct(), 1e-13, "all outputs")
    assert_close(layer._reconstruct_outputs(slice(7, 19)), layer.reconstruct()[..., 7:19], 1e-13, "a slice")
    sampled = layer.measure_error(max_entries=0)
    assert layer.error_channels == base.SAMPLED_CHANNELS and sampled < 1e-10
    layer.values[..., C:] *= 1.5                        # the q stream (the token shift) made wrong
    assert layer.measure_error(max_entries=0) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("key_scale", [0.6, 20.0])
def test_fast_attribution_matches_channel_blocks(variant, key_scale):
    """The sign-split weighted channel sums (the q stream's shifted one column) against the clamped and
    signed rule on the 2C / C channel blocks, float64, padded, keys up to exp(k) overflowing float32."""
    model = tiny_rwkv(dtype=torch.float64, key_scale=key_scale, seed=5)
    ids, mask = left_padded(batch=2, length=37, seed=5)
    for layer in ia.decompose(model, ids, mask, variant=variant).layers:
        assert_attribution_matches_blocks(layer, variant, fast_path=True)
