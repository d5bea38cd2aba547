"""AMPLIFY (implicit_attention.applications.amplify): hand-made scores, selections, words, rationales and prompts,
the target's label-word prediction against a direct forward, and reduced end-to-end runs on the bundled model."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from implicit_attention import cli
from implicit_attention.applications.amplify import (
    Demonstration,
    PromptTruncatedWarning,
    amplify,
    build_prompt,
    demonstration_words,
    misclassification_confidence,
    random_words,
    rationale_sentence,
    select_demonstrations,
    target_label_logits,
    text_words,
    top_k_words,
    word_relevance,
)
from implicit_attention.bundled import bundled_model_path
from implicit_attention.text import encode_text

needs_bundled = pytest.mark.skipif(not (bundled_model_path() / "model.safetensors").is_file(),
                                   reason="bundled model not present")

POOL = [
    ("a gorgeous, witty and moving film", 1),
    ("a dull, lifeless mess of a movie", 0),
    ("the performances are wonderful and the script is sharp", 1),
    ("tedious, predictable and far too long", 0),
    ("not bad, but not good either", 0),
    ("an utterly charming comedy with a big heart", 1),
    ("the plot makes no sense and the jokes fall flat", 0),
    ("it's funny, smart and surprisingly tender", 1),
    ("a bland sequel that nobody asked for", 0),
    ("never boring, often thrilling", 1),
]
QUERIES = [
    ("a delightful and clever little film", 1),
    ("an ugly, pointless waste of time", 0),
    ("the cast is great but the story drags", 0),
    ("a warm, funny crowd-pleaser", 1),
]


@pytest.fixture(scope="module")
def loaded():
    from implicit_attention.loading import load_model

    return load_model()


# ------------------------------------------------------------------------------------ scores
def test_misclassification_confidence_on_a_hand_made_table() -> None:
    probabilities = torch.tensor([[0.7, 0.2, 0.1],     # right, wrong labels at most 0.2: 0.2 - 0.7
                                  [0.1, 0.3, 0.6],     # wrong: 0.6 - 0.1
                                  [0.5, 0.5, 0.0],     # a tie: 0.5 - 0.5
                                  [0.25, 0.25, 0.5]])  # gold 2, wrong at most 0.25
    gold = torch.tensor([0, 0, 1, 2])
    assert torch.allclose(misclassification_confidence(probabilities, gold), torch.tensor([-0.5, 0.5, 0.0, -0.25]))
    # two labels: 1 - 2 p(gold)
    two = torch.tensor([[0.9, 0.1], [0.3, 0.7]], dtype=torch.float64)
    assert misclassification_confidence(two, torch.tensor([1, 1])).tolist() == pytest.approx([0.8, -0.4])
    with pytest.raises(ValueError, match="K >= 2"):
        misclassification_confidence(torch.ones(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        misclassification_confidence(two, torch.tensor([0, 2]))


def test_selection_orders() -> None:
    scores = [0.1, 0.9, -0.3, 0.9, 0.5]
    gold = [0, 1, 0, 0, 1]
    assert select_demonstrations(gold, 3, "mcs", scores=scores) == [1, 3, 4]         # tie 0.9: pool order
    # balanced: label 0 by MCS is 3, 0, 2; label 1 is 1, 4; taken in turns
    assert select_demonstrations(gold, 4, "balanced", scores=scores) == [3, 1, 0, 4]
    assert select_demonstrations(gold, 5, "balanced", scores=scores) == [3, 1, 0, 4, 2]  # label 1 ran out
    assert select_demonstrations(gold, 3, "balanced", scores=scores) == [3, 1, 0]        # remainder: label 0
    many = [i % 2 for i in range(50)]
    first = select_demonstrations(many, 6, "random", seed=1)
    assert first == select_demonstrations(many, 6, "random", seed=1)
    assert len(set(first)) == 6 and all(0 <= i < 50 for i in first)
    assert first != select_demonstrations(many, 6, "random", seed=2)
    with pytest.raises(ValueError, match="between 1 and the pool size 5"):
        select_demonstrations(gold, 6, "mcs", scores=scores)
    with pytest.raises(ValueError, match="needs the pool's misclassification"):
        select_demonstrations(gold, 2, "mcs")
    with pytest.raises(ValueError, match="unknown selection"):
        select_demonstrations(gold, 2, "best", scores=scores)


# ------------------------------------------------------------------------------------- words
#          0         1         2         3
#          0123456789012345678901234567890123456
TEXT = "a dazzling, dazzling film isn't bad"
TOKENS = [  # (offsets, relevance): BOS and the template's tokens (None) carry large values that must not count
    (None, 5.0),
    ((0, 1), 0.125),            # a
    ((1, 6), 0.25),             # " dazz" (its space belongs to no word)
    ((6, 10), 0.5),             # "ling" -> dazzling = 0.75
    ((10, 11), 3.0),            # "," punctuation: no word
    ((11, 16), 0.25),           # " dazz"
    ((16, 20), 0.125),          # "ling" -> the second dazzling = 0.375
    ((20, 25), 0.75),           # " film" = 0.75, a tie with the first dazzling
    ((25, 29), 0.25),           # " isn"
    ((29, 31), 0.25),           # "'t" -> isn't = 0.5
    ((31, 35), -1.0),           # " bad": negative
    (None, 9.0),                # " sentiment" (template)
    (None, 7.0),                # ":" (template)
]


def test_words_of_a_text() -> None:
    assert [w for w, _, _ in text_words("it's a -- 'quiet' film, 2 stars ...")] == \
        ["it's", "a", "'quiet'", "film", "2", "stars"]


def test_word_relevance_merges_subwords_and_skips_template_and_punctuation() -> None:
    offsets, relevance = zip(*TOKENS)
    assert word_relevance(TEXT, offsets, torch.tensor(relevance)) == [
        ("a", 0.125, 0), ("dazzling", 0.75, 2), ("dazzling", 0.375, 12), ("film", 0.75, 21), ("isn't", 0.5, 26),
        ("bad", -1.0, 32)]


def test_top_k_words() -> None:
    offsets, relevance = zip(*TOKENS)
    # positive words only (bad is left out even with room), dazzling once, the tie dazzling/film by position
    assert top_k_words(TEXT, offsets, relevance, 5) == ["dazzling", "film", "isn't", "a"]
    assert top_k_words(TEXT, offsets, relevance, 2) == ["dazzling", "film"]
    # a repeated word keeps its highest score (not its first): good (1.0) before fine (0.5)
    assert top_k_words("good fine Good", [(0, 4), (4, 9), (9, 14)], [0.25, 0.5, 1.0], 2) == ["Good", "fine"]
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k_words(TEXT, offsets, relevance, 0)


def test_random_words_are_distinct_words_of_the_text_and_seeded() -> None:
    text = "the the cat sat on the mat , quietly"
    words = random_words(text, 3, seed=4)
    assert len(words) == 3 and len(set(words)) == 3
    assert set(words) <= {"the", "cat", "sat", "on", "mat", "quietly"}
    assert words == random_words(text, 3, seed=4)
    assert sorted(random_words(text, 10, seed=0)) == sorted(["the", "cat", "sat", "on", "mat", "quietly"])


# ------------------------------------------------------------------------------- rationales, prompt
def test_rationale_sentences() -> None:
    assert rationale_sentence(["gorgeous"], "positive") == \
        "The key word: gorgeous is an important clue to predict 'positive' as the correct answer."
    assert rationale_sentence(["dull", "mess"], "negative") == \
        "The key words: dull and mess are important clues to predict 'negative' as the correct answer."
    assert rationale_sentence(["w1", "w2", "w3"], "positive") == \
        "The key words: w1, w2 and w3 are important clues to predict 'positive' as the correct answer."
    with pytest.raises(ValueError):
        rationale_sentence([], "positive")


def test_prompt_builder() -> None:
    demonstrations = [
        Demonstration(text="a  gorgeous\nfilm", label="positive", label_word="positive",
                      rationale="The key word: gorgeous is an important clue to predict 'positive' as the correct "
                                "answer."),
        Demonstration(text="a dull mess", label="negative", label_word="negative"),          # no rationale
    ]
    assert build_prompt(demonstrations, " what a  ride ") == (
        "Input: a gorgeous film\n"
        "Rationale: The key word: gorgeous is an important clue to predict 'positive' as the correct answer.\n"
        "Label: positive\n"
        "\n"
        "Input: a dull mess\n"
        "Label: negative\n"
        "\n"
        "Input: what a ride\n"
        "Label:")
    assert build_prompt(demonstrations[1:], "ok", header="Classify the sentiment.") == (
        "Classify the sentiment.\n\nInput: a dull mess\nLabel: negative\n\nInput: ok\nLabel:")


# ------------------------------------------------------------------------------------ the target
def _direct_logits(loaded, prompt: str) -> torch.Tensor:
    """The bundled model's logits of the task's label tokens (task.json) after ``prompt``, by one plain forward."""
    ids = loaded.tokenizer(prompt)["input_ids"]
    assert ids[0] == loaded.tokenizer.bos_token_id
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return logits[[loaded.label_ids["negative"], loaded.label_ids["positive"]]]


@needs_bundled
def test_target_prediction_matches_a_direct_forward(loaded) -> None:
    prompts = ["Input: a dull mess\nLabel: negative\n\nInput: a gorgeous film\nLabel:",
               "Input: what a waste of time\nLabel:"]
    logits = target_label_logits(loaded, prompts, ["negative", "positive"])
    expected = torch.stack([_direct_logits(loaded, p) for p in prompts])
    assert torch.allclose(logits, expected, atol=1e-5)
    assert logits.argmax(1).tolist() == expected.argmax(1).tolist()
    # a (model, tokenizer) pair reads the same prompt (its tokenizer adds BOS itself)
    pair = target_label_logits((loaded.model, loaded.tokenizer), prompts[:1], ["negative", "positive"])
    assert torch.allclose(pair, expected[:1], atol=1e-5)
    # cut on the left to 8 tokens (BOS kept), with a warning
    ids = loaded.tokenizer(prompts[0])["input_ids"]
    with pytest.warns(PromptTruncatedWarning, match="1 of 1 prompts"):
        short = target_label_logits(loaded, prompts[:1], ["negative", "positive"], max_tokens=8)
    with torch.no_grad():
        cut = loaded.model(input_ids=torch.tensor([[ids[0], *ids[-7:]]])).logits[0, -1]
    assert torch.allclose(short[0], cut[[loaded.label_ids["negative"], loaded.label_ids["positive"]]], atol=1e-5)
    assert not torch.allclose(short[0], expected[0], atol=1e-3)
    with pytest.raises(ValueError, match="share their first token"):
        target_label_logits(loaded, prompts, ["positive", "positive"])


# ---------------------------------------------------------------------------------- end to end
def _proxy_mcs(loaded, texts, gold) -> list[float]:
    """MCS of each text, one text at a time: the task's temperature-scaled softmax over its label tokens."""
    temperature = float(loaded.task.get("temperature", 1.0))
    ids = [loaded.label_ids[name] for name in loaded.labels]
    out = []
    for text, g in zip(texts, gold):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([encode_text(loaded, text).ids])).logits[0, -1, ids]
        p = (logits.double() / temperature).softmax(0)
        out.append(float(p[1 - g] - p[g]))
    return out


