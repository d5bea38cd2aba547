"""Our RetNet: parallel forward vs the paper's recurrence, save/load, exact decomposition, fast vs naive, explain."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import implicit_attention as ia
from implicit_attention.architectures.retnet import VARIANTS, retnet_block
from implicit_attention.architectures.retnet.naive import retnet_naive
from implicit_attention.models.retnet import RetNetConfig, RetNetForCausalLM, RetNetModel, RetNetRetention

from conftest import assert_close, check_explanation, left_padded

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def tiny_retnet(*, seed: int = 0, dtype=torch.float64, model_cls=RetNetForCausalLM, **overrides):
    """A tiny RetNet with every parameter randomised (biases, group-norm affine, norms)."""
    settings = dict(vocab_size=40, hidden_size=8, num_heads=2, num_hidden_layers=2, value_factor=2,
                    intermediate_size=12, attention_bias=True)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(RetNetConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if "norm" not in name else 1.0))
    return model.to(dtype).eval()


def set_reference(model, on: bool):
    for module in model.modules():
        if isinstance(module, RetNetRetention):
            module.use_recurrent_reference = on


@pytest.mark.parametrize("length", [1, 4, 7])
def test_parallel_forward_matches_recurrence(length):
    model = tiny_retnet(seed=length)
    ids, mask = left_padded(batch=3, length=length, seed=length)
    parallel = model(ids, attention_mask=mask).logits
    set_reference(model, True)
    recurrent = model(ids, attention_mask=mask).logits
    assert_close(parallel, recurrent, 1e-10, "parallel vs recurrent logits")
    # one mixer alone, on a random input
    set_reference(model, False)
    mixer = model.model.layers[1].attn
    x = torch.randn(2, length, 8, dtype=torch.float64)
    assert_close(mixer(x), mixer.recurrent_forward(x), 1e-10, "mixer")


def test_padding_tokens_change_nothing():
    """A left-padded row gives the real tokens the logits of the same sentence alone."""
    model = tiny_retnet()
    ids, mask = left_padded(batch=3, length=7)
    batched = model(ids, attention_mask=mask).logits[2, 2:]
    alone = model(ids[2:, 2:]).logits[0]
    assert_close(batched, alone, 1e-10, "padded vs alone")


def test_save_load_round_trip(tmp_path):
    model = tiny_retnet(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RetNetConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RetNetForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is RetNetModel
    assert torch.equal(base(ids, attention_mask=mask).last_hidden_state,
                       model.model(ids, attention_mask=mask).last_hidden_state)


def test_inputs_embeds_and_input_embeddings():
    model = tiny_retnet()
    ids, mask = left_padded(batch=2, length=6)
    embeds = model.get_input_embeddings()(ids)
    assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                 1e-14, "inputs_embeds")
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("heads,value_factor", [(2, 2), (4, 1), (1, 2)])
def test_unified_reconstructs_module_output(dtype, bias, heads, value_factor):
    model = tiny_retnet(dtype=dtype, attention_bias=bias, num_heads=heads, value_factor=value_factor, seed=heads)
    ids, mask = left_padded(batch=3, length=7, seed=heads)
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) == 2
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, value_factor * 8, 7, 7) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
        assert torch.count_nonzero(layer.matrix[2, :, :, :2]) == 0          # padding columns carry nothing


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_odd_lengths_and_unbatched_input(length):
    model = tiny_retnet()
    result = ia.decompose(model, torch.randint(0, 40, (length,)))
    assert max(result.errors) <= 1e-6
    assert result.layers[0].matrix.shape[-1] == length


def test_float32_model_decomposed_in_float64():
    model = tiny_retnet(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask, dtype=torch.float64)
    assert result.layers[0].matrix.dtype == torch.float64 and max(result.errors) <= 1e-5


def test_bfloat16_model_is_computed_in_float32():
    model = tiny_retnet(dtype=torch.bfloat16)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask)
    assert result.layers[0].matrix.dtype == torch.float32 and max(result.errors) <= 5e-2


def test_padding_does_not_change_real_tokens_matrices():
    model = tiny_retnet()
    ids, mask = left_padded(batch=3, length=8)
    batched = ia.decompose(model, ids, mask).layers[1]
    alone = ia.decompose(model, ids[2:, 2:]).layers[1]
    assert_close(batched.matrix[2, :, 2:, 2:], alone.matrix[0], 1e-10, "matrices")
    assert_close(batched.values[2, 2:], alone.values[0], 1e-10, "values")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("heads", [1, 2])
def test_fast_operator_matches_naive(variant, heads):
    model = tiny_retnet(num_heads=heads, seed=3)
    ids, mask = left_padded(batch=2, length=6, seed=heads)
    for layer in ia.decompose(model, ids, mask, variant=variant).layers:
        expected, expected_offset = retnet_naive(layer.factors, variant)
        assert_close(layer.matrix, expected, 1e-12, f"{variant} matrix")
        assert_close(layer.offset, expected_offset, 1e-12, f"{variant} offset")
        # blocks of channels that cut through heads give the same matrices
        parts = torch.cat([retnet_block(layer.factors, slice(s, min(s + 3, layer.channels)), variant)[0]
                           for s in range(0, layer.channels, 3)], dim=1)
        assert torch.equal(parts, layer.matrix)


def test_naive_retention_times_v_is_the_recurrence():
    """The naive recurrence-only matrices times v equal the paper's state recurrence y_n = q_n S_n."""
    model = tiny_retnet()
    ids, mask = left_padded(batch=2, length=6)
    layer = ia.decompose(model, ids, mask, variant="recurrence").layers[0]
    f = layer.factors
    A, _ = retnet_naive(f, "recurrence")
    batch, length, H, V = f.v.shape
    y = torch.zeros(batch, length, H, V, dtype=torch.float64)
    for b in range(batch):
        for h in range(H):
            state = torch.zeros(f.q.shape[-1], V, dtype=torch.float64)
            for n in range(length):
                state = (1 - 2.0 ** (-5 - h)) * state + torch.outer(f.k[b, n, h], f.v[b, n, h])
                y[b, n, h] = f.q[b, n, h] @ state
    assert_close(torch.einsum("bcij,bjc->bic", A, layer.values), y.flatten(2), 1e-12, "A v vs recurrence")


