"""AMPLIFY: post-hoc explanations as in-context rationales (Krishna et al. 2023, "Post Hoc Explanations of
Language Models Can Improve Language Models").

A small *proxy* model that the library explains picks the few-shot demonstrations and writes their
rationales; a *target* causal LM reads them in its prompt:

1. the proxy scores every labelled example of a pool by its **misclassification confidence**
   (:func:`misclassification_confidence`: the largest probability among the wrong labels minus the gold
   label's) and the demonstrations are the most confidently misclassified ones
   (:func:`select_demonstrations`, rule ``"mcs"``; also ``"balanced"`` and ``"random"``);
2. the proxy's explanation of the **gold** label's score gives each demonstration's top-k words
   (:func:`top_k_words`), put into AMPLIFY's sentence (:func:`rationale_sentence`): ``The key words: w1,
   w2 and w3 are important clues to predict 'positive' as the correct answer.``;
3. every query gets the same few-shot prompt (:func:`build_prompt`) and the target predicts the label whose
   word's first token has the largest next-token logit after it (:func:`target_label_logits`).

:func:`amplify` runs the three steps::

    from implicit_attention.applications.amplify import amplify
    from implicit_attention.data import load_rotten_tomatoes
    from implicit_attention.loading import load_model

    proxy = load_model()                                  # the bundled sentiment Mamba
    result = amplify(proxy, load_rotten_tomatoes("train"), load_rotten_tomatoes("test")[:100], shots=8, k=5)
    print(result.first_prompt)
    print(result.accuracy)                                # Interval(mean, low, high, n)

The explanation source (``rationale``) is any method of the library (with its ``variant``), ``"none"``
(no rationale: the plain few-shot baseline), ``"random"`` (k random words of the text: a control) or a
callable ``text -> list of words`` (e.g. the true keywords of a synthetic task: an upper bound).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

from ..benchmark.stats import Interval, mean_ci
from ..catalog import BASELINE_METHODS, METHODS
from ..loading import LoadedModel

__all__ = [
    "RATIONALE_CONTROLS", "SELECTIONS", "AmplifyResult", "Demonstration", "PromptTruncatedWarning", "amplify",
    "build_prompt", "demonstration_words", "label_token_ids", "load_target", "misclassification_confidence",
    "proxy_probabilities", "random_words", "rationale_sentence", "resolve_labels", "select_demonstrations",
    "target_label_logits", "text_words", "top_k_words", "word_relevance",
]

#: Demonstration selection rules (:func:`select_demonstrations`).
SELECTIONS: tuple[str, ...] = ("mcs", "balanced", "random")
#: Rationale sources that are not explanation methods: no rationale, and k random words (a control).
RATIONALE_CONTROLS: tuple[str, ...] = ("none", "random")

#: A rationale source: a method name of the library, ``"none"``, ``"random"`` or ``text -> words``.
RationaleSource = Union[str, Callable[[str], Sequence[str]]]
#: What reads the prompts: a loaded model, or any causal LM and its tokenizer.
TargetModel = Union[LoadedModel, tuple[Any, Any]]

#: A word: a maximal run of letters, digits and apostrophes (it must hold a letter or digit).
_WORD = re.compile(r"(?:[^\W_]|')+")


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than ``max_tokens`` and lost its beginning (its first demonstrations)."""


