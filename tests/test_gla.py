"""Our GLA: chunkwise forward vs the paper's recurrence, save/load, exact decomposition, fast vs naive, explain."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import implicit_attention as ia
from implicit_attention.architectures.gla import VARIANTS, gla_block, gla_heads, gla_heads_tiled
from implicit_attention.architectures.gla.naive import gla_naive
from implicit_attention.hooks import capture, select_layers
from implicit_attention.models.gla import GLAAttention, GLAConfig, GLAForCausalLM, GLAModel

from conftest import assert_close, check_explanation, check_long_fast_mean, fresh_aggregates, left_padded

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def tiny_gla(*, seed: int = 0, dtype=torch.float64, model_cls=GLAForCausalLM, **overrides):
    """A tiny GLA with every parameter randomised (biases, gate projections, group-norm affine, norms).

    ``gate_logit_normalizer=2`` keeps the decays far from 1 so that they matter on a few tokens.
    """
    settings = dict(vocab_size=40, hidden_size=8, num_heads=2, num_hidden_layers=2, expand_k=1.0, expand_v=1.0,
                    gate_low_rank_dim=3, gate_logit_normalizer=2.0, intermediate_size=12, attention_bias=True,
                    chunk_size=3)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(GLAConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.5 if "norm" not in name else 1.0))
    return model.to(dtype).eval()


def set_reference(model, on: bool):
    for module in model.modules():
        if isinstance(module, GLAAttention):
            module.use_recurrent_reference = on


@pytest.mark.parametrize("length,chunk_size", [(1, 3), (5, 64), (7, 3), (9, 2), (8, 1)])
def test_chunked_forward_matches_recurrence(length, chunk_size):
    model = tiny_gla(seed=length, chunk_size=chunk_size)
    ids, mask = left_padded(batch=3, length=length, seed=length)
    chunked = model(ids, attention_mask=mask).logits
    set_reference(model, True)
    recurrent = model(ids, attention_mask=mask).logits
    assert_close(chunked, recurrent, 1e-10, "chunked vs recurrent logits")
    set_reference(model, False)
    mixer = model.model.layers[1].attn
    x = torch.randn(2, length, 8, dtype=torch.float64)
    assert_close(mixer(x), mixer.recurrent_forward(x), 1e-10, "mixer")


def test_decays_are_sigmoid_to_the_one_over_tau():
    """alpha = sigmoid(.)^(1/tau) per key dim: the decay of a 2-token state matches it by hand."""
    model = tiny_gla(num_hidden_layers=1)
    mixer = model.model.layers[0].attn
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    q, k, v, g, logits = mixer._project(x, None)
    alpha = torch.sigmoid(logits[0, 1]) ** 0.5                      # tau = 2
    state = alpha[..., None] * (k[0, 0, :, :, None] * v[0, 0, :, None, :]) + k[0, 1, :, :, None] * v[0, 1, :, None, :]
    y = torch.einsum("hk,hkv->hv", q[0, 1], state)
    out = mixer.o_proj(torch.nn.functional.silu(g[0, 1]) * mixer.group_norm(y[None, None])[0, 0])
    assert_close(mixer(x)[0, 1], out, 1e-12, "two tokens by hand")


def test_padding_tokens_change_nothing():
    model = tiny_gla()
    ids, mask = left_padded(batch=3, length=7)
    assert_close(model(ids, attention_mask=mask).logits[2, 2:], model(ids[2:, 2:]).logits[0], 1e-10, "padded vs alone")


def test_save_load_round_trip(tmp_path):
    model = tiny_gla(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), GLAConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is GLAForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is GLAModel
    assert torch.equal(base(ids, attention_mask=mask).last_hidden_state,
                       model.model(ids, attention_mask=mask).last_hidden_state)


def test_inputs_embeds_and_input_embeddings():
    model = tiny_gla()
    ids, mask = left_padded(batch=2, length=6)
    embeds = model.get_input_embeddings()(ids)
    assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                 1e-14, "inputs_embeds")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("heads,expand_k,bias", [(2, 1.0, True), (4, 0.5, False), (1, 0.5, True)],
                         ids=["h2", "h4-k0.5-nobias", "h1"])
def test_unified_reconstructs_module_output(dtype, heads, expand_k, bias):
    model = tiny_gla(dtype=dtype, num_heads=heads, expand_k=expand_k, attention_bias=bias, seed=heads)
    ids, mask = left_padded(batch=3, length=7, seed=heads)
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) == 2
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, 8, 7, 7) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
        assert torch.count_nonzero(layer.matrix[2, :, :, :2]) == 0


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_odd_lengths_and_unbatched_input(length):
    model = tiny_gla()
    result = ia.decompose(model, torch.randint(0, 40, (length,)))
    assert max(result.errors) <= 1e-6
    assert result.layers[0].matrix.shape[-1] == length


def test_float32_model_decomposed_in_float64():
    model = tiny_gla(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask, dtype=torch.float64)
    assert result.layers[0].matrix.dtype == torch.float64 and max(result.errors) <= 1e-5


def test_bfloat16_model_is_computed_in_float32():
    model = tiny_gla(dtype=torch.bfloat16)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask)
    assert result.layers[0].matrix.dtype == torch.float32 and max(result.errors) <= 5e-2


def test_padding_does_not_change_real_tokens_matrices():
    model = tiny_gla()
    ids, mask = left_padded(batch=3, length=8)
    batched = ia.decompose(model, ids, mask).layers[1]
    alone = ia.decompose(model, ids[2:, 2:]).layers[1]
    assert_close(batched.matrix[2, :, 2:, 2:], alone.matrix[0], 1e-10, "matrices")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("heads", [1, 2])
def test_fast_operator_matches_naive(variant, heads):
    model = tiny_gla(num_heads=heads, seed=3)
    ids, mask = left_padded(batch=2, length=6, seed=heads)
    for layer in ia.decompose(model, ids, mask, variant=variant).layers:
        expected, expected_offset = gla_naive(layer.factors, variant)
        assert_close(layer.matrix, expected, 1e-12, f"{variant} matrix")
        assert_close(layer.offset, expected_offset, 1e-12, f"{variant} offset")
        parts = torch.cat([gla_block(layer.factors, slice(s, min(s + 3, layer.channels)), variant)[0]
                           for s in range(0, layer.channels, 3)], dim=1)
        assert torch.equal(parts, layer.matrix)


def test_naive_matrix_times_v_is_the_recurrence():
    """The naive recurrence-only matrices times v equal S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t."""
    model = tiny_gla()
    ids, mask = left_padded(batch=2, length=6)
    layer = ia.decompose(model, ids, mask, variant="recurrence").layers[0]
    f = layer.factors
    A, _ = gla_naive(f, "recurrence")
    batch, length, H, V = f.v.shape
    alpha = f.log_alpha.exp()
    y = torch.zeros(batch, length, H, V, dtype=torch.float64)
    for b in range(batch):
        for h in range(H):
            state = torch.zeros(f.q.shape[-1], V, dtype=torch.float64)
            for t in range(length):
                state = alpha[b, t, h][:, None] * state + torch.outer(f.k[b, t, h], f.v[b, t, h])
                y[b, t, h] = f.q[b, t, h] @ state
    assert_close(torch.einsum("bcij,bjc->bic", A, layer.values), y.flatten(2), 1e-12, "A v vs recurrence")


def test_recurrence_variant_is_inexact_and_rebuilds_through_norm_and_gate():
    model = tiny_gla()
    ids, mask = left_padded(batch=2, length=7)
    layer = ia.decompose(model, ids, mask, variant="recurrence").layers[1]
    assert not layer.exact and layer.error > 1e-2
    f = layer.factors
    y = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values).unflatten(-1, (f.v.shape[2], -1))
    rebuilt = f.row_scale * (y - y.mean(-1, keepdim=True)).flatten(2) + f.gate * f.norm_bias
    assert_close(rebuilt, layer.output, 1e-10, "gate * groupnorm(A v)")
    y = torch.randn_like(layer.values, requires_grad=True)
    grouped = y.unflatten(-1, (f.v.shape[2], -1))
    out = f.row_scale * (grouped - grouped.mean(-1, keepdim=True)).flatten(2)
    grad = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, y, grad)
    assert_close(layer.matrix_gradient(grad), expected, 1e-12, "matrix_gradient")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("how", ["mean", "abs", "pos"])
def test_factorised_head_aggregates_match_channel_blocks(variant, how):
    model = tiny_gla()
    ids, mask = left_padded(batch=2, length=7)
    layer = ia.decompose(model, ids, mask, variant=variant).layers[0]
    generic = layer.aggregate_by_blocks(how)
    layer._aggregates.clear()
    assert_close(layer.aggregate(how), generic, 1e-12, f"{how} aggregate")
    assert_close(layer.aggregate_rows([-1, 2], how), generic[:, [-1, 2]], 1e-12, "rows")


@pytest.mark.parametrize("method", ia.METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_explain_every_method(method, variant):
    model = tiny_gla(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)


def test_attribution_uses_the_true_gradient_of_the_layer_output():
    model = tiny_gla(num_hidden_layers=1)
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


def test_hybrid_of_our_models_in_one_rollout():
    """Layers of different registered kinds in one model are found in model order and explained together."""
    from implicit_attention.models.hgrn import HGRNConfig
    from implicit_attention.models.hgrn.modeling_hgrn import HGRNBlock

    model = tiny_gla(num_hidden_layers=2)
    torch.manual_seed(1)
    block = HGRNBlock(HGRNConfig(vocab_size=40, hidden_size=8, intermediate_size=12, conv_size=3), 1).double()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    model.model.layers[1] = block.eval()
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask)
    assert [type(layer).__name__ for layer in result.layers] == ["GLALayerDecomposition", "HGRNLayerDecomposition"]
    assert max(result.errors) <= 1e-6
    for method in ("rollout", "attribution"):
        check_explanation(model, ids, mask, method=method)



@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("heads,expand_k", [(1, 1.0), (4, 0.5)], ids=["h1", "h4-k0.5"])
def test_tiled_aggregates_match_channel_blocks_on_longer_inputs(variant, heads, expand_k):
    """The factorised mean over all key dims, the tiled head matrices (abs, pos) and rows, float64."""
    model = tiny_gla(num_heads=heads, expand_k=expand_k, seed=heads)
    ids, mask = left_padded(batch=3, length=37, seed=heads)
    for layer in ia.decompose(model, ids, mask, variant=variant).layers:
        f = layer.factors
        assert_close(gla_heads_tiled(f, slice(None)), gla_heads(f, slice(None)), 1e-12, "head matrices")
        for how in ("mean", "abs", "pos"):
            generic, fast = fresh_aggregates(layer, how)
            assert_close(fast, generic, 1e-12, f"{variant} {how}")
            generic, fast = fresh_aggregates(layer, how, rows=[0, 4, -1])
            assert_close(fast, generic, 1e-12, f"{variant} {how} rows")


def test_fast_mean_float32_and_long_inputs_with_strong_decays():
    """float32 fast maps against float32 blocks, and at L = 1024 (decays summing far past exp's range)
    against float64 blocks, with no inf or NaN."""
    model = tiny_gla(dtype=torch.float32, seed=1)
    ids, mask = left_padded(batch=2, length=37)
    for layer in ia.decompose(model, ids, mask).layers:
        for how in ("mean", "abs"):
            generic, fast = fresh_aggregates(layer, how)
            assert_close(fast, generic, 1e-5, f"float32 {how}")

    model = tiny_gla(seed=2, gate_logit_normalizer=0.5)
    ids = torch.randint(1, 40, (1, 1024), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture(model, select_layers(model, None)) as records:
        model(input_ids=ids)
    for record in records:
        f64 = record.architecture.build(record, variant="unified", dtype=torch.float64, index=0)
        f32 = record.architecture.build(record, variant="unified", dtype=torch.float32, index=0)
        assert float(f64.factors.log_alpha.sum(dim=1).neg().max()) > 1000      # far past exp's range
        check_long_fast_mean(f64, f32)
