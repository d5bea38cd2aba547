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


def test_to_batch_puts_an_unpadded_layer_tensor_back_in_the_batch_layout():
    """fla runs a padded batch as one sequence of its real tokens: [1, T, C] back to [B, L, C], zero on padding."""
    from implicit_attention.architectures.primitives import to_batch

    inputs = torch.zeros(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    real = torch.arange(5 * 2, dtype=torch.float32).view(1, 5, 2)        # the 5 real tokens, in batch order
    batched = to_batch(real, inputs, mask)
    assert batched.shape == (2, 4, 2)
    assert batched[0, 1:].tolist() == [[0, 1], [2, 3], [4, 5]] and batched[1, 2:].tolist() == [[6, 7], [8, 9]]
    assert batched[0, 0].abs().sum() == 0 and batched[1, :2].abs().sum() == 0
    same = torch.randn(2, 4, 2)
    assert to_batch(same, inputs, mask) is same
    with pytest.raises(ValueError, match="fits neither the batch 2 x 4 nor its 5 real tokens"):
        to_batch(torch.zeros(1, 6, 2), inputs, mask)
