"""Short gated convolutions (LFM2, LFM2-MoE, LFM3) and their attention layers as exact implicit attention.

decompose() against the modules' own forward (every layer of the model, in model order: short convs
and softmax attention, LFM3's sliding-window and gated attention), left padding (the short conv
zeroes its padded input; with an in_proj bias the padding leaks through the conv and explain refuses
padded batches), the variants against the slow reference, the banded aggregates, rows and
attribution against the generic channel blocks, and explain with the main methods.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import AGGREGATES, find_layers
from implicit_attention.architectures.attention import AttentionLayerDecomposition
from implicit_attention.architectures.registry import padding_leaks
from implicit_attention.architectures.shortconv import ShortConvLayerDecomposition, shortconv_block
from implicit_attention.architectures.shortconv.naive import shortconv_naive

from conftest import assert_close, check_explanation, left_padded

tf.logging.set_verbosity_error()

TOL = {torch.float32: 1e-5, torch.float64: 1e-6}
VOCAB = 40
IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: tiny stock configs: short convs around a GQA attention layer (LFM3: a gated full and a gated
#: sliding-window attention, window 3 < the lengths tested)
CONFIGS = {
    "Lfm2ForCausalLM": (tf.Lfm2Config, tf.Lfm2ForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, conv_L_cache=3,
        layer_types=["conv", "full_attention", "conv"])),
    "Lfm2MoeForCausalLM": (tf.Lfm2MoeConfig, tf.Lfm2MoeForCausalLM, dict(
        hidden_size=8, intermediate_size=16, moe_intermediate_size=8, num_experts=2, num_experts_per_tok=1,
        num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1, conv_L_cache=3,
        layer_types=["conv", "full_attention", "conv"])),
    "Lfm3ForCausalLM": (tf.Lfm3Config, tf.Lfm3ForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        conv_L_cache=4, sliding_window=3, layer_types=["conv", "full_attention", "sliding_attention", "conv"])),
}


def randomise(model: torch.nn.Module) -> None:
    """Every parameter non-trivial: biases and constant-initialised weights (norms) perturbed."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or param.numel() == 1 or bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.5)


def tiny(class_name: str, *, dtype=torch.float64, attn: str = "sdpa", bias: bool = False, seed: int = 0):
    config_cls, model_cls, settings = CONFIGS[class_name]
    torch.manual_seed(seed)
    config = config_cls(**IDS, conv_bias=bias, num_hidden_layers=len(settings["layer_types"]), **settings)
    config._experts_implementation = "eager"  # the grouped-mm experts refuse float64
    model = model_cls(config)
    randomise(model)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_every_layer_reconstructs_module_output(class_name, dtype, attn):
    model = tiny(class_name, dtype=dtype, attn=attn)
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB)
    if attn == "eager" and dtype == torch.float64:
        mask = None  # the stock eager softmax in float32 turns a float64 finfo.min mask into NaN rows
    result = ia.decompose(model, ids, mask)
    found = find_layers(model)
    assert [layer.name for layer in result.layers] == [name for name, _, _ in found]    # every layer, model order
    kinds = [type(layer) for layer in result.layers]
    assert kinds.count(ShortConvLayerDecomposition) == 2 and AttentionLayerDecomposition in kinds
    # eager attention runs its softmax in float32 even for float64 models: its own rounding (~5e-8)
    tol = 1e-7 if (attn == "eager" and dtype == torch.float64) else TOL[dtype]
    for layer in result.layers:
        assert layer.exact and layer.error <= tol, (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, tol, layer.name)
        if mask is not None:
            assert torch.equal(layer.mask, mask.to(dtype))


@pytest.mark.parametrize("class_name", ["Lfm2ForCausalLM", "Lfm3ForCausalLM"])
def test_biases_go_to_the_offset_and_padding_leaks_through_them(class_name):
    """With conv_bias the in_proj bias reaches padded tokens' B~ * x, which the conv carries into real tokens:
    the decomposition is still exact (those values are in ``x``), and explain refuses padded batches."""
    model = tiny(class_name, bias=True)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    result = ia.decompose(model, ids)
    conv = [layer for layer in result.layers if isinstance(layer, ShortConvLayerDecomposition)]
    assert all(layer.error <= 1e-6 for layer in result.layers), result.errors
    assert all(torch.count_nonzero(layer.offset) > 0 for layer in conv)
    f = conv[0].factors
    assert_close(conv[0].offset, f.c * f.bias, 1e-15, "offset = C~ * b")
    assert len(padding_leaks(model)) == 2 and not padding_leaks(tiny(class_name))
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    assert max(ia.decompose(model, ids, mask).errors) <= 1e-6


@pytest.mark.parametrize("length", [1, 2, 5])
def test_odd_lengths_and_unbatched_input(length):
    model = tiny("Lfm3ForCausalLM")
    ids = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    result = ia.decompose(model, ids)
    assert all(e <= 1e-6 for e in result.errors) and result.layers[0].matrix.shape[-2:] == (length, length)


