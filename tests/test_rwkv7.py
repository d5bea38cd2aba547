"""Our RWKV-7 model (chunked WY wkv vs the recurrence, padding, save/load) and its implicit attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import implicit_attention as ia
from implicit_attention.architectures.rwkv7 import VARIANTS, rwkv7_attention, rwkv7_factors
from implicit_attention.architectures.rwkv7.naive import naive_rwkv7, naive_rwkv7_attention, naive_transition
from implicit_attention.explanations import MATRIX_METHODS
from implicit_attention.hooks import capture, select_layers
from implicit_attention.models.rwkv7 import Rwkv7Config, Rwkv7ForCausalLM, Rwkv7Model
from implicit_attention.models.rwkv7.modeling_rwkv7 import Rwkv7TimeMix, wkv7_chunked, wkv7_recurrent

from conftest import assert_close, check_explanation, left_padded

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def tiny_rwkv7(cls=Rwkv7ForCausalLM, *, dtype=torch.float64, seed: int = 0, **overrides):
    """A tiny RWKV-7 with every parameter randomised: decays, learning rates, value residual, gates, norms."""
    settings = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, head_size=8, intermediate_size=24,
                    decay_low_rank_dim=4, a_low_rank_dim=5, v_low_rank_dim=3, gate_low_rank_dim=6, chunk_size=4)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = cls(Rwkv7Config(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("ln" in name and name.endswith("weight") or name.endswith("k_k")):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif param.dim() >= 2 and not name.endswith("r_k"):
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
            else:
                param.copy_(torch.randn_like(param) * 0.7)
    return model.to(dtype).eval()


def set_wkv_mode(model, mode: str):
    for module in model.modules():
        if isinstance(module, Rwkv7TimeMix):
            module.wkv_mode = mode


def captured(model, ids, mask, dtype=torch.float64):
    """``[(record, factors)]`` for every time mixing of ``model`` on ``ids``."""
    targets = select_layers(model, None)
    with torch.no_grad(), capture(model, targets) as records:
        model(input_ids=ids, attention_mask=mask)
    return [(r, rwkv7_factors(r.module, r.inputs, r.attention_mask, r.kwargs.get("v_first"), dtype))
            for r in records]


def random_delta_rule(dtype, B=2, T=37, H=2, N=4, seed=0):
    """Inputs of the wkv with RWKV-7's ranges: unit removal keys, rates in (0, 1), decays in (0.545, 1)."""
    torch.manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, dtype=dtype) for _ in range(3))
    kappa = torch.nn.functional.normalize(torch.randn(B, T, H, N, dtype=dtype), dim=-1)
    rate = torch.sigmoid(torch.randn(B, T, H, N, dtype=dtype) * 3)
    log_w = -torch.exp(-torch.nn.functional.softplus(-torch.randn(B, T, H, N, dtype=dtype) * 3) - 0.5)
    return r, log_w, k, v, -kappa, kappa * rate


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("dtype,chunk_size", [(torch.float32, 3), (torch.float64, 1), (torch.float64, 4),
                                              (torch.float64, 16)], ids=["f32-3", "f64-1", "f64-4", "f64-16"])
def test_chunked_model_matches_recurrent_reference(dtype, chunk_size):
    model = tiny_rwkv7(dtype=dtype, chunk_size=chunk_size)
    ids, mask = left_padded(batch=3, length=9)
    chunked = model(ids, attention_mask=mask).logits
    set_wkv_mode(model, "recurrent")
    recurrent = model(ids, attention_mask=mask).logits
    assert_close(chunked, recurrent, 1e-5 if dtype == torch.float32 else 1e-12, "chunked vs recurrent")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("chunk_size", [5, 16, 64])
def test_wkv7_chunked_matches_the_recurrence(dtype, chunk_size):
    args = random_delta_rule(dtype)
    fast = wkv7_chunked(*args, chunk_size=chunk_size)
    assert_close(fast, wkv7_recurrent(*args), 1e-5 if dtype == torch.float32 else 1e-12, "wkv7")


