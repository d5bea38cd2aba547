"""Griffin / RecurrentGemma: recurrent blocks and local attention against the real modules and the slow loops."""

from __future__ import annotations

import pytest
import torch
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM, RecurrentGemmaModel

import implicit_attention as ia
from implicit_attention.architectures.attention import repeat_kv
from implicit_attention.architectures.attention.naive import attention_probabilities_naive
from implicit_attention.architectures.griffin import VARIANTS, griffin_block, griffin_factors, rglru_matrices
from implicit_attention.architectures.griffin.naive import naive_griffin, naive_rglru_scan
from implicit_attention.explanations import BASELINE_METHODS, MATRIX_METHODS
from implicit_attention.hooks import capture, select_layers

from conftest import (
    assert_close,
    check_explanation,
    check_fast_aggregates,
    check_long_fast_mean,
    fresh_aggregates,
    left_padded,
)

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
RECURRENT = ["model.layers.0.temporal_block", "model.layers.1.temporal_block"]
ATTENTION = "model.layers.2.temporal_block"


def tiny_griffin(*, dtype=torch.float32, seed: int = 0, attn: str = "sdpa", model_cls=RecurrentGemmaForCausalLM,
                 **overrides):
    """Tiny RecurrentGemma (recurrent, recurrent, local attention) with every parameter randomised.

    4 heads (RG-LRU blocks of width 3), 2 key/value heads (GQA), a window of 4 < L so that the
    sliding window bites, non-zero biases, gates, decays and norm weights.
    """
    settings = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, lru_width=12, attention_window_size=4, conv1d_width=3,
                    attention_bias=True)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(RecurrentGemmaConfig(**settings, attn_implementation=attn))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "recurrent_param" in name:
                param.copy_(torch.randn_like(param) * 0.7)
            elif "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3)
            else:
                param.copy_(torch.randn_like(param) * 0.5)
    return model.to(dtype).eval()


def captured(model, ids, mask=None, position_ids=None):
    targets = select_layers(model, None)
    with torch.no_grad(), capture(model, targets) as records:
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return records


def build(record, variant="unified", dtype=torch.float64):
    layer = record.architecture.build(record, variant=variant, dtype=dtype, index=0)
    layer.measure_error()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed,conv_width", [(0, 3), (1, 2), (2, 4)])
def test_unified_reconstructs_module_output(dtype, seed, conv_width):
    model = tiny_griffin(dtype=dtype, seed=seed, conv1d_width=conv_width)
    ids, mask = left_padded(batch=3, length=7, seed=seed)
    result = ia.decompose(model, ids, mask)
    assert [layer.name for layer in result.layers] == RECURRENT + [ATTENTION]
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
    assert result.layers[0].matrix.shape == (3, 12, 7, 7)
    assert result.layers[2].matrix.shape == (3, 16, 7, 7)
    assert torch.count_nonzero(result.layers[0].offset) > 0          # the conv bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_eager_attention_uses_its_own_probabilities(dtype):
    # HF's eager softmax runs in float32: in a float64 model the -1.8e308 mask of a padding row
    # becomes -inf and the module itself returns NaN there, so float64 runs without padding.
    model = tiny_griffin(dtype=dtype, attn="eager")
    ids, mask = left_padded(batch=3, length=7)
    if dtype == torch.float64:
        mask = None
    result = ia.decompose(model, ids, mask)
    assert max(result.errors) <= TOL[dtype]
    sdpa = ia.decompose(tiny_griffin(dtype=dtype, attn="sdpa"), ids, mask).layers[2]
    real = sdpa.mask.bool()[:, :, None] & sdpa.mask.bool()[:, None, :]     # rows and columns of real tokens
    eager_probs = result.layers[2].probs
    assert_close(eager_probs * real[:, None], sdpa.probs * real[:, None], 1e-6, "eager vs recomputed")


def test_sliding_window_and_gqa_in_the_attention_matrix():
    model = tiny_griffin(dtype=torch.float64)
    ids, mask = left_padded(batch=3, length=8)
    layer = ia.decompose(model, ids, mask).layers[2]
    P = layer.probs                                                        # [B, heads, L, L]
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.count_nonzero(P[..., i - j >= 4]) == 0                     # window of 4
    assert torch.count_nonzero(P[2, :, :, :2]) == 0                         # padding columns
    assert torch.all(P[2, :, :2] == 0)                                      # padding rows, as SDPA
    assert_close(P[:, :, 2:].sum(-1), torch.ones_like(P[:, :, 2:].sum(-1)), 1e-12, "rows")
    # heads 0, 1 share key/value head 0: the values of channels 0..3 and 4..7 coincide
    assert torch.equal(layer.values[..., 0:4], layer.values[..., 4:8])
    assert torch.equal(layer.mask, mask.double())


