"""In-context episodes of planted-keyword tasks: what a target LM is meta-trained on to read AMPLIFY's rationales.

A *task* is a :class:`~implicit_attention.benchmark.groundtruth.GroundTruthTask` whose two keyword
sets (and decoys) are drawn at random from English words (:func:`random_task`): which set is planted
in 20-48 words of distractor English decides the label, ``first`` or ``second``. An *episode* is a
few labelled examples of one task (the demonstrations) and one more (the query), written as
AMPLIFY's few-shot prompt (:func:`implicit_attention.applications.amplify.build_prompt`), with or
without rationales naming the planted words (:func:`episode_prompt`).

A target meta-trained on many random tasks cannot know any task's keywords in advance: it must
infer them from the demonstrations, and a rationale that names the deciding words makes that
easier, one that names other words harder. The planted-keyword task of the faithfulness benchmark
(:data:`~implicit_attention.benchmark.groundtruth.DEFAULT_TASK`: food against tools) is held out
(:func:`keyword_vocabulary` excludes its words), so that AMPLIFY's effect is measured on a task the
target never saw, with rationales from a proxy model trained on that task.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..benchmark.groundtruth import DEFAULT_TASK, GroundTruthExample, GroundTruthTask, make_examples
from .amplify import Demonstration, build_prompt, rationale_sentence

#: The label names (and label words) of every task: label 0 and label 1.
LABEL_NAMES: tuple[str, str] = DEFAULT_TASK.label_names

_WORD = re.compile(r"[a-z]+")


def _forms(word: str) -> tuple[str, str, str]:
    """A word and the plurals a task's distractor text must not contain either."""
    return word, word + "s", word + "es"


def keyword_vocabulary(sentences: Iterable[str], excluded: Iterable[str] = (), *, min_length: int = 4,
                       max_share: float = 0.002, size: int = 3000) -> list[str]:
    """English words to draw random keyword sets from, sorted.

    The ``size`` most frequent lower-case ``a-z`` words of at least ``min_length`` letters that occur,
    as a word or a plural, in at most ``max_share`` of ``sentences`` (so that most distractor sentences
    stay free of any task's keywords), leaving out ``excluded`` and their plurals (the held-out task's).
    """
    sentences = list(sentences)
    counts: Counter[str] = Counter()
    for sentence in sentences:
        counts.update(set(_WORD.findall(sentence.lower())))
    banned = {form for word in excluded for form in _forms(word)}
    limit = max_share * len(sentences)

    def share(word: str) -> int:
        return sum(counts.get(form, 0) for form in _forms(word))

    candidates = [w for w, n in counts.items() if len(w) >= min_length and w not in banned
                  and not (w.endswith("s") and w[:-1] in counts) and share(w) <= limit]
    candidates.sort(key=lambda w: (-counts[w], w))
    return sorted(candidates[:size])


class SentenceIndex:
    """Distractor sentences with the sentences each word occurs in, to draw those free of a task's words fast."""

    def __init__(self, sentences: Sequence[str]):
        self.sentences = list(sentences)
        self._where: dict[str, set[int]] = {}
        for i, sentence in enumerate(self.sentences):
            for word in set(_WORD.findall(sentence.lower())):
                self._where.setdefault(word, set()).add(i)

    def free_of(self, words: Iterable[str]) -> list[str]:
        """The sentences containing none of ``words`` nor their plurals as a whole word, in any case, in order."""
        taken: set[int] = set()
        for word in words:
            for form in _forms(word.lower()):
                taken |= self._where.get(form, set())
        return [s for i, s in enumerate(self.sentences) if i not in taken]

    def sample_free_of(self, rng: random.Random, words: Iterable[str], count: int) -> list[str]:
        """About ``count`` sentences free of ``words`` (as :meth:`free_of`), drawn at random: ``count`` draws
        without replacement, less those that contain one of the words (cheaper than filtering them all)."""
        taken: set[int] = set()
        for word in words:
            for form in _forms(word.lower()):
                taken |= self._where.get(form, set())
        picks = rng.sample(range(len(self.sentences)), min(count, len(self.sentences)))
        return [self.sentences[i] for i in picks if i not in taken]


#: Decoys of a random task unless told otherwise (as many as the held-out task has).
DEFAULT_DECOYS = len(DEFAULT_TASK.decoys)


def random_task(rng: random.Random, vocabulary: Sequence[str], *, words_per_set: int = 6,
                decoys: int = DEFAULT_DECOYS,
                seed: int = 0, words: tuple[int, int] | None = None) -> GroundTruthTask:
    """A planted-keyword task with keyword sets of ``words_per_set`` words and ``decoys`` decoys drawn from
    ``vocabulary`` (distinct words), examples of ``words = (min, max)`` words (default: the held-out task's)
    with 1 to ``min(3, words_per_set)`` planted keywords, otherwise as
    :data:`~implicit_attention.benchmark.groundtruth.DEFAULT_TASK`.

    Smaller sets make the task easier to learn in context: two examples of a label share a keyword more
    often (with one word per set, always)."""
    if words_per_set < 1:
        raise ValueError(f"words_per_set must be at least 1, got {words_per_set}")
    if 2 * words_per_set + decoys > len(vocabulary):
        raise ValueError(f"{2 * words_per_set + decoys} distinct words needed, the vocabulary has {len(vocabulary)}")
    lengths = {} if words is None else {"min_words": words[0], "max_words": words[1]}
    drawn = rng.sample(list(vocabulary), 2 * words_per_set + decoys)
    return GroundTruthTask(keywords=(tuple(drawn[:words_per_set]), tuple(drawn[words_per_set:2 * words_per_set])),
                           decoys=tuple(drawn[2 * words_per_set:]), label_names=LABEL_NAMES, seed=seed,
                           planted_range=(1, min(3, words_per_set)), **lengths)


