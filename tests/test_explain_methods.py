"""explain() on tiny models: baselines on a linear model (known in closed form), matrix methods vs decompose."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import implicit_attention as ia
from implicit_attention.hooks import capture, select_layers

from conftest import assert_close, left_padded, tiny_mamba


class LinearCausalLM(nn.Module):
    """logits[:, t] = sum_{s <= t} embed_s @ W: every token's contribution to a logit is e_s . w_v."""

    def __init__(self, vocab=7, hidden=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden).double()
        self.W = nn.Parameter(torch.randn(hidden, vocab, dtype=torch.float64))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, use_cache=False):
        e = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            e = e * attention_mask[..., None]
        return SimpleNamespace(logits=(e @ self.W).cumsum(dim=1))


@pytest.mark.parametrize("method", ["grad_x_input", "integrated_gradients", "occlusion"])
def test_gradient_baselines_are_exact_on_a_linear_model(method):
    model = LinearCausalLM()
    ids = torch.tensor([[1, 4, 2, 6]])
    relevance = ia.explain(model, ids, method=method, target=3)
    expected = model.embed(ids)[0] @ model.W[:, 3]              # e_t . w_3
    # captum accumulates in float32 (quadrature weights, occlusion counts): allow that rounding
    assert_close(relevance[0], expected.detach(), 1e-12 if method == "grad_x_input" else 1e-6, method)


def test_random_is_seeded_and_zero_on_padding():
    model = LinearCausalLM()
    ids = torch.tensor([[0, 4, 2, 6]])
    mask = torch.tensor([[0, 1, 1, 1]])
    a = ia.explain(model, ids, mask, method="random", seed=3)
    b = ia.explain(model, ids, mask, method="random", seed=3)
    assert torch.equal(a, b) and a[0, 0] == 0 and bool(((a[0, 1:] > 0) & (a[0, 1:] < 1)).all())


def test_target_defaults_to_prediction_and_position():
    model = LinearCausalLM()
    ids = torch.tensor([[1, 4, 2]])
    logits = model(ids).logits
    expl = ia.run_explanation(model, ids, method="grad_x_input", position=1)
    assert expl.target.position == 1
    assert int(expl.target.ids[0]) == int(logits[0, 1].argmax())
    assert expl.relevance[0, 2] == 0                            # the future has no influence


def test_raw_and_rollout_are_built_from_the_aggregated_maps():
    model = tiny_mamba(dtype=torch.float64, num_hidden_layers=3)
    ids, mask = left_padded(batch=2, length=6)
    maps = ia.decompose(model, ids, mask).aggregate("abs")    # [layers, B, L, L]
    raw = ia.explain(model, ids, mask, method="raw")
    assert_close(raw, maps[:, :, -1, :].mean(0) * mask, 1e-12, "raw")
    only_last = ia.explain(model, ids, mask, method="raw", layers=[-1], aggregate="pos")
    pos_last = ia.decompose(model, ids, mask, layers=[-1]).layers[0].aggregate("pos")
    assert_close(only_last, pos_last[:, -1, :] * mask, 1e-12, "raw, last layer, pos")
    from implicit_attention.explanations.rules import rollout
    assert_close(ia.explain(model, ids, mask, method="rollout"), rollout(list(maps))[:, -1, :] * mask, 1e-12, "rollout")


def test_attribution_uses_the_true_gradient_of_the_layer_output():
    """One layer: relevance = (R - I)[row] = cam[row] with cam from an independently computed gradient."""
    model = tiny_mamba(dtype=torch.float64, num_hidden_layers=1)
    ids = torch.randint(1, 40, (1, 6))
    expl = ia.run_explanation(model, ids, method="attribution")
    layer = expl.decomposition.layers[0]
    # independent gradient: feed the layer output as a leaf tensor through the rest of the model
    leaf = layer.output.clone().requires_grad_(True)
    out_proj = model.backbone.layers[0].mixer.out_proj
    handle = out_proj.register_forward_pre_hook(lambda module, args: (leaf,))
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, -1, expl.target.ids[0]], leaf)
    cam = (grad.transpose(1, 2)[..., None] * layer.matrix * layer.values.transpose(1, 2)[:, :, None, :]).clamp(min=0).mean(1)
    expected = cam[0, -1]
    assert_close(expl.relevance[0], expected, 1e-9, "attribution")


def test_s6_attribution_folds_the_gate_into_the_gradient():
    model = tiny_mamba(dtype=torch.float64, num_hidden_layers=1)
    ids = torch.randint(1, 40, (1, 5))
    unified = ia.run_explanation(model, ids, method="attribution")
    s6 = ia.run_explanation(model, ids, method="attribution", variant="s6")
    layer = s6.decomposition.layers[0]
    assert torch.equal(layer.matrix_gradient(torch.ones_like(layer.values)), layer.factors.out_gate)
    assert not torch.allclose(unified.relevance, s6.relevance)


def test_paper_recipe_uses_residual_gradients():
    model = tiny_mamba(dtype=torch.float64, num_hidden_layers=4)
    ids, mask = left_padded(batch=2, length=6)
    rel = ia.explain(model, ids, mask, method="paper")
    assert rel.shape == (2, 6) and torch.isfinite(rel).all() and (rel >= 0).all()
    assert torch.all(rel[1, :1] == 0)
    # one layer from the start: the recipe by hand from decompose + autograd on the residual
    expl = ia.run_explanation(model, ids[:1], method="paper", start_layer=3)
    targets = select_layers(model, None)
    embeds = model.get_input_embeddings()(ids[:1]).detach()
    with capture(model, targets, keep_graph=True, block_inputs=True) as captured:
        logits = model(inputs_embeds=embeds).logits
        (g,) = torch.autograd.grad(logits[0, -1, expl.target.ids[0]], captured[3].block_input)
    a = ia.decompose(model, ids[:1]).layers[3].aggregate("pos")[0, -1]
    s = g[0].clamp(min=0).amax(-1)
    s = (s - s.min()) / (s.max() - s.min())
    e = a * s
    e = (e - e.min()) / (e.max() - e.min())
    # single layer: normalize_rows(I + tril(1 e^T)), last row = (e + onehot_last) / (1 + sum e)
    expected = (e + torch.eye(6, dtype=torch.float64)[-1]) / (1 + e.sum())
    assert_close(expl.relevance[0], expected, 1e-9, "paper")


@pytest.mark.parametrize("method", ia.METHODS)
@pytest.mark.parametrize("variant", ["unified", "s6"])
def test_every_method_and_variant_gives_finite_relevance(method, variant):
    model = tiny_mamba(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    rel = ia.explain(model, ids, mask, method=method, variant=variant, steps=4)
    assert rel.shape == (2, 5) and torch.isfinite(rel).all()
    assert torch.all(rel[1, :1] == 0)


def test_bad_method_and_target():
    model = tiny_mamba()
    with pytest.raises(ValueError, match="unknown method"):
        ia.explain(model, [1, 2], method="saliency")
    with pytest.raises(IndexError, match="target ids"):
        ia.explain(model, [1, 2], target=999)
    with pytest.raises(IndexError, match="position"):
        ia.explain(model, [1, 2], position=5)
    with pytest.raises(ValueError, match="no logits"):
        ia.explain(tiny_mamba("MambaModel"), [1, 2])


def test_right_padding_at_the_explained_position_warns():
    model = tiny_mamba()
    ids = torch.tensor([[3, 4, 5], [3, 4, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.warns(UserWarning, match=r"position 2 is padding in example\(s\) \[1\].*left"):
        ia.explain(model, ids, mask, method="raw")