def test_resets_at_position_zero_inside_the_sequence():
    """Packed documents: position_ids restart at 0, the state resets (a = 0, m = 1) and the operator stays exact."""
    model = tiny_griffin(dtype=torch.float64)
    ids = torch.randint(1, 40, (2, 8))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    for record in captured(model, ids, position_ids=position_ids):
        layer = build(record)
        assert layer.error <= 1e-6, (record.name, layer.error)
        if record.name in RECURRENT:
            f = layer.factors
            alpha = rglru_matrices(f.log_a, f.column_scale, f.reset)
            assert torch.count_nonzero(alpha[:, :, 3:, :3]) == 0                # the state does not cross the reset
            assert torch.count_nonzero(alpha[:, :, 4:, 3]) > 0
            # the conv (width 3) still reads the two tokens before the reset, as the module's does
            assert torch.count_nonzero(layer.matrix[:, :, 3:, :1]) == 0
            assert torch.count_nonzero(layer.matrix[:, :, 3:, 1:3]) > 0
            assert torch.all(f.multiplier[:, [0, 3]] == 1)
            assert bool((f.multiplier[:, [1, 2, 4]] < 1).all())


def test_the_multiplier_is_part_of_the_model():
    """m = sqrt(1 - a^2) is kept: setting m = 1 (as a published implementation does) breaks exactness."""
    model = tiny_griffin(dtype=torch.float64)
    record = captured(model, torch.randint(1, 40, (2, 7)))[0]
    layer = build(record)
    assert layer.error <= 1e-6
    f = layer.factors
    f.multiplier = torch.ones_like(f.multiplier)
    rebuilt = torch.einsum("bcij,bjc->bic", griffin_block(f, slice(0, 12), "unified")[0], layer.values)
    assert float((rebuilt + layer.offset - layer.output).norm() / layer.output.norm()) > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_width,resets", [(3, False), (2, True), (4, True)])
def test_fast_operator_matches_naive(variant, conv_width, resets):
    model = tiny_griffin(dtype=torch.float64, conv1d_width=conv_width, seed=conv_width)
    ids, mask = left_padded(batch=2, length=6, seed=conv_width)
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 3]]) if resets else None
    for record in captured(model, ids, mask, position_ids)[:2]:
        f = griffin_factors(record.module, record.inputs, record.kwargs, torch.float64)
        matrices, offset = griffin_block(f, slice(0, 12), variant)
        expected_matrices, expected_offset = naive_griffin(f, variant)
        assert_close(matrices, expected_matrices, 1e-12, f"{variant} matrix")
        if offset is None:
            assert torch.count_nonzero(expected_offset) == 0
        else:
            assert_close(offset, expected_offset, 1e-12, f"{variant} offset")


def test_rglru_matrix_is_the_scan():
    model = tiny_griffin(dtype=torch.float64)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    for record in captured(model, torch.randint(1, 40, (2, 7)), position_ids=position_ids)[:2]:
        f = griffin_factors(record.module, record.inputs, record.kwargs, torch.float64)
        alpha = rglru_matrices(f.log_a, f.column_scale, f.reset)
        scan = naive_rglru_scan(f)
        assert_close(torch.einsum("bcij,bjc->bic", alpha, f.conv_out), scan, 1e-12, "alpha c vs scan")
        # and the scan gated by y is the module's output before linear_out
        assert_close(scan * f.gate, record.output.double(), 1e-6, "module")