@dataclass
class Episode:
    """Labelled demonstrations and a query of one task."""

    task: GroundTruthTask
    demonstrations: list[GroundTruthExample]
    query: GroundTruthExample


def make_episode(rng: random.Random, task: GroundTruthTask, sentences: Sequence[str], shots: int) -> Episode:
    """``shots`` demonstrations and one query of ``task``, every label drawn independently (a fair coin),
    with distractor text from ``sentences`` (which must be free of the task's words:
    :meth:`SentenceIndex.free_of`).

    No label may follow from the others: a first version drew the ``shots + 1`` examples balanced, so the
    query's label was the one the demonstrations had fewer of, and a target meta-trained on such
    episodes learnt to count labels instead of reading the text (every unseen task right, the held-out
    task at chance)."""
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    labels = [rng.randrange(2) for _ in range(shots + 1)]
    # shots + 1 examples of each label (make_examples balances them), then one per slot of its label
    drawn = make_examples(task, sentences, 2 * (shots + 1), split_seed=rng.randrange(2**31))
    by_label = {label: [e for e in drawn if e.label == label] for label in (0, 1)}
    examples = [by_label[label].pop() for label in labels]
    return Episode(task=task, demonstrations=examples[:shots], query=examples[shots])


def keyword_matching_prediction(demonstrations: Sequence[GroundTruthExample], query: GroundTruthExample) -> float:
    """The probability of label 1 that an oracle reading the planted words gives the query: the label of
    the demonstrations that share more of the query's planted words (each demonstration counts once),
    0.5 on a tie (none shared). Its accuracy bounds what a target can do from the demonstrations' text
    alone (the keyword sets are never seen whole)."""
    words = set(query.planted_words)
    shared = [0, 0]
    for example in demonstrations:
        shared[example.label] += bool(words & set(example.planted_words))
    return 0.5 if shared[0] == shared[1] else float(shared[1] > shared[0])


def keyword_matching_credit(demonstrations: Sequence[GroundTruthExample], query: GroundTruthExample) -> float:
    """The oracle's expected score on ``query`` (:func:`keyword_matching_prediction`): 1 right, 0 wrong, 0.5 a tie."""
    guess = keyword_matching_prediction(demonstrations, query)
    return guess if query.label == 1 else 1 - guess


def planted_rationale_words(example: GroundTruthExample, k: int) -> list[str]:
    """The example's planted keywords in text order, each once, at most ``k``: the true rationale."""
    words: list[str] = []
    for word in example.planted_words:
        if word not in words:
            words.append(word)
    return words[:k]


def episode_prompt(episode: Episode, rationale_words: Sequence[Sequence[str]] | None = None) -> str:
    """AMPLIFY's prompt of ``episode``: each demonstration with the rationale naming its
    ``rationale_words[i]`` (none where empty, or for all with ``None``), then the query, ending in ``Label:``."""
    if rationale_words is not None and len(rationale_words) != len(episode.demonstrations):
        raise ValueError(f"{len(rationale_words)} rationales for {len(episode.demonstrations)} demonstrations")
    demos = []
    for i, example in enumerate(episode.demonstrations):
        label = LABEL_NAMES[example.label]
        words = list(rationale_words[i]) if rationale_words is not None else []
        demos.append(Demonstration(text=example.text, label=label, label_word=label, words=words,
                                   rationale=rationale_sentence(words, label) if words else None))
    return build_prompt(demos, episode.query.text)


def _tokens_starting_at(starts: Sequence[int], offsets: Sequence[tuple[int, int]], after: str) -> list[int]:
    """The index of the (non-empty) token that starts at each character of ``starts``, from the tokenizer's
    character ``offsets``; an error where none does (the tokenizer joined it with the ``after`` before it)."""
    by_start = {start: i for i, (start, end) in enumerate(offsets) if end > start}
    missing = [s for s in starts if s not in by_start]
    if missing:
        raise ValueError(f"no token starts right after {after!r} at character {missing[0]}: the tokenizer joins the "
                         "label word with what precedes it")
    return [by_start[s] for s in starts]


def label_positions(prompt: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Token indices of the label words in ``prompt + " " + query label``: the token starting right after each
    ``Label:`` (the demonstrations' labels, then the query's), from the tokenizer's character ``offsets``."""
    return _tokens_starting_at([m.end() for m in re.finditer(r"(?m)^Label:", prompt)], offsets, "Label:")


def quoted_label_positions(prompt: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Token indices of the first token of each rationale's quoted label (``... to predict 'first' as ...``:
    the token starting right after the opening quote), from the tokenizer's character ``offsets``.

    Predicting it is matching in miniature: the rationale's words stand a few tokens before it, and the
    label they imply is known only from earlier demonstrations that name the same words."""
    starts = [m.end() for m in re.finditer(r"^Rationale: .* to predict '", prompt, flags=re.MULTILINE)]
    return _tokens_starting_at(starts, offsets, "predict '")