def test_padding_does_not_change_the_real_tokens_maps():
    model = tiny("Lfm2ForCausalLM")
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB)
    padded = ia.decompose(model, ids, mask)
    alone = ia.decompose(model, ids[2:, 2:])
    for a, b in zip(padded.layers, alone.layers, strict=True):
        assert_close(a.aggregate("abs")[2, 2:, 2:], b.aggregate("abs")[0], 1e-10, a.name)


# ------------------------------------------------------------------------------------ variants
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("variant", ["unified", "no_gate"])
def test_variants_against_the_naive_loops(variant, bias):
    model = tiny("Lfm2ForCausalLM", bias=bias)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    result = ia.decompose(model, ids, None if bias else mask, variant=variant)
    layer = result.layers[0]
    assert layer.variant == variant and layer.exact == (variant == "unified")
    assert result.layers[1].variant == "unified" and result.layers[1].exact       # the attention stays as it is
    matrices, offset = shortconv_naive(layer.factors, variant)
    assert_close(layer.matrix, matrices, 1e-13, variant)
    if variant == "unified":
        if bias:
            assert_close(layer.offset, offset, 1e-13, "offset")
        assert layer.error <= 1e-6
    else:
        assert layer.error > 1e-2 and torch.count_nonzero(layer.offset) == 0
    # blocks of any width agree
    block, _ = shortconv_block(layer.factors, slice(3, 7), variant)
    assert_close(block, matrices[:, 3:7], 1e-13, "block")


def test_no_gate_gradient_puts_the_output_gate_back():
    """``out = C~ ⊙ (M (B~ ⊙ x) + b)``: the no_gate matrix gets the gradient times ``C~``."""
    model = tiny("Lfm2ForCausalLM")
    layer = ia.decompose(model, torch.tensor([[3, 5, 7, 9]]), variant="no_gate").layers[0]
    grad = torch.randn(layer.output.shape, dtype=torch.float64)
    assert_close(layer.matrix_gradient(grad), grad * layer.factors.c, 1e-15, "gradient")


# ------------------------------------------------------------------------------------ fast paths
@pytest.mark.parametrize("variant", ["unified", "no_gate"])
def test_banded_aggregates_rows_and_attribution_equal_the_generic_blocks(variant):
    model = tiny("Lfm3ForCausalLM", bias=True)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    for layer in ia.decompose(model, ids, variant=variant).layers:
        if not isinstance(layer, ShortConvLayerDecomposition):
            continue
        grad = torch.randn(layer.output.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        for how in AGGREGATES:
            layer._aggregates.clear()
            generic = layer.aggregate_by_blocks(how)
            layer._aggregates.clear()
            assert_close(layer.aggregate(how), generic, 1e-13, how)
            assert_close(layer.aggregate_rows([0, 4, -1], how), layer.rows_by_blocks([0, 4, -1], how), 1e-13, how)
        assert torch.count_nonzero(torch.triu(layer.aggregate("abs"), 1)) == 0
        assert torch.count_nonzero(torch.tril(layer.aggregate("abs"), -layer.factors.width)) == 0   # the band
        g = layer.matrix_gradient(grad)
        for signed in (False, True):
            assert_close(layer.attribution(grad, signed=signed), layer.attribution_by_blocks(g, signed), 1e-13,
                         f"attribution signed={signed}")
        layer.block_bytes = 1                                    # one channel at a time: the same
        layer._aggregates.clear()
        assert_close(layer.aggregate("pos"), layer.aggregate_by_blocks("pos"), 1e-13, "one channel at a time")


def test_gated_attention_fast_paths_equal_the_generic_blocks():
    model = tiny("Lfm3ForCausalLM")
    ids, mask = left_padded(batch=2, length=7, vocab=VOCAB)
    for layer in ia.decompose(model, ids, mask).layers:
        if not isinstance(layer, AttentionLayerDecomposition):
            continue
        assert layer.gate is not None and torch.all(layer.gate > 0)
        for how in AGGREGATES:
            layer._aggregates.clear()
            generic = layer.aggregate_by_blocks(how)
            layer._aggregates.clear()
            assert_close(layer.aggregate(how), generic, 1e-12, how)
            assert_close(layer.aggregate_rows([1, -1], how), layer.rows_by_blocks([1, -1], how), 1e-12, how)
        # one gate per head: every channel of a head has the same row scale
        heads = layer.gate.unflatten(-1, (layer.heads, layer.head_dim))
        assert torch.equal(heads, heads[..., :1].expand_as(heads))


# ------------------------------------------------------------------------------------ explain
@pytest.mark.parametrize("method", ["attribution", "rollout", "raw", "grad_x_input"])
@pytest.mark.parametrize("class_name", ["Lfm2ForCausalLM", "Lfm3ForCausalLM"])
def test_explain_main_methods(class_name, method):
    model = tiny(class_name, dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    expl = check_explanation(model, ids, mask, method=method)
    if expl is not None and expl.decomposition is not None:
        assert len(expl.decomposition.layers) == len(find_layers(model))
