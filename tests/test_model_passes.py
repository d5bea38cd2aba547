"""How often each method runs the model: the decomposition's capture, the target and the maps share one
forward pass, and gradient x input resolves its target from the forward pass it differentiates."""

from __future__ import annotations

import pytest
import torch

from implicit_attention.explanations import baselines
from implicit_attention.explanations.api import run_explanation
from implicit_attention.explanations.target import Contrast

from conftest import tiny_mamba


def counted(model):
    calls = {"forward": 0}
    model.register_forward_hook(lambda *args: calls.__setitem__("forward", calls["forward"] + 1))
    return calls


@pytest.mark.parametrize("method", ["raw", "rollout", "attribution", "signed_attribution", "paper", "grad_x_input",
                                    "random"])
def test_one_forward_pass_per_explanation(method):
    model = tiny_mamba(dtype=torch.float64)
    calls = counted(model)
    run_explanation(model, torch.randint(1, 40, (2, 11), generator=torch.Generator().manual_seed(0)), method=method)
    assert calls["forward"] == 1


@pytest.mark.parametrize("target", [None, "contrast"])
def test_grad_x_input_in_one_pass_equals_the_two_pass_rule(target):
    """Same relevance as gradient x input of the resolved target, same logits as a plain forward pass."""
    model = tiny_mamba(dtype=torch.float64)
    ids = torch.randint(1, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    chosen = Contrast(3, [5, 7]) if target == "contrast" else None
    explanation = run_explanation(model, ids, method="grad_x_input", target=chosen)
    expected = baselines.grad_x_input(model, ids, None, explanation.target)
    assert torch.allclose(explanation.relevance, expected.to(explanation.relevance.dtype), rtol=0, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(explanation.logits, model(ids).logits, rtol=0, atol=1e-12)
    assert float(explanation.relevance.abs().max()) > 0
