"""explain() on tiny models: baselines on a linear model (known in closed form), matrix methods vs decompose."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import implicit_attention as ia
from implicit_attention.hooks import capture, select_layers

from conftest import assert_close, check_explanation, left_padded, tiny_mamba


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
    real = (mask[:, :, None] * mask[:, None, :]).double()     # padding rows and columns carry no mass
    assert_close(ia.explain(model, ids, mask, method="rollout"), rollout([M * real for M in maps])[:, -1, :] * mask,
                 1e-12, "rollout")


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


def published_paper_recipe(model, ids, start_layer: int) -> torch.Tensor:
    """A literal transcription of the authors' ``generate_ours`` (UnifiedImplicitAttnRepr,
    MambaVision/imagenet_seg_eval.py) for one unpadded causal-LM example, read at the last token:
    per layer the channel mean of relu(A) times the min-max normalised max_c relu(gradient at the
    block input) on its columns, min-max normalised over the whole matrix; then their rollout
    (I added, rows normalised, multiplied from start_layer on)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with capture(model, select_layers(model, None), keep_graph=True, block_inputs=True) as captured:
        logits = model(inputs_embeds=embeds).logits
        index = logits[0, -1].argmax()
        grads = torch.autograd.grad(logits[0, -1, index], [record.block_input for record in captured])
    all_layer_attentions = []
    for layer, grad in zip(ia.decompose(model, ids).layers, grads):
        attn_vecs = layer.matrix.clamp(min=0)                         # [1, D, L, L]
        s = grad[0].clamp(min=0).max(dim=1)[0].unsqueeze(0)           # [1, L]
        s = (s - s.min()) / (s.max() - s.min())
        avg_heads = attn_vecs.sum(dim=1) / attn_vecs.shape[1]
        avg_heads = avg_heads * s
        avg_heads = (avg_heads - avg_heads.min()) / (avg_heads.max() - avg_heads.min())
        all_layer_attentions.append(avg_heads)
    num_tokens = all_layer_attentions[0].shape[1]
    eye = torch.eye(num_tokens, dtype=embeds.dtype).expand(1, num_tokens, num_tokens)
    matrices = [m + eye for m in all_layer_attentions]
    matrices_aug = [m / m.sum(dim=-1, keepdim=True) for m in matrices]
    joint_attention = matrices_aug[start_layer]
    for i in range(start_layer + 1, len(matrices_aug)):
        joint_attention = matrices_aug[i].bmm(joint_attention)
    return joint_attention[0, -1, :]


@pytest.mark.parametrize("start_layer", [0, 1, 3])
def test_paper_is_the_published_recipe(start_layer):
    """Over several layers (the full matrices are rolled out, not the target rows)."""
    model = tiny_mamba(dtype=torch.float64, num_hidden_layers=4)
    ids = torch.randint(1, 40, (1, 7), generator=torch.Generator().manual_seed(start_layer))
    relevance = ia.explain(model, ids, method="paper", start_layer=start_layer)[0]
    assert_close(relevance, published_paper_recipe(model, ids, start_layer), 1e-10, f"paper from {start_layer}")
    assert (relevance > 0).sum() > 2                                       # more than the token itself
    if start_layer == 0:   # the default starts at the second half: layer 2 of 4
        assert_close(ia.explain(model, ids, method="paper")[0], published_paper_recipe(model, ids, 2), 1e-10,
                     "default start")


@pytest.mark.parametrize("method", ia.METHODS)
@pytest.mark.parametrize("variant", ["unified", "s6"])
def test_every_method_and_variant_gives_finite_relevance(method, variant):
    model = tiny_mamba(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5)
    check_explanation(model, ids, mask, method=method, variant=variant, steps=4)


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
