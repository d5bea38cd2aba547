"""The bertviz export (implicit_attention.interop.to_bertviz): Hugging Face's attention format, without bertviz."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import implicit_attention as ia  # noqa: E402
from implicit_attention.decomposition import Decomposition, decompose  # noqa: E402
from implicit_attention.interop import to_bertviz  # noqa: E402
from implicit_attention.persistence import StoredResultError  # noqa: E402

from conftest import left_padded, tiny_mamba  # noqa: E402


@pytest.fixture(scope="module")
def decomposition():
    return decompose(tiny_mamba(dtype=torch.float64), *left_padded(3, 6))


def _format_like_bertviz(attention):
    """What bertviz's ``format_attention`` does: every layer ``[1, heads, L, L]``, squeezed and stacked."""
    assert all(layer.dim() == 4 and layer.shape[0] == 1 for layer in attention)
    return torch.stack([layer.squeeze(0) for layer in attention])


def test_format_one_example(decomposition):
    row = 2                                                  # left-padded by two tokens
    real = decomposition.attention_mask[row].bool()
    out = to_bertviz(decomposition, [f"t{i}" for i in range(6)], how=("mean", "abs"), example=row)
    attention, tokens, heads, layers = out
    assert isinstance(attention, tuple) and len(attention) == len(decomposition.layers)
    assert layers == [layer.name for layer in decomposition.layers]          # model order
    assert heads == ["mean", "abs"]
    assert tokens == [f"t{i}" for i in range(6) if real[i]]
    n = int(real.sum())
    for layer, heads_map in zip(decomposition.layers, attention):
        assert heads_map.shape == (1, 2, n, n) and heads_map.dtype == torch.float32
        assert heads_map.device.type == "cpu" and heads_map.is_contiguous()
        for h, how in enumerate(("mean", "abs")):
            expected = layer.aggregate(how)[row][real][:, real].float()
            torch.testing.assert_close(heads_map[0, h], expected)
            # rows sum as the aggregate's rows do over the real tokens' columns (padding dropped)
            torch.testing.assert_close(heads_map[0, h].sum(-1),
                                       layer.aggregate(how)[row][real][:, real].sum(-1).float())
    stacked = _format_like_bertviz(attention)
    assert stacked.shape == (len(decomposition.layers), 2, n, n)


def test_whole_batch_rows_sum_as_the_aggregates(decomposition):
    attention, _, heads, _ = to_bertviz(decomposition, how=("mean", "abs", "pos"), example=None)
    assert heads == ["mean", "abs", "pos"]
    for layer, heads_map in zip(decomposition.layers, attention):
        assert heads_map.shape == (3, 3, 6, 6)
        for h, how in enumerate(heads):
            torch.testing.assert_close(heads_map[:, h].sum(-1), layer.aggregate(how).sum(-1).float())


def test_whole_batch_and_channels(decomposition):
    attention, tokens, heads, _ = to_bertviz(decomposition, channels=[0, -1], example=None)
    channels = decomposition[0].channels
    assert heads == ["channel 0", f"channel {channels - 1}"]
    assert tokens == [[str(int(i)) for i in row] for row in decomposition.input_values]
    for layer, heads_map in zip(decomposition.layers, attention):
        assert heads_map.shape == (3, 2, 6, 6)
        torch.testing.assert_close(heads_map[:, 0], layer.aggregate(channel=0).float())
        torch.testing.assert_close(heads_map[:, 1], layer.matrix[:, -1].float())


def test_default_is_the_mean_and_tokens_of_real_positions(decomposition):
    real = decomposition.attention_mask[1].bool()
    words = [f"w{i}" for i in range(int(real.sum()))]
    attention, tokens, heads, _ = decomposition.to_bertviz(words, example=1)
    assert heads == ["mean"] and tokens == words
    torch.testing.assert_close(attention[-1][0, 0], decomposition[-1].aggregate("mean")[1][real][:, real].float())


def test_refusals(decomposition):
    with pytest.raises(ValueError, match="how must name aggregates"):
        to_bertviz(decomposition, how=("max",))
    with pytest.raises(IndexError, match="example 3 out of range"):
        to_bertviz(decomposition, example=3)
    with pytest.raises(ValueError, match="tokens holds 2 strings"):
        to_bertviz(decomposition, ["a", "b"], example=0)


def test_bundled_model_with_its_tokenizer_and_a_loaded_decomposition(tmp_path):
    loaded = ia.load_model()
    ids = loaded.tokenizer("an utterly charming film", return_tensors="pt").input_ids
    decomposition = decompose(loaded.model, ids, layers=[0, -1])
    attention, tokens, _, _ = to_bertviz(decomposition, loaded.tokenizer)
    assert tokens == loaded.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert [a.shape for a in attention] == [(1, 1, ids.shape[1], ids.shape[1])] * 2
    assert to_bertviz(decomposition, loaded).tokens == [loaded.tokenizer.decode([i]) for i in ids[0].tolist()]

    stored = Decomposition.load(decomposition.save(tmp_path / "dec", aggregates=("mean",)))
    again, again_tokens, _, _ = to_bertviz(stored, loaded.tokenizer)
    assert again_tokens == tokens
    for a, b in zip(attention, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(StoredResultError, match="cannot recompute"):
        to_bertviz(stored, channels=[0])