# --------------------------------------------------------------------------------------- scores
def misclassification_confidence(probabilities: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """AMPLIFY's misclassification confidence score of each example.

    ``MCS = max_{y != gold} p(y) - p(gold)``: positive when the model prefers a wrong label (the larger, the
    more confidently wrong), negative when it is right.

    Args:
        probabilities: ``[N, K]`` label probabilities (K >= 2).
        gold: ``[N]`` gold label indices in ``[0, K)``.

    Returns:
        ``[N]`` scores in ``[-1, 1]``, in the dtype of ``probabilities``.
    """
    if probabilities.dim() != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"probabilities must be [N, K] with K >= 2 labels, got shape {tuple(probabilities.shape)}")
    gold = torch.as_tensor(gold, device=probabilities.device).long().reshape(-1)
    if gold.numel() != probabilities.shape[0]:
        raise ValueError(f"gold has {gold.numel()} labels for {probabilities.shape[0]} rows of probabilities")
    if gold.numel() and (int(gold.min()) < 0 or int(gold.max()) >= probabilities.shape[1]):
        raise ValueError(f"gold labels must lie in [0, {probabilities.shape[1]})")
    at_gold = probabilities.gather(1, gold[:, None]).squeeze(1)
    wrong = probabilities.scatter(1, gold[:, None], float("-inf")).max(dim=1).values
    return wrong - at_gold


def select_demonstrations(gold: Sequence[int] | torch.Tensor, shots: int, rule: str = "mcs", *,
                          scores: Sequence[float] | torch.Tensor | None = None, seed: int = 0) -> list[int]:
    """Pick ``shots`` demonstrations from a pool, in prompt order.

    Rules:

    - ``"mcs"`` (AMPLIFY's): the ``shots`` highest ``scores`` (misclassification confidence: the most
      confidently misclassified first), ties by pool index;
    - ``"balanced"``: the same per label, taken in turns (label 0's highest, label 1's highest, ..., then each
      label's second): equal counts per label when ``shots`` is a multiple of the labels present; the
      remainder goes to the first labels, and a label that runs out leaves its turns to the others;
    - ``"random"``: a seeded random sample (``scores`` not needed).

    Args:
        gold: ``[N]`` gold label indices of the pool.
        shots: the number of demonstrations (1 to N).
        rule: one of :data:`SELECTIONS`.
        scores: ``[N]`` misclassification confidence (:func:`misclassification_confidence`) for ``"mcs"`` and
            ``"balanced"``.
        seed: the seed of ``"random"``.

    Returns:
        pool indices, in the order the demonstrations go into the prompt.
    """
    gold_list = [int(g) for g in torch.as_tensor(gold).reshape(-1).tolist()]
    n = len(gold_list)
    if rule not in SELECTIONS:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {', '.join(SELECTIONS)}")
    if not 1 <= shots <= n:
        raise ValueError(f"shots must be between 1 and the pool size {n}, got {shots}")
    if rule == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(n)[:shots]]
    if scores is None:
        raise ValueError(f"selection {rule!r} needs the pool's misclassification confidence scores")
    values = [float(s) for s in torch.as_tensor(scores).reshape(-1).tolist()]
    if len(values) != n:
        raise ValueError(f"{len(values)} scores for a pool of {n}")
    ranked = sorted(range(n), key=lambda i: (-values[i], i))
    if rule == "mcs":
        return ranked[:shots]
    queues = {label: [i for i in ranked if gold_list[i] == label] for label in sorted(set(gold_list))}
    chosen: list[int] = []
    while len(chosen) < shots:
        for label, queue in queues.items():
            if queue and len(chosen) < shots:
                chosen.append(queue.pop(0))
    return chosen


