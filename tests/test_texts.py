"""explain_texts: raw strings through the task's template, padding, the label target and the prediction."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import implicit_attention as ia  # noqa: E402
from implicit_attention.explanations.target import Contrast, LogProb  # noqa: E402
from implicit_attention.loading import load_model  # noqa: E402
from implicit_attention.text import encode, predict, predict_next_token, token_strings  # noqa: E402

TEXTS = ["an utterly charming film", "a dull, lifeless and tedious mess of a movie"]


@pytest.fixture(scope="module")
def loaded():
    return load_model(dtype="float64")


def test_matches_the_steps_done_by_hand(loaded):
    result = ia.explain_texts(loaded, TEXTS, method="attribution")
    ids, mask = encode(loaded, TEXTS)
    (run,) = result.runs                                               # the bundled Mamba: one padded batch
    assert torch.equal(run.input_ids, ids) and torch.equal(run.attention_mask, mask)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    labels = predict(loaded, logits)                                   # argmax over the label words
    assert [p.label for p in labels] == ["positive", "negative"]
    chosen = [p.token_id for p in labels]
    other = [[i for i in loaded.label_ids.values() if i != c] for c in chosen]
    # the default score of a task model: the label contrast, logit(label) - logit(other label)
    by_hand = ia.explain(loaded.model, ids, mask, method="attribution", target=Contrast(chosen, other))
    as_logit = ia.explain_texts(loaded, TEXTS, method="attribution", score="logit")
    logit_by_hand = ia.explain(loaded.model, ids, mask, method="attribution", target=chosen)
    for b, example in enumerate(as_logit):
        assert torch.allclose(example.relevance, logit_by_hand[b][mask[b].bool()], rtol=0, atol=1e-12)
        assert example.target.score == f"logit({labels[b].label})"
    for b, example in enumerate(result):
        real = mask[b].bool()
        assert example.tokens == token_strings(loaded, ids[b], mask[b]) and example.tokens[0] == "<s>"
        assert "".join(example.tokens[1:]).endswith(" sentiment:")    # the task's template
        assert example.token_ids == ids[b][real].tolist()
        assert torch.allclose(example.relevance, by_hand[b][real].double(), rtol=0, atol=1e-12)
        assert example.prediction.label == labels[b].label and example.prediction.is_label
        assert example.target.label == labels[b].label and example.target.id == labels[b].token_id
        assert example.target.position == len(example.tokens) - 1
        assert example.target.score == ("logit(positive) - logit(negative)", "logit(negative) - logit(positive)")[b]
    assert result.max_error is not None and result.max_error <= 1e-6


def test_explicit_target_and_a_position_inside_the_padding(loaded):
    result = ia.explain_texts(loaded, TEXTS, method="rollout", target="negative")
    assert [ex.target.label for ex in result] == ["negative", "negative"]
    assert [ex.prediction.label for ex in result] == ["positive", "negative"]    # the prediction is still shown
    # position 1 of the batch lies inside the shorter text's left padding
    padding = int((result.runs[0].attention_mask[0] == 0).sum())
    assert padding >= 2
    with pytest.warns(UserWarning, match="position 1 is padding in example.*0"):
        early = ia.explain_texts(loaded, TEXTS, method="raw", position=1, target=" positive")
    assert early[0].target.position is None and early[0].target.batch_position == 1
    assert early[1].target.position == 1
    with torch.no_grad():
        logits = loaded.model(input_ids=early.runs[0].input_ids, attention_mask=early.runs[0].attention_mask).logits
    assert early[1].prediction == predict_next_token(loaded, logits, 1)[1]     # not at the end: the next token
    length = encode(loaded, TEXTS)[0].shape[1]                                 # the longer prompt, BOS included
    assert length == len(loaded.tokenizer(loaded.task["template"].format(text=TEXTS[1])).input_ids)
    with pytest.raises(ValueError,
                       match=f"position 99 out of range for {length} tokens .the prompt template and BOS included"):
        ia.explain_texts(loaded, TEXTS, position=99)
    with pytest.raises(ia.EmptyInputError):
        ia.explain_texts(loaded, ["fine", "  "])


def test_baselines_have_no_decomposition(loaded):
    result = ia.explain_texts(loaded, "great acting", method="occlusion")
    assert len(result) == 1 and result.max_error is None and result.runs[0].explanation.decomposition is None
    assert result[0].relevance.shape == (len(result[0].tokens),)


def test_decomposition_input_values_and_the_deprecated_name(loaded):
    ids, mask = encode(loaded, TEXTS)
    decomposition = ia.decompose(loaded.model, ids, mask)
    assert torch.equal(decomposition.input_values, ids)
    with pytest.warns(DeprecationWarning, match="input_values"):
        assert decomposition.input_ids is decomposition.input_values


def test_models_inputs_and_text_are_told_apart(loaded):
    ids, mask = encode(loaded, TEXTS)
    with pytest.raises(TypeError, match="got text.*explain_texts"):
        ia.decompose(loaded.model, "an utterly charming film")
    with pytest.raises(TypeError, match="got text.*explain_texts"):
        ia.explain(loaded.model, TEXTS)
    with pytest.raises(TypeError, match="explain_texts needs a LoadedModel.*MambaForCausalLM"):
        ia.explain_texts(loaded.model, TEXTS)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        ia.explain(object(), ids)
    # a LoadedModel where a model is expected: its model is used
    assert torch.equal(ia.explain(loaded, ids, mask, method="raw"), ia.explain(loaded.model, ids, mask, method="raw"))
    assert ia.decompose(loaded, ids, mask).errors == ia.decompose(loaded.model, ids, mask).errors


def test_registry_knows_which_variants_are_exact(loaded):
    """Architecture.is_exact (what `info` prints) agrees with the layers each variant builds."""
    from implicit_attention.architectures import find_layers

    ids, mask = encode(loaded, TEXTS[:1])
    arch = find_layers(loaded.model)[0][2]
    for variant in arch.variants:
        layers = ia.decompose(loaded.model, ids, mask, variant=variant, check=False).layers
        assert {layer.exact for layer in layers} == {arch.is_exact(variant)}, variant
        assert all(layer.error <= 1e-6 for layer in layers) == arch.is_exact(variant), variant


def test_scores_of_a_target(loaded):
    """Gradients are linear in the score: a contrast is the difference of the two logits' relevances; a
    callable gives what its value gives; log-probabilities match autograd on log_softmax."""
    ids, mask = encode(loaded, TEXTS)
    model = loaded.model
    gx = lambda target: ia.explain(model, ids, mask, method="grad_x_input", target=target)  # noqa: E731
    pos, neg, other = loaded.label_ids["positive"], loaded.label_ids["negative"], 7
    # (the stock Mamba runs its scan in float32 even in a float64 model: linearity holds to ~1e-7)
    close = lambda a, b: float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())  # noqa: E731
    assert close(gx(Contrast(pos, neg)), gx(pos) - gx(neg))
    assert close(gx(Contrast(pos, [neg, other])), gx(pos) - (gx(neg) + gx(other)) / 2)
    assert not close(gx(Contrast(pos, neg)), gx(pos))
    assert torch.equal(gx(lambda logits: logits[:, pos] - logits[:, neg]), gx(Contrast(pos, neg)))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    for target, over in ((LogProb(pos), None), (LogProb(pos, over=[pos, neg]), [pos, neg])):
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        chosen = logits if over is None else logits[:, over]
        log_p = chosen.log_softmax(-1)[:, 0 if over is not None else pos]
        (grad,) = torch.autograd.grad(log_p.sum(), embeds)
        assert close(gx(target), (grad * embeds.detach()).sum(-1) * mask)
    for method, options in (("attribution", {}), ("integrated_gradients", {"steps": 4})):   # any method, any score
        contrast = ia.run_explanation(model, ids, mask, method=method, target=Contrast(pos, neg), **options)
        assert contrast.target.describe() == f"logit({pos}) - logit({neg})"
    with pytest.raises(ValueError, match="must be one of its 'over' ids"):
        ia.explain(model, ids, mask, target=LogProb(other, over=[pos, neg]))
    result = ia.explain_texts(loaded, TEXTS, score="log_prob", target="negative")
    over = ", ".join(loaded.label_ids)                                 # the label names, in task.json's order
    assert sorted(loaded.label_ids) == ["negative", "positive"]
    assert [ex.target.score for ex in result] == [f"log p(negative) over {over}"] * 2
    with pytest.raises(ValueError, match="score must be one of"):
        ia.explain_texts(loaded, TEXTS, score="odds")
