"""MiniMax lightning attention (and MiniMax's softmax attention) as exact implicit attention.

decompose() against the modules' own forward (every layer of the model in model order: lightning
and softmax attention; the MoE MLP mixes no tokens), left padding (the module zeroes ``q, k, v`` of
padded tokens), lengths across several of the module's blocks, the variants against the slow
reference, the per-head aggregates against the generic channel blocks, and explain.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import AGGREGATES, find_layers
from implicit_attention.architectures.attention import AttentionLayerDecomposition
from implicit_attention.architectures.lightning import LightningLayerDecomposition, lightning_block
from implicit_attention.architectures.lightning.naive import lightning_naive

from conftest import assert_close, check_explanation, left_padded

tf.logging.set_verbosity_error()

VOCAB = 40
#: the module's decays are float32 buffers and its RMS norm runs in float32 whatever the model's
#: dtype: a float64 model reconstructs to that rounding (measured ~4e-8)
TOL = {torch.float32: 1e-5, torch.float64: 1e-6}


def tiny(*, dtype=torch.float64, attn: str = "sdpa", seed: int = 0, **overrides):
    """Lightning, softmax (GQA), lightning; blocks of 3 tokens so that 7 tokens span three blocks."""
    settings = dict(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=4, num_hidden_layers=3, num_local_experts=2,
                    num_experts_per_tok=1, block_size=3, layer_types=["linear_attention", "full_attention",
                                                                      "linear_attention"])
    settings.update(overrides)
    torch.manual_seed(seed)
    config = tf.MiniMaxConfig(**settings)
    config._experts_implementation = "eager"  # the grouped-mm experts refuse float64
    model = tf.MiniMaxForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.5)   # norm weights
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_every_layer_reconstructs_module_output(dtype, attn):
    model = tiny(dtype=dtype, attn=attn)
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB)
    if attn == "eager" and dtype == torch.float64:
        mask = None  # the stock eager softmax in float32 turns a float64 finfo.min mask into NaN rows
    result = ia.decompose(model, ids, mask)
    assert [layer.name for layer in result.layers] == [name for name, _, _ in find_layers(model)]
    assert [type(layer) for layer in result.layers] == [LightningLayerDecomposition, AttentionLayerDecomposition,
                                                        LightningLayerDecomposition]
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        if mask is not None:
            assert torch.equal(layer.mask, mask.to(dtype))


def test_sliding_window_of_the_softmax_layers():
    model = tiny(sliding_window=2)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    result = ia.decompose(model, ids)
    assert max(result.errors) <= 1e-6
    P = result.layers[1].probs
    assert torch.count_nonzero(torch.tril(P, -2)) == 0 and torch.count_nonzero(torch.triu(P, 1)) == 0


@pytest.mark.parametrize("length", [1, 3, 4, 10])
def test_lengths_within_and_across_blocks(length):
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    assert all(e <= 1e-6 for e in ia.decompose(model, ids).errors)


def test_padding_does_not_change_the_real_tokens_maps():
    model = tiny()
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB)
    padded = ia.decompose(model, ids, mask)
    alone = ia.decompose(model, ids[2:, 2:])
    for a, b in zip(padded.layers, alone.layers, strict=True):
        assert_close(a.aggregate("abs")[2, 2:, 2:], b.aggregate("abs")[0], 1e-10, a.name)


@pytest.mark.parametrize("variant", ["unified", "no_gate", "recurrence"])
def test_variants_against_the_naive_loops(variant):
    model = tiny()
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    result = ia.decompose(model, ids, mask, variant=variant)
    assert result.layers[1].variant == "unified" and result.layers[1].exact     # softmax attention stays
    for layer in (result.layers[0], result.layers[2]):
        assert layer.variant == variant and layer.exact == (variant == "unified")
        assert_close(layer.matrix, lightning_naive(layer.factors, variant), 1e-12, variant)
        block, offset = lightning_block(layer.factors, slice(2, 7), variant)
        assert offset is None and torch.equal(block, layer.matrix[:, 2:7])
        # the factor the variant leaves out multiplies the gradient reaching its matrix: exact again
        grad = torch.randn(layer.output.shape, dtype=torch.float64)
        f = layer.factors
        inner = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
        out = {"unified": inner, "no_gate": f.gate * inner, "recurrence": f.row_scale("unified") * inner}[variant]
        assert_close(out, layer.output, 1e-6, f"{variant} with the factor it leaves out")
        assert_close(layer.matrix_gradient(grad) * inner, grad * out, 1e-12, "matrix gradient")


@pytest.mark.parametrize("variant", ["unified", "no_gate", "recurrence"])
def test_per_head_aggregates_equal_the_generic_blocks(variant):
    model = tiny()
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    layer = ia.decompose(model, ids, mask, variant=variant).layers[2]
    grad = torch.randn(layer.output.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for how in AGGREGATES:
        layer._aggregates.clear()
        generic = layer.aggregate_by_blocks(how)
        layer._aggregates.clear()
        assert_close(layer.aggregate(how), generic, 1e-12, how)
        assert_close(layer.aggregate_rows([0, 3, -1], how), layer.rows_by_blocks([0, 3, -1], how), 1e-12, how)
    g = layer.matrix_gradient(grad)
    assert_close(layer.attribution(grad), layer.attribution_by_blocks(g), 1e-12, "attribution")


@pytest.mark.parametrize("method", ["attribution", "rollout", "raw", "grad_x_input"])
def test_explain_main_methods(method):
    model = tiny(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    expl = check_explanation(model, ids, mask, method=method)
    if expl is not None and expl.decomposition is not None:
        assert len(expl.decomposition.layers) == 3
