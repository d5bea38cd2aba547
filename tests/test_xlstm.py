"""xLSTM mLSTM layers: decompose() against the real module (recurrent and chunkwise kernels), fast vs slow loops."""

from __future__ import annotations

import pytest
import torch
from transformers import xLSTMConfig, xLSTMForCausalLM, xLSTMModel
from transformers.initialization import no_init_weights

import implicit_attention as ia
from implicit_attention.architectures.xlstm import VARIANTS, XlstmLayerDecomposition, xlstm_block, xlstm_factors
from implicit_attention.architectures.xlstm.naive import naive_xlstm
from implicit_attention.explanations import BASELINE_METHODS, MATRIX_METHODS
from implicit_attention.hooks import capture, select_layers

from conftest import assert_attribution_matches_blocks, assert_close, check_explanation, left_padded

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def tiny_xlstm(*, dtype=torch.float32, seed: int = 0, model_cls=xLSTMForCausalLM, gate_bias: float = 0.0,
               **overrides):
    """A tiny xLSTM (2 heads, q/k head width 4, value head width 8) with every parameter randomised.

    ``gate_bias`` shifts the input-gate biases (large values exercise the stabiliser). The fused
    weight mode is built without HF's initialisation, which fails for it (bias shapes), and then
    randomised like the rest.
    """
    settings = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_heads=2, use_bias=True,
                    ffn_round_up_to_multiple_of=8, chunk_size=64)
    settings.update(overrides)
    torch.manual_seed(seed)
    with no_init_weights():
        model = model_cls(xLSTMConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + torch.randn_like(param) * 0.3)
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.7 + (gate_bias if "igate" in name else 0.0))
            else:
                param.copy_(torch.randn_like(param) * 0.5)
    return model.to(dtype).eval()


def captured(model, ids):
    targets = select_layers(model, None)
    with torch.no_grad(), capture(model, targets) as records:
        model(input_ids=ids, use_cache=False)
    return records


KERNELS = {
    "recurrent": dict(chunk_size=64),               # inference mode, L < chunk: the recurrent kernel
    "chunks+rest": dict(chunk_size=4),              # inference mode: two chunks of 4, then the recurrence
    "train": dict(mode="train", chunk_size=3),      # the chunkwise kernel alone (L = 9)
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
def test_unified_reconstructs_module_output(dtype, kernel, use_bias):
    model = tiny_xlstm(dtype=dtype, use_bias=use_bias, **KERNELS[kernel])
    ids, mask = left_padded(batch=3, length=9)
    result = ia.decompose(model, ids, mask)
    assert [layer.name for layer in result.layers] == ["backbone.blocks.0.mlstm_layer", "backbone.blocks.1.mlstm_layer"]
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, 16, 9, 9) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
        assert (torch.count_nonzero(layer.offset) > 0) == use_bias
        assert torch.all(layer.mask == 1)                  # the model takes no attention mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_weights(dtype):
    model = tiny_xlstm(dtype=dtype, weight_mode="fused", seed=1)
    result = ia.decompose(model, torch.randint(1, 40, (2, 7)))
    assert max(result.errors) <= TOL[dtype]


def test_large_input_gates_need_the_stabiliser():
    """A loose soft cap and input-gate biases near 100: exp(i) overflows float32, the stabilised form does not."""
    model = tiny_xlstm(dtype=torch.float32, gate_soft_cap=1000.0, gate_bias=100.0, seed=2)
    assert all(float(block.mlstm_layer.igate_preact.bias.detach().min()) > 90 for block in model.backbone.blocks)
    ids, _ = left_padded(batch=2, length=9)
    for layer in ia.decompose(model, ids).layers:
        assert torch.isfinite(layer.matrix).all() and layer.error <= 1e-4


@pytest.mark.parametrize("length", [1, 2, 5])
def test_odd_lengths_and_base_model(length):
    model = tiny_xlstm(dtype=torch.float64, model_cls=xLSTMModel)
    result = ia.decompose(model, torch.randint(0, 40, (length,)))
    assert max(result.errors) <= 1e-6 and result.layers[0].matrix.shape[-1] == length