# ---------------------------------------------------------------------------------------- words
def text_words(text: str) -> list[tuple[str, int, int]]:
    """The words of ``text`` as ``(word, start, end)`` characters: maximal runs of letters, digits and
    apostrophes that hold at least one letter or digit (punctuation and lone quotes are no words)."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text) if any(c.isalnum() for c in m.group())]


def word_relevance(text: str, offsets: Sequence[tuple[int, int] | None],
                   relevance: Sequence[float] | torch.Tensor) -> list[tuple[str, float, int]]:
    """Token relevance summed into the words of ``text``: ``[(word, relevance, start), ...]`` in text order.

    Each token (``offsets[t]``: its ``(start, end)`` characters in ``text``, ``None`` for the template, BOS and
    special tokens, which never count) adds its relevance to the word it overlaps most (the first on a tie);
    a token that overlaps no word (spaces, punctuation) adds to none. Words that no token covers are left out.

    Args:
        text: the text the offsets point into (``TextExplanation.span_text``).
        offsets: ``[T]`` each token's characters, or ``None``.
        relevance: ``[T]`` each token's relevance.
    """
    values = relevance.tolist() if isinstance(relevance, torch.Tensor) else list(relevance)
    if len(values) != len(offsets):
        raise ValueError(f"{len(values)} relevance values for {len(offsets)} tokens")
    words = text_words(text)
    totals: list[float | None] = [None] * len(words)
    for offset, value in zip(offsets, values):
        if offset is None:
            continue
        start, end = offset
        overlaps = [(min(end, w_end) - max(start, w_start), i) for i, (_, w_start, w_end) in enumerate(words)
                    if min(end, w_end) > max(start, w_start)]
        if not overlaps:
            continue
        best = max(overlaps, key=lambda pair: (pair[0], -pair[1]))[1]
        totals[best] = (totals[best] or 0.0) + float(value)
    return [(word, total, start) for (word, start, _), total in zip(words, totals) if total is not None]


def top_k_words(text: str, offsets: Sequence[tuple[int, int] | None], relevance: Sequence[float] | torch.Tensor,
                k: int) -> list[str]:
    """The ``k`` most relevant words of ``text`` (:func:`word_relevance`), most relevant first.

    Only words of positive relevance count (fewer than ``k`` come back when fewer have any); a word that
    occurs several times (compared case-insensitively) counts once, with its highest relevance and the
    spelling of that occurrence; equal relevance is broken by position (earlier first).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    best: dict[str, tuple[float, int, str]] = {}
    for word, value, start in word_relevance(text, offsets, relevance):
        key = word.lower()
        if value > 0 and (key not in best or value > best[key][0]):
            best[key] = (value, start, word)
    ranked = sorted(best.values(), key=lambda item: (-item[0], item[1]))
    return [word for _, _, word in ranked[:k]]


def random_words(text: str, k: int, seed: int) -> list[str]:
    """``k`` distinct words of ``text`` (:func:`text_words`, case-insensitively distinct) drawn at random with
    ``seed``: the control rationale (all of them when the text has fewer)."""
    distinct: dict[str, str] = {}
    for word, _, _ in text_words(" ".join(text.split())):
        distinct.setdefault(word.lower(), word)
    words = list(distinct.values())
    picked = np.random.default_rng(seed).permutation(len(words))[:k]
    return [words[int(i)] for i in picked]


def rationale_sentence(words: Sequence[str], label: str) -> str:
    """AMPLIFY's rationale for ``words`` and the correct ``label``.

    ``["w1"]`` -> ``The key word: w1 is an important clue to predict 'positive' as the correct answer.``;
    ``["w1", "w2", "w3"]`` -> ``The key words: w1, w2 and w3 are important clues to predict 'positive' as the
    correct answer.``
    """
    words = [w for w in words]
    if not words:
        raise ValueError("a rationale needs at least one word")
    if len(words) == 1:
        return f"The key word: {words[0]} is an important clue to predict '{label}' as the correct answer."
    listed = ", ".join(words[:-1]) + " and " + words[-1]
    return f"The key words: {listed} are important clues to predict '{label}' as the correct answer."