@needs_bundled
def test_amplify_end_to_end(loaded) -> None:
    result = amplify(loaded, POOL, QUERIES, shots=3, k=2, progress=False)
    texts = [t for t, _ in POOL]
    gold = [g for _, g in POOL]
    mcs = _proxy_mcs(loaded, texts, gold)
    expected = sorted(range(len(POOL)), key=lambda i: -mcs[i])[:3]
    assert [d.index for d in result.demonstrations] == expected
    assert [d.score for d in result.demonstrations] == pytest.approx([mcs[i] for i in expected], abs=1e-5)
    for demo in result.demonstrations:
        assert demo.label == loaded.labels[gold[demo.index]]
        assert 1 <= len(demo.words) <= 2
        assert set(demo.words) <= {w for w, _, _ in text_words(demo.text)}
        assert demo.rationale == rationale_sentence(demo.words, demo.label)
        assert f"Input: {demo.text}\nRationale: {demo.rationale}\nLabel: {demo.label}\n\n" in result.first_prompt
    assert result.first_prompt.endswith(f"Input: {QUERIES[0][0]}\nLabel:")
    first = _direct_logits(loaded, result.first_prompt)
    assert torch.allclose(result.label_logits[0], first, atol=1e-5)
    assert result.predictions[0] == int(first.argmax())
    assert result.gold == [g for _, g in QUERIES]
    hits = sum(p == g for p, g in zip(result.predictions, result.gold))
    assert result.accuracy.mean == pytest.approx(hits / len(QUERIES))
    assert result.accuracy.low <= result.accuracy.mean <= result.accuracy.high and result.accuracy.n == 4

    # the same demonstrations without rationales, with random words, with a callable
    bare = amplify(loaded, POOL, QUERIES[:1], shots=3, k=2, rationale="none", progress=False)
    assert [d.index for d in bare.demonstrations] == expected
    assert "Rationale:" not in bare.first_prompt
    assert bare.first_prompt == build_prompt([Demonstration(d.text, d.label, d.label_word)
                                              for d in result.demonstrations], QUERIES[0][0])
    shuffled = amplify(loaded, POOL, QUERIES[:1], shots=3, k=2, rationale="random", seed=3, progress=False)
    again = amplify(loaded, POOL, QUERIES[:1], shots=3, k=2, rationale="random", seed=3, progress=False)
    assert [d.words for d in shuffled.demonstrations] == [d.words for d in again.demonstrations]
    for demo in shuffled.demonstrations:
        assert len(demo.words) == 2 and set(demo.words) <= {w for w, _, _ in text_words(demo.text)}
    keyed = amplify(loaded, POOL, QUERIES[:1], shots=2, k=1, selection="balanced", progress=False,
                    rationale=lambda text: [text.split()[-1], "ignored"], label_words={"positive": "good",
                                                                                       "negative": "bad"})
    assert sorted(d.label for d in keyed.demonstrations) == ["negative", "positive"]
    for demo in keyed.demonstrations:
        assert demo.words == [demo.text.split()[-1]]
        assert f"Label: {demo.label_word}\n" in keyed.first_prompt
        assert demo.rationale.endswith(f"predict '{demo.label_word}' as the correct answer.")