def test_recurrence_by_hand():
    """N = 1: G_t = w_t + a_t b_t, S_t = S_{t-1} G_t + v_t k_t, o_t = S_t r_t."""
    t = lambda *x: torch.tensor(x, dtype=torch.float64).view(1, len(x), 1, 1)  # noqa: E731
    r, k, v, a, b = t(1.0, 2.0, 3.0), t(0.5, -1.0, 2.0), t(4.0, 1.0, -2.0), t(-1.0, -0.5, -1.0), t(0.5, 0.2, 0.4)
    log_w = torch.log(t(0.9, 0.8, 0.5))
    s1 = 4.0 * 0.5
    s2 = s1 * (0.8 - 0.5 * 0.2) + 1.0 * -1.0
    s3 = s2 * (0.5 - 1.0 * 0.4) + -2.0 * 2.0
    expected = torch.tensor([s1 * 1.0, s2 * 2.0, s3 * 3.0], dtype=torch.float64)
    for fn in (wkv7_recurrent, lambda *x: wkv7_chunked(*x, chunk_size=2)):
        assert_close(fn(r, log_w, k, v, a, b).flatten(), expected, 1e-14, "by hand")


def test_left_padding_leaves_real_tokens_unchanged():
    model = tiny_rwkv7(num_hidden_layers=3)
    ids, mask = left_padded(batch=3, length=8)
    batched = model(ids, attention_mask=mask).logits
    for b in range(3):
        alone = model(ids[b:b + 1, b:]).logits
        assert_close(batched[b:b + 1, b:], alone, 1e-12, f"row {b}")


def test_inputs_embeds_and_base_model():
    model = tiny_rwkv7()
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


def test_value_residual_reaches_later_layers():
    """Layer 1's values mix in layer 0's value: changing v_first changes layer 1's output."""
    model = tiny_rwkv7()
    ids = torch.randint(0, 40, (1, 6))
    attention = model.rwkv.blocks[1].attention
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    out_a, _ = attention(x, v_first=torch.zeros(1, 6, 16, dtype=torch.float64))
    out_b, _ = attention(x, v_first=torch.ones(1, 6, 16, dtype=torch.float64))
    assert not torch.allclose(out_a, out_b)
    assert not hasattr(model.rwkv.blocks[0].attention, "v0")
    assert torch.isfinite(model(ids).logits).all()