def test_recurrence_variant_is_inexact_and_rebuilds_through_norm_and_gate():
    model = tiny_retnet()
    ids, mask = left_padded(batch=2, length=7)
    layer = ia.decompose(model, ids, mask, variant="recurrence").layers[1]
    assert not layer.exact and layer.error > 1e-2
    f = layer.factors
    y = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values).unflatten(-1, (f.v.shape[2], -1))
    centred = (y - y.mean(-1, keepdim=True)).flatten(2)
    rebuilt = f.row_scale * centred + f.gate * f.norm_bias
    assert_close(rebuilt, layer.output, 1e-10, "gate * groupnorm(A v)")


def test_recurrence_matrix_gradient_is_the_vjp_through_norm_and_gate():
    model = tiny_retnet()
    ids = torch.randint(1, 40, (2, 6))
    layer = ia.decompose(model, ids, variant="recurrence").layers[0]
    f = layer.factors
    y = torch.randn_like(layer.values, requires_grad=True)
    grouped = y.unflatten(-1, (f.v.shape[2], -1))
    out = f.row_scale * (grouped - grouped.mean(-1, keepdim=True)).flatten(2)
    grad = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, y, grad)
    assert_close(layer.matrix_gradient(grad), expected, 1e-12, "matrix_gradient")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("how", ["mean", "abs", "pos"])
def test_factorised_head_aggregates_match_channel_blocks(variant, how):
    model = tiny_retnet()
    ids, mask = left_padded(batch=2, length=7)
    layer = ia.decompose(model, ids, mask, variant=variant).layers[0]
    generic = layer.aggregate_by_blocks(how)
    layer._aggregates.clear()
    assert_close(layer.aggregate(how), generic, 1e-12, f"{how} aggregate")
    assert_close(layer.aggregate_rows([-1, 2], how), generic[:, [-1, 2]], 1e-12, "rows")


@pytest.mark.parametrize("method", ia.METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_explain_every_method(method, variant):
    model = tiny_retnet(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)


def test_attribution_uses_the_true_gradient_of_the_layer_output():
    torch.manual_seed(0)
    model = tiny_retnet(num_hidden_layers=1)
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
