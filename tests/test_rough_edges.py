"""Rough edges found by trying the command line and the API as a new user would (issue 14): each gets a
clear, one-line error or a quiet exit instead of a traceback from deep inside torch, autograd or captum."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import implicit_attention as ia  # noqa: E402

from conftest import tiny_mamba  # noqa: E402

IDS = torch.tensor([[1, 2, 3, 4, 5], [3, 4, 5, 6, 7]])


@pytest.fixture(scope="module")
def model():
    return tiny_mamba()


# ------------------------------------------------------------------------------------------ 1: layers=[]
def test_empty_layer_list_is_refused_by_explain_and_decompose(model) -> None:
    message = re.escape("layers=[] selects no layer: pass layers=None for every token-mixing layer, or at least "
                        "one index (the model has 2)")
    with pytest.raises(ValueError, match=message):
        ia.explain(model, IDS, layers=[])
    with pytest.raises(ValueError, match=message):
        ia.decompose(model, IDS, layers=[])


# ------------------------------------------------------------------------------------ 2, 4: the target
def test_text_target_says_to_pass_a_token_id(model) -> None:
    for method in ("attribution", "grad_x_input"):
        with pytest.raises(ValueError, match=r"^target ' positive' is text, but explain\(\) takes token ids: "
                                             r"pass the token's id .*explain_texts or the command line"):
            ia.explain(model, IDS, target=" positive", method=method)


@pytest.mark.parametrize("target", [10.7, 10.0, True, [1.5, 2.0], torch.tensor(3.0)])
def test_non_integer_target_is_refused(model, target) -> None:
    with pytest.raises(ValueError, match=r"^target must be integer token ids, got .*a token id is an int$"):
        ia.explain(model, IDS, target=target)


@pytest.mark.parametrize("target", [[10], [10, 11, 12], torch.tensor([10])])
def test_target_list_must_hold_one_id_per_example(model, target) -> None:
    n = len(target)
    with pytest.raises(ValueError, match=rf"^target holds {n} id\(s\) for a batch of 2: give one int \(for every "
                                         r"example\) or exactly one id per example$"):
        ia.explain(model, IDS, target=target)


def test_single_int_target_still_applies_to_every_example(model) -> None:
    one = ia.run_explanation(model, IDS, target=10)
    each = ia.run_explanation(model, IDS, target=[10, 10])
    assert one.target.ids.tolist() == [10, 10]
    torch.testing.assert_close(one.relevance, each.relevance)
    assert ia.run_explanation(model, IDS, target=torch.tensor(10)).target.ids.tolist() == [10, 10]
    assert ia.run_explanation(model, IDS[:1], target=[10]).target.ids.tolist() == [10]


def test_zero_integration_steps_are_refused(model) -> None:
    with pytest.raises(ValueError, match=r"^option steps must be an integer >= 1, got 0$"):
        ia.explain(model, IDS, method="integrated_gradients", steps=0)


# ------------------------------------------------------------------------------ 3: out-of-vocabulary ids
@pytest.mark.parametrize("bad", [40, 99, -1])
def test_out_of_vocabulary_id_names_the_id_and_the_vocabulary(model, bad) -> None:
    ids = torch.tensor([[1, 2, 3], [4, bad, 5]])
    message = (rf"^token id {bad} \(row 1, position 1\) is outside the model's vocabulary of 40 ids: "
               r"ids must lie in \[0, 40\)$")
    for call in (lambda: ia.explain(model, ids), lambda: ia.decompose(model, ids),
                 lambda: ia.explain(model, ids, method="grad_x_input")):
        with pytest.raises(ValueError, match=message):
            call()