def test_save_load_round_trip(tmp_path):
    model = tiny_rwkv7(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Rwkv7Config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is Rwkv7ForCausalLM and loaded.config.model_type == "ia_rwkv7"
    ids = torch.randint(0, 40, (2, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is Rwkv7Model
    assert torch.equal(base(ids).last_hidden_state, model.rwkv(ids).last_hidden_state)


def test_default_init_is_finite_and_layer_dependent():
    model = Rwkv7ForCausalLM(Rwkv7Config(vocab_size=40, hidden_size=16, num_hidden_layers=3, head_size=8))
    first, last = (model.rwkv.blocks[i].attention for i in (0, 2))
    assert not torch.equal(first.w0, last.w0)
    assert torch.isfinite(model(torch.randint(0, 40, (1, 6))).logits).all()


# -------------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed,length,layers", [(0, 7, 2), (1, 9, 3), (2, 5, 1)])
def test_unified_reconstructs_module_output(dtype, seed, length, layers):
    model = tiny_rwkv7(dtype=dtype, seed=seed, num_hidden_layers=layers)
    ids, mask = left_padded(batch=3, length=length, seed=seed)
    result = ia.decompose(model, ids, mask)
    assert [layer.name for layer in result.layers] == [f"rwkv.blocks.{i}.attention" for i in range(layers)]
    for layer in result.layers:
        assert layer.exact and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (3, 16, length, length) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(torch.triu(layer.matrix, diagonal=1)) == 0
        assert torch.count_nonzero(layer.matrix[2, :, :, :2]) == 0       # padding columns carry nothing


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_odd_lengths_and_unbatched_input(length):
    model = tiny_rwkv7()
    result = ia.decompose(model, torch.randint(0, 40, (length,)))
    assert max(result.errors) <= 1e-6 and result.layers[0].matrix.shape == (1, 16, length, length)


def test_padding_does_not_change_real_tokens_matrices():
    model = tiny_rwkv7()
    ids, mask = left_padded(batch=3, length=8)
    batched = ia.decompose(model, ids, mask).layers[1]
    alone = ia.decompose(model, ids[2:, 2:]).layers[1]
    assert_close(batched.matrix[2, :, 2:, 2:], alone.matrix[0], 1e-10, "padded vs alone")
    assert_close(batched.offset[2, 2:], alone.offset[0], 1e-10, "offset")


def test_float32_model_decomposed_in_float64():
    model = tiny_rwkv7(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask, dtype=torch.float64)
    assert result.layers[0].matrix.dtype == torch.float64 and max(result.errors) <= 1e-5


def test_extreme_rates_and_decays_float32():
    """Learning rates near 1 (strong removal) and decays at both ends of their range in float32."""
    model = tiny_rwkv7(dtype=torch.float32, seed=3)
    with torch.no_grad():
        for block in model.rwkv.blocks:
            block.attention.a0.fill_(6.0)
            block.attention.w0[::2] = 8.0
            block.attention.w0[1::2] = -8.0
    ids, mask = left_padded(batch=2, length=9, seed=3)
    assert max(ia.decompose(model, ids, mask).errors) <= 1e-4


# ----------------------------------------------------------------------------- fast vs naive
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_operator_matches_naive(variant):
    model = tiny_rwkv7(seed=4)
    ids, mask = left_padded(batch=2, length=6, seed=4)
    result = ia.decompose(model, ids, mask, variant=variant, check=False)
    for layer, (_, factors) in zip(result.layers, captured(model, ids, mask)):
        matrices, values, offset = naive_rwkv7(factors, variant)
        assert_close(layer.matrix, matrices, 1e-12, f"{variant} matrix")
        assert_close(layer.values, values, 1e-12, f"{variant} values")
        if variant == "unified":
            assert_close(layer.offset, offset, 1e-12, "offset")
        else:
            assert torch.count_nonzero(layer.offset) == 0 and torch.count_nonzero(offset) == 0


def test_naive_attention_is_the_recurrence():
    """The explicit transition products times v are the delta-rule recurrence on the same factors."""
    model = tiny_rwkv7(seed=5)
    ids, mask = left_padded(batch=2, length=7, seed=5)
    for record, f in captured(model, ids, mask):
        A = naive_rwkv7_attention(f)
        assert_close(A, rwkv7_attention(f.r, f.k, f.log_w, f.alpha, f.beta), 1e-12, "fast attention")
        assert_close(A.diagonal(dim1=-2, dim2=-1), (f.r * f.k).sum(-1).transpose(1, 2), 1e-12, "A[i, i] = k_i . r_i")
        o = torch.einsum("bhij,bjhn->bihn", A, f.v)
        assert_close(o, wkv7_recurrent(f.r, f.log_w, f.k, f.v, f.alpha, f.beta), 1e-12, "A v vs recurrence")
        assert_close(o.flatten(2), record.extra["wkv"].view_as(o.flatten(2)), 1e-12, "A v vs module's wkv")


def test_transition_by_hand():
    """G = diag(w) - kappa^T (a * kappa): one row-vector step x G equals x w - (x . kappa) (a * kappa)."""
    model = tiny_rwkv7(seed=6)
    ids = torch.randint(1, 40, (1, 4))
    _, f = captured(model, ids, None)[1]
    x = torch.randn(8, dtype=torch.float64)
    kappa, rate = -f.alpha[0, 2, 1], f.beta[0, 2, 1] / -f.alpha[0, 2, 1]
    expected = x * torch.exp(f.log_w[0, 2, 1]) - (x @ kappa) * (rate * kappa)
    assert_close(x @ naive_transition(f, 0, 2, 1), expected, 1e-12, "transition")
    assert_close(kappa.norm(), torch.tensor(1.0, dtype=torch.float64), 1e-12, "unit removal key")


def test_wkv_variant_is_the_recurrence_alone():
    model = tiny_rwkv7(seed=7)
    ids, mask = left_padded(batch=2, length=7, seed=7)
    targets = select_layers(model, None)
    with torch.no_grad(), capture(model, targets) as records:
        model(input_ids=ids, attention_mask=mask)
    result = ia.decompose(model, ids, mask, variant="wkv")
    for layer, record in zip(result.layers, records):
        assert not layer.exact and layer.error > 1e-2
        scan = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
        assert_close(scan, record.extra["wkv"].view_as(scan), 1e-12, "wkv variant vs ln_x input")


def test_wkv_matrix_gradient_holds_the_norm_scale_fixed():
    model = tiny_rwkv7(seed=8)
    ids = torch.randint(1, 40, (2, 5))
    layer = ia.decompose(model, ids, variant="wkv").layers[1]
    f = layer.factors
    o = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values).requires_grad_(True)
    heads = o.view(2, 5, 2, 8)
    normed = ((heads - heads.mean(-1, keepdim=True)) * layer.inv_sigma[..., None]).flatten(2)
    out = f.gate * (normed * f.gn_weight + f.gn_bias + (f.bonus[..., None] * f.v).flatten(2))
    grad_out = torch.randn_like(out)
    (expected,) = torch.autograd.grad((out * grad_out).sum(), o)
    assert_close(layer.matrix_gradient(grad_out), expected, 1e-12, "matrix gradient")
    assert_close(out.detach(), layer.output, 1e-10, "fixed-sigma rebuild equals the module")


@pytest.mark.parametrize("variant", VARIANTS)
def test_factorised_aggregates_match_the_channel_mean(variant):
    model = tiny_rwkv7(seed=9)
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
    model = tiny_rwkv7(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)


def test_attribution_map_uses_the_true_gradient_of_the_layer_output():
    """The layer's grad x A x v map from an independently computed gradient (a leaf at the output projection)."""
    model = tiny_rwkv7(num_hidden_layers=2)
    ids = torch.randint(1, 40, (1, 6))
    layer = ia.decompose(model, ids).layers[1]
    leaf = layer.output.clone().requires_grad_(True)
    handle = model.rwkv.blocks[1].attention.output.register_forward_pre_hook(lambda module, args: (leaf,))
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, -1].max(), leaf)
    cam = (grad.transpose(1, 2)[..., None] * layer.matrix
           * layer.values.transpose(1, 2)[:, :, None, :]).clamp(min=0).mean(1)
    assert torch.count_nonzero(cam) > 0
    assert_close(layer.attribution(grad), cam, 1e-12, "attribution map")


@pytest.mark.parametrize("length,strength", [(1, 1.0), (7, 1.0), (37, 1.0), (70, 30.0), (130, 1.0)])
def test_tiled_attention_equals_the_direct_one(length, strength):
    """The per-head matrices with their four decayed products by tiles (the layers' path) against the direct
    masked cumulative sums, with decays strong enough that long products underflow."""
    from implicit_attention.architectures.rwkv7.operator import rwkv7_attention, rwkv7_attention_tiled

    generator = torch.Generator().manual_seed(length)
    r, k, alpha, beta = (0.5 * torch.randn(2, length, 3, 4, dtype=torch.float64, generator=generator)
                         for _ in range(4))
    log_w = -0.1 - torch.rand(2, length, 3, 4, dtype=torch.float64, generator=generator) * strength
    assert_close(rwkv7_attention_tiled(r, k, log_w, alpha, beta), rwkv7_attention(r, k, log_w, alpha, beta), 1e-12,
                 str(length))