def test_cell_matrix_reproduces_the_backend():
    """A v equals the module's mLSTM cell output (its backend), before the norm and the gate."""
    model = tiny_xlstm(dtype=torch.float64, chunk_size=4)
    ids = torch.randint(1, 40, (2, 9))
    cells = []
    handles = [block.mlstm_layer.mlstm_backend.register_forward_hook(lambda m, a, out: cells.append(out[0]))
               for block in model.backbone.blocks]
    try:
        records = captured(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    for record, cell in zip(records, cells):
        f = xlstm_factors(record.module, record.inputs, torch.float64)
        v = f.value.unflatten(-1, (2, -1)).transpose(1, 2)
        assert_close(f.attention @ v, cell, 1e-6, "A v vs backend")
        # the norm's scale and the gate as the module applies them
        norm = record.module.multihead_norm
        expected = f.out_gate * norm((f.attention @ v).transpose(1, 2))
        assert_close(expected, record.output.double(), 1e-6, "gate * norm(A v)")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
def test_fast_operator_matches_naive(variant, use_bias):
    model = tiny_xlstm(dtype=torch.float64, use_bias=use_bias, seed=3)
    for record in captured(model, torch.randint(1, 40, (2, 6))):
        f = xlstm_factors(record.module, record.inputs, torch.float64)
        matrices, offset = xlstm_block(f, slice(0, 16), variant)
        expected_matrices, expected_offset, expected_values = naive_xlstm(record.module, record.inputs, variant)
        layer = XlstmLayerDecomposition(f, variant=variant, index=0, name=record.name, output=record.output.double())
        assert_close(matrices, expected_matrices, 1e-10, f"{variant} matrix")
        assert_close(layer.values, expected_values, 1e-12, f"{variant} values")
        if offset is None:
            assert torch.count_nonzero(expected_offset) == 0
        else:
            assert_close(offset, expected_offset, 1e-12, f"{variant} offset")


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_head_aggregates_equal_the_generic_ones(variant):
    model = tiny_xlstm(dtype=torch.float64, seed=4)
    layer = ia.decompose(model, torch.randint(1, 40, (2, 7)), variant=variant).layers[1]
    for how in ("mean", "abs", "pos"):
        assert_close(layer.aggregate(how), layer.aggregate_by_blocks(how), 1e-12, how)
        assert_close(layer.aggregate_rows([-1, 3], how), layer.rows_by_blocks([-1, 3], how),
                     1e-12, how)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_head_attribution_equals_the_channel_blocks(variant):
    """A_c = diag(scale_c) A_head: the clamped and signed attribution from the per-head sign split."""
    model = tiny_xlstm(dtype=torch.float64, seed=5)
    ids, mask = left_padded(batch=2, length=9, vocab=40, seed=5)
    for layer in ia.decompose(model, ids, mask, variant=variant).layers:
        assert_attribution_matches_blocks(layer, variant, fast_path=True)


def test_ablations_and_their_gradients():
    model = tiny_xlstm(dtype=torch.float64)
    ids = torch.randint(1, 40, (2, 7))
    unified = ia.decompose(model, ids).layers[0]
    f = unified.factors
    no_gate = ia.decompose(model, ids, variant="no_gate").layers[0]
    cell = ia.decompose(model, ids, variant="mlstm").layers[0]
    assert not no_gate.exact and not cell.exact and min(no_gate.error, cell.error) > 1e-2
    grad = torch.randn_like(unified.values)
    assert torch.equal(no_gate.matrix_gradient(grad), grad * f.out_gate)
    # "mlstm": h = A v; out = gate * (w s (h - mean_head h) + b) with s fixed; its vector-Jacobian product
    h = torch.einsum("bcij,bjc->bic", cell.matrix, cell.values).requires_grad_(True)
    out = f.out_gate * (f.norm_scale * (h - f.head_mean(h))) + unified.offset
    assert_close(out.detach(), unified.output, 1e-6, "the layer from h")
    (expected,) = torch.autograd.grad(out, h, grad)
    assert_close(cell.matrix_gradient(grad), expected, 1e-12, "mlstm gradient")
    # so the gradient-weighted maps of no_gate and unified coincide (g * gate * A' v = g * A v)
    assert_close(no_gate.attribution(grad), unified.attribution(grad), 1e-12, "no_gate attribution")


@pytest.mark.parametrize("method,variant", [(m, v) for m in MATRIX_METHODS for v in VARIANTS]
                         + [(m, "unified") for m in BASELINE_METHODS])
def test_explain_every_method(method, variant):
    model = tiny_xlstm(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)
