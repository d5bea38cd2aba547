"""The model's scans in parallel while the library runs it (implicit_attention.scans)."""

from __future__ import annotations

import pytest
import torch

import implicit_attention as ia
from implicit_attention import scans

from conftest import tiny_mamba

pytest.importorskip("mambapy")


def test_parallel_scans_switch_and_restore_each_module():
    model = tiny_mamba()
    mixers = [m for m in model.modules() if hasattr(m, "use_mambapy")]
    mixers[1].use_mambapy = True                        # the user's own setting, kept
    with scans.parallel_scans(model) as switched:
        assert switched == ["backbone.layers.0.mixer"]
        assert all(m.use_mambapy for m in mixers)
    assert [m.use_mambapy for m in mixers] == [False, True]
    with pytest.raises(RuntimeError), scans.parallel_scans(model):
        raise RuntimeError("inside")
    assert [m.use_mambapy for m in mixers] == [False, True]


def test_explanations_with_parallel_scans_equal_the_token_loop(monkeypatch):
    """Same relevance and matrices with mambapy's scan as with the stock token loop (float32 rounding)."""
    model = tiny_mamba(hidden_size=16, num_hidden_layers=3)
    ids = torch.randint(0, 40, (2, 23), generator=torch.Generator().manual_seed(0))
    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(scans, "ENABLED", enabled)
        called = []
        original = scans.parallel_scans

        def spy(model, original=original, called=called):
            called.append(True)
            return original(model)
        monkeypatch.setattr("implicit_attention.explanations.api.parallel_scans", spy)
        results[enabled] = {method: ia.explain(model, ids, method=method) for method in ("attribution", "raw")}
        results[enabled]["matrix"] = ia.decompose(model, ids).layers[1].matrix
        assert called
    for key, stock in results[False].items():
        assert torch.allclose(results[True][key], stock, rtol=1e-4, atol=1e-6), key
    assert not any(m.use_mambapy for m in model.modules() if hasattr(m, "use_mambapy"))