def test_attention_channels_and_aggregates():
    model = tiny_griffin(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=7)
    layer = ia.decompose(model, ids, mask).layers[2]
    f = layer.factors
    bias, empty = f.bias(7, torch.float64, f.q.device)
    naive = attention_probabilities_naive(f.q, repeat_kv(f.k, f.q.shape[1] // f.k.shape[1]), f.scale, bias, empty)
    expected = torch.stack([naive[:, c // layer.head_dim] for c in range(layer.channels)], dim=1)
    assert_close(layer.matrix, expected, 1e-12, "channels")
    for how in ("mean", "abs", "pos"):
        assert_close(layer.aggregate(how), layer.aggregate_by_blocks(how), 1e-12, how)
        assert_close(layer.aggregate_rows([-1, 2], how), layer.rows_by_blocks([-1, 2], how),
                     1e-12, how)
    # decompose shifts each row's positions back by its left padding (as generation does)
    positions = (torch.arange(7) - (mask.cumsum(-1) == 0).sum(-1, keepdim=True)).clamp(min=0)
    record = captured(model, ids, mask, position_ids=positions)[2]
    again = record.architecture.build(record, variant="unified", dtype=torch.float64, index=2)
    assert torch.equal(again.probs, layer.probs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(variant):
    model = tiny_griffin(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=7)
    result = ia.decompose(model, ids, mask, variant=variant)
    recurrent, attention = result.layers[:2], result.layers[2]
    assert attention.exact and attention.error <= 1e-6                   # softmax attention under every variant
    exact = variant in ("unified", "no_conv")
    for layer in recurrent:
        assert layer.exact == exact
        assert layer.error <= 1e-6 if exact else layer.error > 1e-2
        grad = torch.randn_like(layer.values)
        gated = variant in ("rglru", "no_gate")
        assert torch.equal(layer.matrix_gradient(grad), grad * layer.factors.gate if gated else grad)
    if variant in ("rglru", "no_gate"):
        layer = recurrent[0]
        inner = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(inner * layer.factors.gate, layer.output, 1e-6, "gate times the ablated operator")


def test_base_model_and_odd_lengths():
    model = tiny_griffin(dtype=torch.float64, model_cls=RecurrentGemmaModel)
    for length in (1, 2, 5, 9):
        result = ia.decompose(model, torch.randint(1, 40, (length,)))
        assert max(result.errors) <= 1e-6 and result.layers[0].matrix.shape[-1] == length


@pytest.mark.parametrize("method,variant", [(m, v) for m in MATRIX_METHODS for v in ("unified", "rglru")]
                         + [(m, "unified") for m in BASELINE_METHODS])
def test_explain_every_method(method, variant):
    """Recurrent and attention layers together in one rollout / attribution."""
    model = tiny_griffin(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)



@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_width,resets", [(3, False), (4, True)], ids=["k3", "k4-resets"])
def test_fast_aggregates_match_channel_blocks(variant, conv_width, resets):
    """The tiled signed mean (and abs/pos where the variant is >= 0) and single rows, float64."""
    model = tiny_griffin(dtype=torch.float64, conv1d_width=conv_width, seed=conv_width)
    ids, mask = left_padded(batch=2, length=37, seed=conv_width)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0] + list(range(29))]) if resets else None
    for record in captured(model, ids, mask, position_ids)[:2]:
        layer = record.architecture.build(record, variant=variant, dtype=torch.float64, index=0)
        check_fast_aggregates(layer, (None, 4), [0, 7, -1], variant)


def test_fast_mean_float32_and_long_inputs_with_strong_decays():
    """float32 fast maps against float32 blocks, and at L = 1024 (decays summing far past exp's range,
    weak and strong channels mixed) against float64 blocks, with no inf or NaN."""
    model = tiny_griffin(dtype=torch.float32, seed=1)
    ids, mask = left_padded(batch=2, length=37)
    for layer in ia.decompose(model, ids, mask).layers[:2]:
        generic, fast = fresh_aggregates(layer, "mean")
        assert_close(fast, generic, 1e-5, "float32")

    model = tiny_griffin(dtype=torch.float64, seed=2)
    with torch.no_grad():
        for block in (model.model.layers[0].temporal_block, model.model.layers[1].temporal_block):
            block.rg_lru.recurrent_param.copy_(torch.randn_like(block.rg_lru.recurrent_param) * 3)
    ids = torch.randint(1, 40, (1, 1024), generator=torch.Generator().manual_seed(3))
    for record in captured(model, ids)[:2]:
        f64 = record.architecture.build(record, variant="unified", dtype=torch.float64, index=0)
        f32 = record.architecture.build(record, variant="unified", dtype=torch.float32, index=0)
        total = -f64.factors.log_a.sum(dim=1)
        assert float(total.max()) > 1000 and float(total.min()) < 100     # strong and weak channels
        check_long_fast_mean(f64, f32)