@needs_bundled
def test_rationale_words_explain_the_gold_label(loaded) -> None:
    """The explanation behind a rationale is of the gold label's score, whatever the proxy predicts."""
    from implicit_attention.explanations.texts import explain_texts

    text = "not bad, but not good either"
    for label in (0, 1):
        words = demonstration_words(loaded, [text], [label], "attribution", k=3)[0]
        example = explain_texts(loaded, [text], target=loaded.labels[label])[0]
        assert example.target.label == loaded.labels[label]
        assert words == top_k_words(example.span_text, example.offsets, example.relevance, 3)
        assert words and "sentiment" not in words
    # explained a batch at a time: batches of 2 give each text its words, in the caller's order
    texts = [text, "a warm, funny film", "dull and far too long", "the cast is great", "an utter mess"]
    gold = [0, 1, 0, 1, 0]
    assert demonstration_words(loaded, texts, gold, "attribution", k=2, batch_size=2) == \
        [demonstration_words(loaded, [t], [g], "attribution", k=2)[0] for t, g in zip(texts, gold)]
    with pytest.raises(ValueError, match="does not apply to the grad_x_input baseline"):
        demonstration_words(loaded, [text], [0], "grad_x_input", k=3, variant="s6")
    with pytest.raises(ValueError, match="unknown rationale source"):
        demonstration_words(loaded, [text], [0], "magic", k=3)