# --------------------------------------------------------------------------------------- prompts
@dataclass
class Demonstration:
    """One few-shot demonstration of the prompt.

    Attributes:
        text: the pool text.
        label: its gold label's name; label_word: the word the prompt writes for it.
        rationale: the rationale sentence, or ``None`` (no ``Rationale:`` line).
        words: the words the rationale names.
        index: its index in the pool; score: its misclassification confidence (``None`` when not computed).
    """

    text: str
    label: str
    label_word: str
    rationale: str | None = None
    words: list[str] = field(default_factory=list)
    index: int | None = None
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "label": self.label, "label_word": self.label_word,
                "score": self.score, "words": list(self.words), "rationale": self.rationale}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def build_prompt(demonstrations: Sequence[Demonstration], query: str, header: str = "") -> str:
    """The few-shot prompt of ``query``.

    Format (texts with their whitespace collapsed to single spaces, so that each field is one line)::

        {header}\\n\\n                          (only when a header is given)
        Input: {text}\\n
        Rationale: {rationale}\\n               (only for a demonstration with a rationale)
        Label: {label word}\\n
        \\n                                     (one block per demonstration)
        Input: {query}\\n
        Label:

    The prompt ends with ``Label:``: the target's next token after it is the query's label word (scored as
    the first token of ``" " + word``; :func:`target_label_logits`).
    """
    parts = [f"{header.strip()}\n\n"] if header.strip() else []
    for demo in demonstrations:
        block = f"Input: {_one_line(demo.text)}\n"
        if demo.rationale:
            block += f"Rationale: {demo.rationale}\n"
        parts.append(block + f"Label: {demo.label_word.strip()}\n\n")
    parts.append(f"Input: {_one_line(query)}\nLabel:")
    return "".join(parts)


# -------------------------------------------------------------------------------------- models
def resolve_labels(proxy: LoadedModel, values: Sequence[Any], label_map: Mapping[str, str] | None = None) -> list[int]:
    """Gold label values (a label name, its label word, a key of the task's ``labels`` such as ``1``, or a
    ``label_map`` key) -> indices into ``proxy.labels``, as ``explain-dataset`` reads gold labels."""
    from ..dataset.formats import InputRecord
    from ..dataset.labels import gold_aliases, map_gold

    names = proxy.labels
    records = [InputRecord(i, "x", None if v is None else str(v).strip() or None) for i, v in enumerate(values)]
    mapped = map_gold(records, gold_aliases(proxy, dict(label_map or {})), names)
    missing = [i for i in range(len(values)) if i not in mapped]
    if missing:
        raise ValueError(f"example {missing[0]} has no gold label ({len(missing)} without one): AMPLIFY needs "
                         "labelled pool and query examples")
    return [names.index(mapped[i]) for i in range(len(values))]


def proxy_probabilities(proxy: LoadedModel, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
    """``[N, K]`` the proxy's probabilities of its labels (``proxy.labels`` order) for each text (its task's
    prompt, temperature-scaled where ``task.json`` records a temperature, as its predictions)."""
    from ..architectures.registry import padding_leaks
    from ..inputs import call_model
    from ..text import encode, predict_label

    if not proxy.label_ids:
        raise ValueError(f"the proxy {proxy.name or ''} has no task (no task.json with label words, not a classifier): "
                         "it cannot score demonstrations")
    size = 1 if padding_leaks(proxy.model) else max(1, batch_size)
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), size):
            ids, mask = encode(proxy, list(texts[start:start + size]))
            for prediction in predict_label(proxy, call_model(proxy.model, ids, mask).logits):
                rows.append([prediction.probabilities[name] for name in proxy.labels])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(proxy.labels))


def _target_parts(target: TargetModel) -> tuple[Any, Any, bool]:
    """``(model, tokenizer, prepend BOS)`` of a target."""
    if isinstance(target, LoadedModel):
        return target.model, target.tokenizer, bool(target.task and target.task.get("add_bos_token", True))
    model, tokenizer = target
    return model, tokenizer, False


