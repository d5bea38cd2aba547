"""Our RWKV-6 model (chunked wkv vs the recurrence, padding, save/load) and its implicit attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import implicit_attention as ia
from implicit_attention.architectures.rwkv6 import VARIANTS, decay_matrices, rwkv6_attention, rwkv6_factors
from implicit_attention.architectures.rwkv6.naive import naive_rwkv6, naive_rwkv6_attention
from implicit_attention.explanations import MATRIX_METHODS
from implicit_attention.hooks import capture, select_layers
from implicit_attention.models.rwkv6 import Rwkv6Config, Rwkv6ForCausalLM, Rwkv6Model
from implicit_attention.models.rwkv6.modeling_rwkv6 import Rwkv6TimeMix, wkv6_chunked, wkv6_recurrent

from conftest import assert_close, check_explanation, left_padded

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def tiny_rwkv6(cls=Rwkv6ForCausalLM, *, dtype=torch.float64, seed: int = 0, **overrides):
    """A tiny RWKV-6 with every parameter randomised: decays, bonus, lerps, LoRAs, norms' biases."""
    settings = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, head_size=8, intermediate_size=24,
                    time_mix_extra_dim=4, time_decay_extra_dim=5, chunk_size=4)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = cls(Rwkv6Config(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("time_decay"):
                param.copy_(torch.randn_like(param) * 0.7)         # log w = -exp(.) around -1
            elif param.dim() == 1 and "ln" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif param.dim() >= 2 and "maa_w" not in name and "decay_w" not in name and name != "time_faaaa":
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
            else:
                param.copy_(torch.randn_like(param) * 0.5)
    return model.to(dtype).eval()


def set_wkv_mode(model, mode: str):
    for module in model.modules():
        if isinstance(module, Rwkv6TimeMix):
            module.wkv_mode = mode


def captured(model, ids, mask, dtype=torch.float64):
    """``[(record, factors)]`` for every time mixing of ``model`` on ``ids``."""
    targets = select_layers(model, None)
    with torch.no_grad(), capture(model, targets) as records:
        model(input_ids=ids, attention_mask=mask)
    return [(r, rwkv6_factors(r.module, r.inputs, r.attention_mask, dtype)) for r in records]


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("dtype,chunk_size", [(torch.float32, 3), (torch.float64, 1), (torch.float64, 4),
                                              (torch.float64, 32)], ids=["f32-3", "f64-1", "f64-4", "f64-32"])
def test_chunked_model_matches_recurrent_reference(dtype, chunk_size):
    model = tiny_rwkv6(dtype=dtype, chunk_size=chunk_size)
    ids, mask = left_padded(batch=3, length=9)
    chunked = model(ids, attention_mask=mask).logits
    set_wkv_mode(model, "recurrent")
    recurrent = model(ids, attention_mask=mask).logits
    assert_close(chunked, recurrent, 1e-5 if dtype == torch.float32 else 1e-12, "chunked vs recurrent")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_wkv6_chunked_is_stable_for_strong_decays(dtype):
    """Log-decays down to -60 per token: ratios of cumulative products would overflow, segments do not."""
    torch.manual_seed(0)
    B, T, H, N = 2, 37, 2, 4
    r, k, v = (torch.randn(B, T, H, N, dtype=dtype) for _ in range(3))
    log_w = -torch.exp(torch.randn(B, T, H, N, dtype=dtype) * 2)
    log_w[:, ::5] = -60.0
    u = torch.randn(H, N, dtype=dtype)
    fast = wkv6_chunked(r, k, v, log_w, u, chunk_size=16)
    assert torch.isfinite(fast).all()
    assert_close(fast, wkv6_recurrent(r, k, v, log_w, u), 1e-5 if dtype == torch.float32 else 1e-12, "wkv6")


def test_recurrence_by_hand():
    """One head, N = 1: o_0 = r0 u k0 v0, o_1 = r1 (k0 v0 + u k1 v1), o_2 = r2 (w1 k0 v0 + k1 v1 + u k2 v2)."""
    r, k, v = (torch.tensor([[[[a]], [[b]], [[c]]]], dtype=torch.float64) for a, b, c in
               ((1.0, 2.0, 3.0), (0.5, -1.0, 2.0), (4.0, 1.0, -2.0)))
    log_w = torch.log(torch.full((1, 3, 1, 1), 0.25, dtype=torch.float64))
    u = torch.tensor([[3.0]], dtype=torch.float64)
    expected = torch.tensor([1 * 3 * 0.5 * 4, 2 * (0.5 * 4 + 3 * -1 * 1), 3 * (0.25 * 0.5 * 4 + -1 * 1 + 3 * 2 * -2)],
                            dtype=torch.float64)
    for fn in (wkv6_recurrent, lambda *a: wkv6_chunked(*a, chunk_size=2)):
        assert_close(fn(r, k, v, log_w, u).flatten(), expected, 1e-14, "by hand")


def test_left_padding_leaves_real_tokens_unchanged():
    model = tiny_rwkv6()
    ids, mask = left_padded(batch=3, length=8)
    batched = model(ids, attention_mask=mask).logits
    for b in range(3):
        alone = model(ids[b:b + 1, b:]).logits
        assert_close(batched[b:b + 1, b:], alone, 1e-12, f"row {b}")


def test_inputs_embeds_and_base_model():
    model = tiny_rwkv6()
    ids = torch.randint(0, 40, (2, 5))
    logits = model(ids).logits
    embeds = model.get_input_embeddings()(ids)
    assert_close(model(inputs_embeds=embeds).logits, logits, 1e-14, "inputs_embeds")
    hidden = model.rwkv(ids, output_hidden_states=True)
    assert len(hidden.hidden_states) == 3
    assert_close(model.head(hidden.last_hidden_state), logits, 1e-14, "base model + head")
    loss = model(ids, labels=ids).loss
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    assert_close(loss, expected, 1e-12, "loss")


def test_save_load_round_trip(tmp_path):
    model = tiny_rwkv6(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Rwkv6Config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is Rwkv6ForCausalLM and loaded.config.model_type == "ia_rwkv6"
    ids = torch.randint(0, 40, (2, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is Rwkv6Model
    assert torch.equal(base(ids).last_hidden_state, model.rwkv(ids).last_hidden_state)


def test_default_init_is_finite_and_layer_dependent():
    model = Rwkv6ForCausalLM(Rwkv6Config(vocab_size=40, hidden_size=16, num_hidden_layers=3, head_size=8))
    first, last = (model.rwkv.blocks[i].attention for i in (0, 2))
    assert not torch.equal(first.time_decay, last.time_decay)
    assert torch.isfinite(model(torch.randint(0, 40, (1, 6))).logits).all()


# -------------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed,length", [(0, 7), (1, 9), (2, 5)])
def test_unified_reconstructs_module_output(dtype, seed, length):
    model = tiny_rwkv6(dtype=dtype, seed=seed)
    ids, mask = left_padded(batch=3, length=length, seed=seed)
    result = ia.decompose(model, ids, mask)
    assert [layer.name for layer in result.layers] == ["rwkv.blocks.0.attention", "rwkv.blocks.1.attention"]
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, 16, length, length) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
        assert torch.count_nonzero(layer.matrix[2, :, :, :2]) == 0       # padding columns carry nothing


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_odd_lengths_and_unbatched_input(length):
    model = tiny_rwkv6(num_hidden_layers=1)
    result = ia.decompose(model, torch.randint(0, 40, (length,)))
    assert result.errors[0] <= 1e-6 and result.layers[0].matrix.shape == (1, 16, length, length)


def test_padding_does_not_change_real_tokens_matrices():
    model = tiny_rwkv6()
    ids, mask = left_padded(batch=3, length=8)
    batched = ia.decompose(model, ids, mask).layers[1]
    alone = ia.decompose(model, ids[2:, 2:]).layers[1]
    assert_close(batched.matrix[2, :, 2:, 2:], alone.matrix[0], 1e-10, "padded vs alone")
    assert_close(batched.offset[2, 2:], alone.offset[0], 1e-10, "offset")


def test_float32_model_decomposed_in_float64():
    model = tiny_rwkv6(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask, dtype=torch.float64)
    assert result.layers[0].matrix.dtype == torch.float64 and max(result.errors) <= 1e-5


def test_strong_decays_float32():
    """Decays near zero (log w ~ -20) and near one in a float32 model still reconstruct."""
    model = tiny_rwkv6(dtype=torch.float32, seed=3)
    with torch.no_grad():
        for block in model.rwkv.blocks:
            block.attention.time_decay[::2] = 3.0
            block.attention.time_decay[1::2] = -6.0
    ids, mask = left_padded(batch=2, length=9, seed=3)
    assert max(ia.decompose(model, ids, mask).errors) <= 1e-4


# ----------------------------------------------------------------------------- fast vs naive
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_operator_matches_naive(variant):
    model = tiny_rwkv6(seed=4)
    ids, mask = left_padded(batch=2, length=6, seed=4)
    result = ia.decompose(model, ids, mask, variant=variant, check=False)
    for layer, (_, factors) in zip(result.layers, captured(model, ids, mask)):
        matrices, values, offset = naive_rwkv6(factors, variant)
        assert_close(layer.matrix, matrices, 1e-12, f"{variant} matrix")
        assert_close(layer.values, values, 1e-12, f"{variant} values")
        if variant == "unified":
            assert_close(layer.offset, offset, 1e-12, "offset")
        else:
            assert torch.count_nonzero(layer.offset) == 0 and torch.count_nonzero(offset) == 0


def test_naive_attention_is_the_recurrence():
    """The slow matrix times v is the paper's recurrence (the model's reference loop) on the same factors."""
    model = tiny_rwkv6(seed=5)
    ids, mask = left_padded(batch=2, length=7, seed=5)
    for record, f in captured(model, ids, mask):
        A = naive_rwkv6_attention(f)
        assert_close(A, rwkv6_attention(f.r, f.k, f.log_w, f.u), 1e-12, "fast attention")
        o = torch.einsum("bhij,bjhn->bihn", A, f.v)
        assert_close(o, wkv6_recurrent(f.r, f.k, f.v, f.log_w, f.u), 1e-12, "A v vs recurrence")
        assert_close(o.flatten(2), record.extra["wkv"].view_as(o.flatten(2)), 1e-12, "A v vs module's wkv")


def test_wkv_variant_is_the_recurrence_alone():
    model = tiny_rwkv6(seed=6)
    ids, mask = left_padded(batch=2, length=7, seed=6)
    targets = select_layers(model, None)
    with torch.no_grad(), capture(model, targets) as records:
        model(input_ids=ids, attention_mask=mask)
    result = ia.decompose(model, ids, mask, variant="wkv")
    for layer, record in zip(result.layers, records):
        assert not layer.exact and layer.error > 1e-2
        scan = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
        assert_close(scan, record.extra["wkv"].view_as(scan), 1e-12, "wkv variant vs ln_x input")


def test_decay_matrices_by_hand():
    inclusive, strict = decay_matrices(torch.log(torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)))
    assert torch.allclose(inclusive, torch.tensor([[1.0, 0, 0], [3, 1, 0], [15, 5, 1]], dtype=torch.float64))
    assert torch.allclose(strict, torch.tensor([[0.0, 0, 0], [1, 0, 0], [3, 1, 0]], dtype=torch.float64))


def test_wkv_matrix_gradient_holds_the_norm_scale_fixed():
    """d score / d o with sigma a constant, against autograd through g (gamma (o - mean) / sigma + beta)."""
    model = tiny_rwkv6(seed=7)
    ids = torch.randint(1, 40, (2, 5))
    layer = ia.decompose(model, ids, variant="wkv").layers[0]
    o = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values).requires_grad_(True)
    heads = o.view(2, 5, 2, 8)
    normed = (heads - heads.mean(-1, keepdim=True)) * layer.inv_sigma[..., None]
    out = layer.gate * (normed.flatten(2) * layer.gn_weight + layer.factors.gn_bias)
    grad_out = torch.randn_like(out)
    (expected,) = torch.autograd.grad((out * grad_out).sum(), o)
    assert_close(layer.matrix_gradient(grad_out), expected, 1e-12, "matrix gradient")
    assert_close(out.detach(), layer.output, 1e-10, "fixed-sigma rebuild equals the module")


@pytest.mark.parametrize("variant", VARIANTS)
def test_factorised_aggregates_match_the_channel_mean(variant):
    model = tiny_rwkv6(seed=9)
    ids, mask = left_padded(batch=2, length=7, seed=9)
    for layer in ia.decompose(model, ids, mask, variant=variant, check=False).layers:
        M = layer.matrix
        for how, reduced in (("mean", M), ("abs", M.abs()), ("pos", M.clamp(min=0))):
            assert_close(layer.aggregate(how), reduced.mean(1), 1e-12, f"{variant} {how}")
            assert_close(layer.aggregate_rows([-1, 2], how), reduced.mean(1)[:, [-1, 2]], 1e-12, f"{how} rows")
        assert_close(layer.aggregate(channel=5), M[:, 5], 1e-14, "one channel")


# ---------------------------------------------------------------------------------- explain
@pytest.mark.parametrize("method,variant", [(m, "unified") for m in ia.METHODS] + [(m, "wkv") for m in MATRIX_METHODS])
def test_every_method_and_variant_gives_finite_relevance(method, variant):
    model = tiny_rwkv6(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)


def test_raw_relevance_is_the_aggregated_maps_last_row():
    model = tiny_rwkv6()
    ids, mask = left_padded(batch=2, length=6)
    maps = ia.decompose(model, ids, mask).aggregate("abs")
    assert_close(ia.explain(model, ids, mask, method="raw"), maps[:, :, -1, :].mean(0) * mask, 1e-12, "raw")


@pytest.mark.parametrize("length,strength", [(1, 1.0), (7, 1.0), (37, 1.0), (70, 30.0), (130, 1.0)])
def test_tiled_attention_equals_the_direct_one(length, strength):
    """The per-head matrices by tiles (the layers' path) against the direct masked cumulative sums, with
    decays strong enough that long products underflow."""
    from implicit_attention.architectures.rwkv6.operator import rwkv6_attention, rwkv6_attention_tiled

    generator = torch.Generator().manual_seed(length)
    r, k = (torch.randn(2, length, 3, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    log_w = -torch.rand(2, length, 3, 4, dtype=torch.float64, generator=generator) * strength
    u = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    assert_close(rwkv6_attention_tiled(r, k, log_w, u), rwkv6_attention(r, k, log_w, u), 1e-13, str(length))
