"""Saving and loading results (implicit_attention.persistence): round trips, file layout, damaged files."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import implicit_attention as ia  # noqa: E402
from implicit_attention.decomposition import Decomposition, decompose  # noqa: E402
from implicit_attention.explanations.api import Explanation, run_explanation  # noqa: E402
from implicit_attention.explanations.target import Contrast  # noqa: E402
from implicit_attention.explanations.texts import TextExplanations  # noqa: E402
from implicit_attention.persistence import META_FILE, TENSORS_FILE, StoredLayer, StoredResultError  # noqa: E402

from conftest import left_padded, tiny_mamba  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return tiny_mamba(dtype=torch.float64)


@pytest.fixture(scope="module")
def batch():
    return left_padded(2, 7)


@pytest.fixture(scope="module")
def decomposition(tiny, batch):
    return decompose(tiny, *batch)


@pytest.fixture(scope="module")
def bundled():
    return ia.load_model()


def test_decomposition_round_trip_full(decomposition, tmp_path):
    path = decomposition.save(tmp_path / "dec")
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, TENSORS_FILE]
    meta = json.loads((path / META_FILE).read_text())
    assert meta["kind"] == "decomposition" and meta["version"] == 1 and meta["variant"] == "unified"
    assert [layer["stored"] for layer in meta["layers"]] == ["matrix", "matrix"]
    loaded = Decomposition.load(path)
    assert isinstance(loaded, Decomposition) and all(isinstance(layer, StoredLayer) for layer in loaded)
    assert loaded.variant == decomposition.variant and loaded.errors == decomposition.errors
    assert torch.equal(loaded.input_values, decomposition.input_values)
    assert torch.equal(loaded.attention_mask, decomposition.attention_mask)
    assert torch.equal(loaded.logits, decomposition.logits)
    for mine, theirs in zip(loaded, decomposition):
        assert (mine.index, mine.name, mine.variant, mine.exact) == (theirs.index, theirs.name, theirs.variant,
                                                                      theirs.exact)
        assert mine.dtype == theirs.dtype == torch.float64
        assert torch.equal(mine.matrix, theirs.matrix)
        for how in ("mean", "abs", "pos"):
            torch.testing.assert_close(mine.aggregate(how), theirs.aggregate(how), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine.aggregate(channel=3), theirs.aggregate(channel=3))
        torch.testing.assert_close(mine.reconstruct(), theirs.reconstruct())
        assert mine.measure_error() == pytest.approx(theirs.error, abs=1e-12)
        grad = torch.randn(theirs.output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(mine.attribution(grad), theirs.attribution(grad))
    torch.testing.assert_close(loaded.aggregate("abs"), decomposition.aggregate("abs"))
    assert "2 layers" in repr(loaded)


def test_decomposition_aggregates_only_and_layer_selection(decomposition, tmp_path):
    path = decomposition.save(tmp_path / "dec", layers=[-1], aggregates=("mean", "pos"))
    meta = json.loads((path / META_FILE).read_text())
    assert [(layer["index"], layer["stored"], layer["aggregates"]) for layer in meta["layers"]] == \
        [(decomposition[-1].index, "aggregates", ["mean", "pos"])]
    assert not any(name.endswith(".matrix") for name in meta["tensors"])
    loaded = Decomposition.load(path)
    (layer,) = loaded.layers
    assert layer.name == decomposition[-1].name and layer.error == decomposition[-1].error
    assert (layer.batch_size, layer.channels, layer.length) == (2, decomposition[-1].channels, 7)
    torch.testing.assert_close(layer.aggregate("mean"), decomposition[-1].aggregate("mean"), rtol=0, atol=0)
    torch.testing.assert_close(layer.aggregate_rows([-1], "pos"), decomposition[-1].aggregate_rows([-1], "pos"))
    for refused in (lambda: layer.aggregate("abs"), lambda: layer.matrix, lambda: layer.aggregate(channel=0),
                    layer.reconstruct):
        with pytest.raises(StoredResultError, match="aggregates mean, pos only.*cannot recompute"):
            refused()


def test_decomposition_save_refuses_bad_arguments(decomposition, tmp_path):
    with pytest.raises(ValueError, match="aggregates must name"):
        decomposition.save(tmp_path / "x", aggregates=("median",))
    with pytest.raises(IndexError, match="out of range"):
        decomposition.save(tmp_path / "y", layers=[5])


def test_explanation_round_trip_with_decomposition(tiny, batch, tmp_path):
    ids, mask = batch
    explanation = run_explanation(tiny, ids, mask, method="attribution", target=Contrast(3, [4, 5]),
                                  span=slice(2, None))
    path = explanation.save(tmp_path / "exp", decomposition=True)
    assert (path / "decomposition" / META_FILE).is_file()
    loaded = Explanation.load(path)
    assert torch.equal(loaded.relevance, explanation.relevance) and torch.equal(loaded.logits, explanation.logits)
    assert torch.equal(loaded.span, explanation.span)
    assert (loaded.method, loaded.variant) == ("attribution", "unified")
    t, u = loaded.target, explanation.target
    assert (t.kind, t.position, t.row) == (u.kind, u.position, u.row)
    assert torch.equal(t.ids, u.ids) and torch.equal(t.other, u.other)
    torch.testing.assert_close(t.score(loaded.logits), u.score(explanation.logits))
    assert loaded.top_tokens(3) == explanation.top_tokens(3)
    torch.testing.assert_close(loaded.normalized(), explanation.normalized())
    assert loaded.decomposition.errors == explanation.decomposition.errors
    torch.testing.assert_close(loaded.decomposition.aggregate("mean"), explanation.decomposition.aggregate("mean"))


def test_baseline_explanation_diagnostics_round_trip(tiny, batch, tmp_path):
    explanation = run_explanation(tiny, *batch, method="integrated_gradients", steps=4)
    loaded = Explanation.load(explanation.save(tmp_path / "ig", decomposition=True))
    assert loaded.decomposition is None and loaded.variant is None and loaded.span is None
    assert set(loaded.diagnostics) == set(explanation.diagnostics)
    for key, value in explanation.diagnostics.items():
        torch.testing.assert_close(torch.as_tensor(loaded.diagnostics[key]), torch.as_tensor(value))


def test_text_explanations_round_trip_bundled(bundled, tmp_path):
    result = ia.explain_texts(bundled, ["an utterly charming film", "a dull mess"])
    path = result.save(tmp_path / "texts", decomposition=True, aggregates=("abs",))
    assert (path / "runs" / "0" / "decomposition" / TENSORS_FILE).is_file()
    loaded = TextExplanations.load(path)
    assert len(loaded) == len(result) and len(loaded.runs) == len(result.runs)
    assert loaded.max_error == result.max_error
    for mine, theirs in zip(loaded, result):
        assert (mine.text, mine.tokens, mine.token_ids, mine.in_span, mine.offsets, mine.span_text, mine.row) == \
            (theirs.text, theirs.tokens, theirs.token_ids, theirs.in_span, theirs.offsets, theirs.span_text, theirs.row)
        assert mine.prediction == theirs.prediction and mine.target == theirs.target
        assert torch.equal(mine.relevance, theirs.relevance)
        assert mine.words() == theirs.words() and mine.top_tokens(3) == theirs.top_tokens(3)
        assert mine.diagnostics == theirs.diagnostics
        assert torch.equal(mine.real_positions, theirs.real_positions)
    torch.testing.assert_close(loaded.runs[0].explanation.decomposition.aggregate("abs"),
                               result.runs[0].explanation.decomposition.aggregate("abs"))


def test_bundled_decomposition_round_trip(bundled, tmp_path):
    ids = bundled.tokenizer("a dull mess", return_tensors="pt").input_ids
    decomposition = decompose(bundled.model, ids, layers=[0, -1])
    loaded = Decomposition.load(decomposition.save(tmp_path / "dec", layers=[1]))
    assert [layer.index for layer in loaded] == [decomposition[1].index]
    torch.testing.assert_close(loaded[0].matrix, decomposition[1].matrix, rtol=0, atol=0)
    torch.testing.assert_close(loaded[0].aggregate("mean"), decomposition[1].aggregate("mean"))


def test_damaged_and_mismatched_files(decomposition, tiny, batch, tmp_path):
    path = decomposition.save(tmp_path / "dec", aggregates="mean")
    with pytest.raises(StoredResultError, match="holds a saved decomposition where a saved explanation was expected"):
        Explanation.load(path)
    with pytest.raises(StoredResultError, match="no such directory"):
        Decomposition.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoredResultError, match="not a directory"):
        decomposition.save(tmp_path / "file")

    damaged = tmp_path / "damaged"
    decomposition.save(damaged, aggregates="mean")
    data = (damaged / TENSORS_FILE).read_bytes()
    (damaged / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(StoredResultError, match="damaged"):
        Decomposition.load(damaged)

    (path / META_FILE).write_text("{not json")
    with pytest.raises(StoredResultError, match="damaged, not JSON"):
        Decomposition.load(path)

    mixed = tmp_path / "mixed"
    decomposition.save(mixed, aggregates="mean")
    other = tmp_path / "other"
    decomposition.save(other, aggregates="pos")
    (mixed / TENSORS_FILE).write_bytes((other / TENSORS_FILE).read_bytes())
    with pytest.raises(StoredResultError, match="does not match.*different saves"):
        Decomposition.load(mixed)

    meta = json.loads((other / META_FILE).read_text())
    meta["version"] = 99
    (other / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoredResultError, match="version 99"):
        Decomposition.load(other)

    gone = tmp_path / "gone"
    decomposition.save(gone, aggregates="mean")
    (gone / TENSORS_FILE).unlink()
    with pytest.raises(StoredResultError, match="missing"):
        Decomposition.load(gone)


def test_ablation_attribution_refused(tiny, batch, tmp_path):
    ablated = decompose(tiny, *batch, variant="no_gate", layers=[0])
    loaded = Decomposition.load(ablated.save(tmp_path / "dec"))
    torch.testing.assert_close(loaded[0].aggregate("mean"), ablated[0].aggregate("mean"))
    with pytest.raises(StoredResultError, match="needs an exact variant"):
        loaded[0].attribution(torch.zeros(ablated[0].output.shape, dtype=torch.float64))


def test_what_the_exactness_check_covered_round_trips(tiny, tmp_path):
    """A layer checked on sampled rows (every channel) keeps that record through save and load."""
    result = decompose(tiny, torch.randint(1, 40, (1, 30), generator=torch.Generator().manual_seed(2)))
    result[-1].measure_error(max_entries=0)
    assert result[-1].error_rows == 8 and result[0].error_rows is None
    loaded = Decomposition.load(result.save(tmp_path / "dec", aggregates=("mean",)))
    assert [layer.error_rows for layer in loaded] == [None, 8]
    assert [layer.error_channels for layer in loaded] == [layer.error_channels for layer in result]
    assert loaded[-1].error == result[-1].error