# ------------------------------------------------------------------------------------------ CLI
@needs_bundled
def test_cli_amplify(capsys, tmp_path: Path) -> None:
    pool = tmp_path / "pool.csv"
    pool.write_text("review,verdict\n" + "".join(f'"{t}",{"fresh" if g else "rotten"}\n' for t, g in POOL))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"review": t, "verdict": "fresh" if g else "rotten"}) + "\n"
                               for t, g in QUERIES))
    out = tmp_path / "amplify.json"
    argv = ["amplify", "--pool", str(pool), "--queries", str(queries), "--text-column", "review", "--label-column",
            "verdict", "--label-map", "fresh=positive,rotten=negative", "--shots", "3", "--k", "2", "--no-progress",
            "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = cli.main(argv)
    printed = capsys.readouterr().out
    assert status == 0
    saved = json.loads(out.read_text())
    assert len(saved["demonstrations"]) == 3
    for demo in saved["demonstrations"]:
        assert demo["rationale"] and f"Rationale: {demo['rationale']}\n" in printed
        assert demo["text"] in printed
    assert saved["first_prompt"] in printed
    correct = sum(q["gold"] == q["prediction"] for q in saved["queries"])
    assert [q["gold"] for q in saved["queries"]] == ["positive" if g else "negative" for _, g in QUERIES]
    assert saved["accuracy"] == pytest.approx(correct / len(QUERIES)) and saved["n"] == len(QUERIES)
    low, high = saved["interval"]
    assert low <= saved["accuracy"] <= high
    assert f"target accuracy: {saved['accuracy']:.4f} [{low:.4f}, {high:.4f}]" in printed
    # the Python function on the same data gives the same demonstrations and predictions
    from implicit_attention.loading import load_model

    same = amplify(load_model(), POOL, QUERIES, shots=3, k=2, progress=False)
    assert [d.to_dict()["rationale"] for d in same.demonstrations] == [d["rationale"] for d in saved["demonstrations"]]
    assert [same.labels[p] for p in same.predictions] == [q["prediction"] for q in saved["queries"]]

    # an existing --out is refused; bad options are one-line errors with status 2
    for extra, needle in ((["--out", str(out)], "exists"), (["--shots", "0"], "--shots must be at least 1"),
                          (["--pool", str(tmp_path / "none.csv")], "no such file"),
                          (["--rationale", "none", "--variant", "s6"], "--variant and --option apply")):
        status = cli.main(["amplify", "--queries", str(queries), "--text-column", "review", "--label-column",
                           "verdict", *extra])
        err = capsys.readouterr().err
        assert status == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1
    # more shots than the pool holds: refused before any model is loaded (nothing printed on stdout)
    status = cli.main(["amplify", "--pool", str(pool), "--queries", str(queries), "--text-column", "review",
                       "--label-column", "verdict", "--label-map", "fresh=positive,rotten=negative",
                       "--shots", str(len(POOL) + 1)])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err == f"error: shots must be between 1 and the pool size {len(POOL)}, got {len(POOL) + 1}\n"


def test_cli_amplify_help_does_not_import_torch() -> None:
    code = ("import sys; from implicit_attention import cli; status = cli.main(['amplify', '--help']); "
            "print(status, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "AMPLIFY" in done.stdout and done.stdout.strip().endswith("0 False")