def load_target(name_or_path: str | None, *, dtype=None, device=None) -> TargetModel:
    """A target LM by name: :func:`~implicit_attention.loading.load_model`, or, for a causal LM the library
    does not explain, ``AutoModelForCausalLM`` and ``AutoTokenizer`` (the target only has to predict)."""
    from ..errors import UnsupportedModelError
    from ..loading import load_model

    try:
        return load_model(name_or_path, dtype=dtype, device=device)
    except UnsupportedModelError:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..loading import _parse_dtype

        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_parse_dtype(dtype))
        return model.to(device or "cpu").eval(), AutoTokenizer.from_pretrained(name_or_path)


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[int]:
    """The first token of ``" " + word`` for each label word (what follows ``Label:`` in the prompt)."""
    ids = []
    for word in label_words:
        pieces = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"label word {word!r} encodes to no token")
        ids.append(int(pieces[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(label_words)} share their first token ({ids}): the target could not "
                         "tell them apart; choose other label words")
    return ids


def _default_max_tokens(model, tokenizer) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


def encode_prompt(tokenizer, prompt: str, *, add_bos: bool, max_tokens: int | None) -> tuple[list[int], bool]:
    """``(token ids, whether it was cut)``: ``prompt`` encoded (the tokenizer's special tokens, and BOS in front
    when ``add_bos`` and missing), cut on the left to ``max_tokens`` tokens (a leading BOS kept)."""
    ids = list(tokenizer(prompt)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and isinstance(bos, int) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, False
    keep_bos = isinstance(bos, int) and ids[0] == bos and max_tokens > 1
    tail = max_tokens - int(keep_bos)
    return ([bos] if keep_bos else []) + ids[len(ids) - tail:], True


def target_label_logits(target: TargetModel, prompts: Sequence[str], label_words: Sequence[str], *,
                        max_tokens: int | None = None, progress: bool = False) -> torch.Tensor:
    """``[N, K]`` the target's next-token logits of the label words' first tokens after each prompt.

    Each prompt runs alone (no padding). ``max_tokens`` (default: the model's context length from its config,
    else the tokenizer's ``model_max_length``) cuts longer prompts on the left, with a
    :class:`PromptTruncatedWarning`. The prediction is the argmax over the K labels.
    """
    from tqdm.auto import tqdm

    from ..inputs import call_model
    from ..scans import parallel_scans

    model, tokenizer, add_bos = _target_parts(target)
    ids_of_labels = torch.tensor(label_token_ids(tokenizer, label_words))
    limit = _default_max_tokens(model, tokenizer) if max_tokens is None else max_tokens
    if limit is not None and limit < 1:
        raise ValueError(f"max_tokens must be at least 1, got {limit}")
    device = next(model.parameters()).device
    rows, cut = [], 0
    # a Mamba target runs its scans in parallel (mambapy) rather than token by token, its flags restored after
    with torch.no_grad(), parallel_scans(model):
        for prompt in tqdm(prompts, unit="query", disable=not progress, dynamic_ncols=True):
            ids, truncated = encode_prompt(tokenizer, prompt, add_bos=add_bos, max_tokens=limit)
            cut += truncated
            input_ids = torch.tensor([ids], device=device)
            logits = call_model(model, input_ids, torch.ones_like(input_ids)).logits
            rows.append(logits[0, -1].float().cpu().index_select(0, ids_of_labels))
    if cut:
        warnings.warn(f"{cut} of {len(prompts)} prompts were longer than max_tokens={limit} tokens and were cut on "
                      "the left (their first demonstrations lost): use fewer --shots or a smaller --k",
                      PromptTruncatedWarning, stacklevel=2)
    return torch.stack(rows) if rows else torch.zeros(0, len(label_words))


# ---------------------------------------------------------------------------------- rationales
def demonstration_words(proxy: LoadedModel, texts: Sequence[str], gold: Sequence[int], source: RationaleSource, *,
                        k: int, variant: str = "unified", seed: int = 0, keys: Sequence[int] | None = None,
                        method_options: Mapping[str, Any] | None = None, batch_size: int = 16) -> list[list[str]]:
    """The rationale words of each demonstration (``[]``: no rationale).

    Args:
        proxy: the explained model.
        texts, gold: the demonstrations' texts and gold label indices (into ``proxy.labels``).
        source: a method of the library (the proxy's explanation of the gold label's score, with ``variant``
            for the implicit attention methods; :func:`top_k_words`), ``"none"``, ``"random"``
            (:func:`random_words`, seeded by ``seed`` and ``keys[i]``, default the position) or a callable
            ``text -> words`` (its first ``k`` words).
        k: words per rationale.
        method_options: options of the method (``steps=...``).
        batch_size: texts explained together.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    keys = list(range(len(texts))) if keys is None else list(keys)
    if callable(source):
        return [[str(w).strip() for w in source(text) if str(w).strip()][:k] for text in texts]
    if source == "none":
        return [[] for _ in texts]
    if source == "random":
        return [random_words(text, k, seed=np.random.SeedSequence([seed, key]).generate_state(1)[0])
                for text, key in zip(texts, keys)]
    if source not in METHODS:
        raise ValueError(f"unknown rationale source {source!r}; choose a method ({', '.join(METHODS)}), "
                         f"{' or '.join(RATIONALE_CONTROLS)}, or pass a callable text -> words")
    if source in BASELINE_METHODS and variant != "unified":
        raise ValueError(f"variant {variant!r} does not apply to the {source} baseline: it decomposes no layer")
    from ..explanations.texts import explain_texts

    words: list[list[str]] = [[] for _ in texts]
    for label in sorted(set(gold)):
        rows = [i for i, g in enumerate(gold) if g == label]
        # a batch at a time: the explanation's memory grows with the batch times the longest text squared
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            result = explain_texts(proxy, [texts[i] for i in chunk], method=source, variant=variant,
                                   target=proxy.labels[label], **dict(method_options or {}))
            for i, example in zip(chunk, result):
                words[i] = top_k_words(example.span_text, example.offsets, example.relevance, k)
    return words


# ------------------------------------------------------------------------------------ pipeline
@dataclass
class AmplifyResult:
    """What :func:`amplify` measured.

    Attributes:
        demonstrations: the selected demonstrations, in prompt order, with their rationales.
        first_prompt: the prompt of the first query.
        labels: the label names; label_words: what the prompts write for them.
        queries: the query texts; gold: ``[Q]`` their gold label indices; predictions: ``[Q]`` the target's.
        label_logits: ``[Q, K]`` the target's logits of the label words' first tokens.
        accuracy: the target's accuracy with its bootstrap interval.
        settings: the parameters of the run.
    """

    demonstrations: list[Demonstration]
    first_prompt: str
    labels: list[str]
    label_words: list[str]
    queries: list[str]
    gold: list[int]
    predictions: list[int]
    label_logits: torch.Tensor
    accuracy: Interval
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> list[bool]:
        return [p == g for p, g in zip(self.predictions, self.gold)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the ``--out`` file of ``implicit-attention amplify``)."""
        return {
            "accuracy": self.accuracy.mean,
            "interval": [self.accuracy.low, self.accuracy.high],
            "confidence": self.accuracy.confidence,
            "n": self.accuracy.n,
            "settings": self.settings,
            "labels": self.labels,
            "label_words": self.label_words,
            "demonstrations": [d.to_dict() for d in self.demonstrations],
            "first_prompt": self.first_prompt,
            "queries": [{"text": text, "gold": self.labels[g], "prediction": self.labels[p],
                         "label_logits": [float(v) for v in row]}
                        for text, g, p, row in zip(self.queries, self.gold, self.predictions,
                                                   self.label_logits.tolist())],
        }


def amplify(proxy: LoadedModel, pool: Sequence[tuple[str, Any]], queries: Sequence[tuple[str, Any]], *,
            target: TargetModel | None = None, shots: int = 8, k: int = 5, selection: str = "mcs",
            rationale: RationaleSource = "attribution", variant: str = "unified",
            label_words: Mapping[str, str] | None = None, label_map: Mapping[str, str] | None = None,
            seed: int = 0, max_tokens: int | None = None, header: str = "", batch_size: int = 16,
            method_options: Mapping[str, Any] | None = None, confidence: float = 0.95,
            progress: bool = True) -> AmplifyResult:
    """Run AMPLIFY: select demonstrations with the proxy, write their rationales, prompt the target.

    Args:
        proxy: the explained model (a task model or a classifier: it needs label probabilities).
        pool: ``(text, gold label)`` candidates for the demonstrations; queries: ``(text, gold label)`` to
            predict. Gold labels as :func:`resolve_labels` reads them (``1``/``0`` or ``"positive"`` for the
            bundled model; others through ``label_map``).
        target: the LM that reads the prompts (a :class:`~implicit_attention.loading.LoadedModel` or a
            ``(model, tokenizer)`` pair of any causal LM); default the proxy.
        shots: the number of demonstrations; k: words per rationale.
        selection: ``"mcs"`` (AMPLIFY), ``"balanced"`` or ``"random"`` (:func:`select_demonstrations`).
        rationale, variant, method_options: the rationale source (:func:`demonstration_words`).
        label_words: ``{label: word}`` the prompt writes for each label (default the label names).
        seed: for the random selection, the random words and the bootstrap.
        max_tokens: the target's prompt limit (:func:`target_label_logits`).
        header: an optional instruction line at the top of every prompt.
        batch_size: texts per batch when the proxy scores the pool.
        confidence: the level of the accuracy's bootstrap interval.
        progress: a tqdm bar over the queries.

    Returns:
        :class:`AmplifyResult`.
    """
    labels = proxy.labels
    if len(labels) < 2:
        raise ValueError("the proxy needs a task with two labels or more (task.json label words, or a classifier)")
    words_of = {name: (label_words or {}).get(name, name) for name in labels}
    unknown = set(label_words or {}) - set(labels)
    if unknown:
        raise ValueError(f"label_words names {', '.join(sorted(unknown))}, not labels of the proxy ({', '.join(labels)})")
    if not queries:
        raise ValueError("no queries")
    for what, rows in (("pool", pool), ("queries", queries)):
        empty = next((i for i, (text, _) in enumerate(rows) if not str(text).strip()), None)
        if empty is not None:
            raise ValueError(f"{what} example {empty} has an empty text")
    pool_texts = [text for text, _ in pool]
    pool_gold = resolve_labels(proxy, [label for _, label in pool], label_map)
    query_texts = [text for text, _ in queries]
    query_gold = resolve_labels(proxy, [label for _, label in queries], label_map)

    scores = None
    if selection != "random":
        probabilities = proxy_probabilities(proxy, pool_texts, batch_size=batch_size)
        scores = misclassification_confidence(probabilities, torch.tensor(pool_gold))
    chosen = select_demonstrations(pool_gold, shots, selection, scores=scores, seed=seed)
    texts = [pool_texts[i] for i in chosen]
    gold = [pool_gold[i] for i in chosen]
    words = demonstration_words(proxy, texts, gold, rationale, k=k, variant=variant, seed=seed, keys=chosen,
                                method_options=method_options)
    demonstrations = [
        Demonstration(text=text, label=labels[g], label_word=words_of[labels[g]],
                      rationale=rationale_sentence(w, words_of[labels[g]].strip()) if w else None, words=w,
                      index=i, score=None if scores is None else float(scores[i]))
        for text, g, w, i in zip(texts, gold, words, chosen)]

    prompts = [build_prompt(demonstrations, query, header) for query in query_texts]
    target = proxy if target is None else target
    logits = target_label_logits(target, prompts, [words_of[name] for name in labels], max_tokens=max_tokens,
                                 progress=progress)
    predictions = [int(i) for i in logits.argmax(dim=1).tolist()]
    correct = [float(p == g) for p, g in zip(predictions, query_gold)]
    source = getattr(rationale, "__name__", "callable") if callable(rationale) else rationale
    settings = {"shots": shots, "k": k, "selection": selection, "rationale": source,
                "variant": variant if source in METHODS and source not in BASELINE_METHODS else None,
                "seed": seed, "max_tokens": max_tokens, "pool_size": len(pool), "queries": len(queries),
                "method_options": dict(method_options or {}), "header": header}
    return AmplifyResult(demonstrations=demonstrations, first_prompt=prompts[0], labels=labels,
                         label_words=[words_of[name] for name in labels], queries=query_texts, gold=query_gold,
                         predictions=predictions, label_logits=logits,
                         accuracy=mean_ci(correct, confidence=confidence, seed=seed), settings=settings)
