#!/usr/bin/env python
"""Meta-train a small causal LM to classify in context from AMPLIFY prompts: the target of issue 15's measurement.

Every training episode is a new planted-keyword task with random keyword sets
(``implicit_attention.applications.episodes``): labelled demonstrations (``--shots``, or a number drawn
from ``--train-shots``) and a query, written as AMPLIFY's prompt. Its difficulty can be drawn per
episode: ``--words-per-set`` keywords per label (one puts the same word in every example of a label),
``--words`` words per example. A share ``--rationale-share`` of the episodes give each demonstration the
true rationale (its planted keywords, at most ``--k``), the others none, so the target learns both
formats (``--rationales demonstration``: each demonstration draws for itself, so that those without one
are queries of the ones before). The loss is the cross-entropy of every label word after ``Label:``
(the demonstrations' and the query's), plus ``--quote-weight`` times that of each rationale's quoted
label and ``--lm-weight`` times the language-modelling loss on the other tokens.

Three options give a small model denser signals, meant to carry it past the long plateau where it
answers every query with a coin (binary labels give no stepping stone: the query's loss stays at ln 2
until the whole matching circuit works); none has done so yet in the steps tried
(``docs/benchmark/amplify/gpu-run5-induction``). ``--random-labels`` writes a share of the episodes
with two random words as the label names (``Label: harbour`` for one label, ``Label: violin`` for the
other, new words each episode): a label is then one word of thousands, and copying the label words
seen earlier in the prompt already lowers the loss, a first step that matching the query's words
would refine. ``--tasks`` interleaves the demonstrations of several random tasks, each with its own
names. ``--induction-rows`` adds rows of random tokens repeated once, with the loss on every token of
the repeat: the dense objective that forms induction heads (attend to the token after an earlier
occurrence of this one) within about a thousand steps. Evaluations always use the label names
``first`` and ``second``.

The held-out task of the faithfulness benchmark (food against tools) never appears: its words are in
the keyword vocabulary as any other (each one a keyword of about 0.6% of the random tasks, for a
random label), but never its keyword sets and labels. ``--exclude-held-out-words`` keeps them out of
the vocabulary (then the target learns that they never decide a task).

Every ``--eval-every`` steps the query accuracy on ``--eval-episodes`` fixed episodes of unseen random
tasks (distractor text of the validation split) is recorded with the true rationales, with none and with
random words of each demonstration. The model (the causal LM of ``--init``, or a new Llama of
``--layers`` x ``--width``; the zoo's tokenizer) is saved as a Hugging Face directory in ``--out`` with
``icl.json`` (settings, history, time, hardware); ``--out/checkpoint.pt`` lets an interrupted run
continue (``--resume``), and ``--time-limit`` stops in time and exits with status 3 (not a failure:
continue with ``--resume``).

Examples::

    python scripts/train_icl_target.py --device cuda --steps 20000 --batch-size 64      # a new Llama
    python scripts/train_icl_target.py --init zoo/mamba --device cuda --batch-size 64 --workers 12   # from the zoo's Mamba
    python scripts/train_icl_target.py --steps 300 --width 64 --layers 2 --batch-size 8   # a quick look on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

import torch  # noqa: E402

from implicit_attention.applications.amplify import (  # noqa: E402
    Demonstration,
    build_prompt,
    random_words,
    rationale_sentence,
)
from implicit_attention.applications.episodes import (  # noqa: E402
    DEFAULT_DECOYS,
    LABEL_NAMES,
    SentenceIndex,
    episode_prompt,
    keyword_matching_credit,
    keyword_vocabulary,
    label_positions,
    make_episode,
    planted_rationale_words,
    quoted_label_positions,
    random_task,
)
from implicit_attention.benchmark import groundtruth  # noqa: E402


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout kept, and every option's default shown (not for flags, nor where there is none)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "icl-target", help="model directory")
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / "out" / "corpus" / "english.jsonl.gz",
                        help="the English corpus (scripts/build_corpus.py)")
    parser.add_argument("--distractors", choices=("english", "rotten_tomatoes"), default="english",
                        help="distractor text: the English corpus, or the Rotten Tomatoes sentences (no corpus needed)")
    parser.add_argument("--tokenizer", type=Path, default=REPO_ROOT / "zoo" / "mamba",
                        help="a directory with the tokenizer to use (the zoo's)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="episodes per step")
    parser.add_argument("--shots", type=int, default=4, help="demonstrations per episode")
    parser.add_argument("--k", type=int, default=3, help="words per rationale")
    parser.add_argument("--rationale-share", type=float, default=0.5,
                        help="episodes (or demonstrations, with --rationales demonstration) with the true rationales")
    parser.add_argument("--rationales", choices=("episode", "demonstration"), default="episode",
                        help="what draws whether rationales are given: each episode (all its demonstrations or none), "
                             "or each demonstration (a demonstration without one, after some with, is a query whose "
                             "label follows from earlier rationales: more matching to learn from per episode)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this pre-trained causal LM (e.g. zoo/mamba, whose tokenizer is "
                             "the zoo's) instead of a new Llama of --layers x --width")
    parser.add_argument("--width", type=int, default=256, help="width of a new Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of a new Llama")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of a new Llama")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=200, help="fixed unseen-task episodes per evaluation")
    parser.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that draw the episodes ahead of the model (0: in this process); a batch's "
                             "episodes depend on --seed and the step only, so the result does not depend on it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the episodes (and of a new Llama)")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--words", default=None, metavar="MIN,MAX",
                        help="words per training example (shorter text makes matching keywords across the "
                             "demonstrations easier to learn); when not given, the held-out task's 20-48, which "
                             "evaluations always keep")
    parser.add_argument("--words-per-set", default="6,6", metavar="MIN,MAX",
                        help="keywords per label of each training task, drawn per episode: with one, every "
                             "example of a label holds the same word (an easy start for learning to match words "
                             "across the demonstrations); evaluations keep 6")
    parser.add_argument("--train-shots", default=None, metavar="MIN,MAX",
                        help="demonstrations per training episode, drawn per episode (more shots: more label "
                             "words that matching predicts, a denser signal); when not given, --shots")
    parser.add_argument("--lm-weight", type=float, default=0.0,
                        help="weight of a language-modelling loss on every token other than the label words, added "
                             "to theirs: it rewards copying from the context (a rationale repeats words of its "
                             "demonstration, and the label it quotes can be told from earlier rationales that "
                             "name the same words); 0: the label words alone")
    parser.add_argument("--quote-weight", type=float, default=0.0,
                        help="weight of the cross-entropy of each rationale's quoted label ('to predict 'first''), "
                             "added to the label words': matching in miniature, as the rationale's words stand a few "
                             "tokens before it and the label they imply follows from earlier demonstrations only; "
                             "0: not counted")
    parser.add_argument("--tasks", default="1,1", metavar="MIN,MAX",
                        help="random tasks per training episode, drawn per episode: their demonstrations interleaved, "
                             "the query from one of them; with --random-labels each task has its own two label "
                             "names, so a label is one of 2 x tasks (copying any earlier label is then right less "
                             "often, and matching the query's words pays more)")
    parser.add_argument("--random-labels", type=float, default=0.0, metavar="SHARE",
                        help="share of the training episodes whose two label names are random words of the keyword "
                             "vocabulary (new ones each episode) instead of 'first' and 'second': a label is then "
                             "copied from the prompt, a stepping stone towards matching; 0: none")
    parser.add_argument("--induction-rows", type=int, default=0,
                        help="rows of random tokens repeated once added to each step, with the language-modelling "
                             "loss on every token of the repeat (forms induction heads); 0: none")
    parser.add_argument("--induction-length", type=int, default=48,
                        help="random tokens of each induction row before its repeat")
    parser.add_argument("--exclude-held-out-words", action="store_true",
                        help="never make the held-out task's words keywords of a training task")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop after this many seconds of this run, save the checkpoint and exit with status 3 "
                             "(a later --resume continues): for machines that allow a few minutes per command")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "shots", "k", "width", "layers", "heads", "eval_every", "eval_episodes",
                 "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.init is not None and not (args.init / "config.json").is_file():
        parser.error(f"--init {args.init}: no config.json there (a Hugging Face model directory, e.g. zoo/mamba)")
    if args.distractors == "english" and not args.corpus.is_file():
        parser.error(f"no English corpus at {args.corpus}: build it with `python scripts/build_corpus.py`, "
                     "or use --distractors rotten_tomatoes")
    if args.words is not None:
        args.words = _int_range(parser, "--words", args.words, 6, "room for 3 keywords and 2 decoys")
    args.words_per_set = _int_range(parser, "--words-per-set", args.words_per_set, 1, "one keyword per label")
    args.tasks = _int_range(parser, "--tasks", args.tasks, 1, "one task")
    args.train_shots = (_int_range(parser, "--train-shots", args.train_shots, 1, "one demonstration")
                        if args.train_shots is not None else (args.shots, args.shots))
    if args.induction_rows < 0 or args.induction_length < 2:
        parser.error("--induction-rows must be at least 0 and --induction-length at least 2")
    for name in ("lm_weight", "quote_weight"):
        weight = getattr(args, name)
        if not (math.isfinite(weight) and weight >= 0):
            parser.error(f"--{name.replace('_', '-')} must be a number of at least 0, got {weight}")
    for name in ("rationale_share", "random_labels"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1]")
    if args.tasks[1] > args.train_shots[0]:
        parser.error(f"--tasks {args.tasks[1]} needs at least as many demonstrations (--train-shots / --shots)")
    if args.width % args.heads:
        parser.error("--width must be a multiple of --heads")
    return args


def _int_range(parser, option: str, text: str, least: int, why: str) -> tuple[int, int]:
    """``"MIN,MAX"`` -> ``(MIN, MAX)`` with ``least <= MIN <= MAX``, or a usage error that says what is wrong."""
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        parser.error(f"{option} takes MIN,MAX (two integers), got {text!r}")
    if not least <= low <= high:
        parser.error(f"{option} needs {least} <= MIN <= MAX ({why}), got {text!r}")
    return low, high


def sentence_pools(args) -> dict[str, SentenceIndex]:
    """Distractor sentences of the train and validation splits (3 words or more).

    The held-out task's words stay in the text: the target must know them as words (a pilot that
    removed them never saw their tokens, and their embeddings decayed to noise: it guessed at chance
    on the held-out task); with ``--exclude-held-out-words`` they never decide a training task either."""
    from implicit_attention import corpora

    passages = groundtruth.distractor_passages(args.distractors, args.corpus)
    return {split: SentenceIndex([s for s in corpora.sentences(passages[split]) if len(s.split()) >= 3])
            for split in ("train", "validation")}


def held_out_words() -> list[str]:
    task = groundtruth.DEFAULT_TASK
    return [*task.keywords[0], *task.keywords[1], *task.decoys]


#: Distractor sentences drawn per episode: a few examples need a few dozen; the examples' generator checks
#: every sentence it is given against the task's words, so a larger draw only costs time (3,000 made the
#: episodes, not the model, the bottleneck of a GPU step: 3 s per batch of 64).
SENTENCES_PER_EPISODE = 256


def draw_episode(rng: random.Random, vocabulary: list[str], pool: SentenceIndex, shots: int,
                 words: tuple[int, int] | None = None, words_per_set: int = 6):
    task = random_task(rng, vocabulary, seed=rng.randrange(2**31), words=words, words_per_set=words_per_set)
    task_words = [*task.keywords[0], *task.keywords[1], *task.decoys]
    return make_episode(rng, task, pool.sample_free_of(rng, task_words, SENTENCES_PER_EPISODE), shots)


class Row(NamedTuple):
    """One encoded training episode: its token ids, the positions of its label words and of its rationales'
    quoted labels, and for each of those the first tokens of the two label names of its task (as a label
    word follows ``Label:``, and as a rationale quotes it): the two tokens its prediction chooses between."""

    ids: list[int]
    label_positions: list[int]
    quote_positions: list[int]
    label_tokens: list[tuple[int, int]]
    quote_tokens: list[tuple[int, int]]


def label_tokens(tokenizer, names: Sequence[str]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The first token of each of the two label ``names`` as it follows ``Label:`` (``" " + name``) and as a
    rationale quotes it (``... to predict 'name' ...``, :func:`quoted_label_positions`)."""
    after_label, quoted = label_tokens_of_words(tokenizer, names)
    return tuple(after_label), tuple(quoted)


def random_label_names(rng: random.Random, vocabulary: Sequence[str], taken: Iterable[str],
                       tokens: dict[str, tuple[int, int]], count: int = 2) -> list[str]:
    """``count`` words of ``vocabulary`` outside ``taken`` (the tasks' words) whose first tokens all differ, both
    after ``Label:`` and in a rationale's quote (``tokens[word]``: the two), so a prediction can tell them apart."""
    taken = {word.lower() for word in taken}
    for _ in range(10_000):
        names = rng.sample(list(vocabulary), count)
        firsts = [tokens[name] for name in names]
        if not taken & set(names) and all(len({pair[side] for pair in firsts}) == count for side in (0, 1)):
            return names
    raise ValueError(f"no {count} label names with distinct first tokens found in 10,000 draws from "
                     f"{len(vocabulary)} words: fewer --tasks")


def encode(tokenizer, prompt: str, query_word: str, label_pairs: Sequence[tuple[int, int]],
           quote_pairs: Sequence[tuple[int, int]]) -> Row:
    """The :class:`Row` of ``prompt`` followed by the query's label word, with the two candidate tokens of each
    label word (``label_pairs``: the demonstrations', then the query's) and of each quoted label."""
    text = prompt + " " + query_word
    encoded = tokenizer(text, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    row = Row(encoded["input_ids"], label_positions(text, offsets), quoted_label_positions(text, offsets),
              list(label_pairs), list(quote_pairs))
    if (len(row.label_positions), len(row.quote_positions)) != (len(row.label_tokens), len(row.quote_tokens)):
        raise ValueError("a candidate pair is needed for each label word and each quoted label")
    return row


def batch_tensors(rows: list[Row], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``ids [B, T]``, ``mask [B, T]``, the rows and positions ``[P]`` of the label words, and
    those ``[Q]`` of the rationales' quoted labels (row by row, in order)."""
    longest = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels, quotes = [], []
    for r, (row_ids, positions, quoted, *_) in enumerate(rows):
        ids[r, :len(row_ids)] = torch.tensor(row_ids)
        mask[r, :len(row_ids)] = 1
        labels += [(r, p) for p in positions]
        quotes += [(r, p) for p in quoted]

    def pairs(where: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor([r for r, _ in where], dtype=torch.long, device=device),
                torch.tensor([p for _, p in where], dtype=torch.long, device=device))

    return (ids.to(device), mask.to(device), *pairs(labels), *pairs(quotes))


def batch_candidates(rows: list[Row], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tokens each label word ``[P, 2]`` and each quoted label ``[Q, 2]`` of :func:`batch_tensors`
    chooses between (its row's label names), in the same order."""
    labels = [pair for row in rows for pair in row.label_tokens]
    quotes = [pair for row in rows for pair in row.quote_tokens]
    return (torch.tensor(labels, dtype=torch.long, device=device).view(-1, 2),
            torch.tensor(quotes, dtype=torch.long, device=device).view(-1, 2))


def induction_batch(args, step: int, vocabulary_size: int, device) -> torch.Tensor:
    """``[--induction-rows, 2 * --induction-length]`` token ids: random tokens (none of the first 3, the
    special ones), then the same again; a function of ``--seed`` and ``step`` alone."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    half = torch.randint(3, vocabulary_size, (args.induction_rows, args.induction_length), generator=generator)
    return torch.cat([half, half], dim=1).to(device)


def induction_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy over the repeat of ``ids [R, 2 * n]`` (random tokens, then the same
    again): the tokens after the repeat's first, each predictable by looking back ``n`` tokens."""
    half = ids.shape[1] // 2
    logits = model(input_ids=ids).logits[:, half:-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, half + 1:].flatten())


def build_model(args, tokenizer):
    """A new Llama of ``--layers`` x ``--width``, or the pre-trained causal LM of ``--init`` (its scans in
    parallel while training, :func:`~implicit_attention.benchmark.training.enable_fast_training`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.init is not None:
        from implicit_attention.benchmark import training

        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise SystemExit(f"error: {args.init} has fewer token embeddings than the tokenizer {args.tokenizer}")
        training.enable_fast_training(model)
        return model

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def eval_prompts(args, vocabulary, pool: SentenceIndex) -> tuple[dict[str, list[tuple[str, int]]], float]:
    """Fixed evaluation episodes of unseen tasks: ``{"truth" | "none" | "random": [(prompt, query label)]}``,
    and the accuracy of the keyword-matching oracle on them (what their demonstrations allow)."""
    rng = random.Random(f"icl-eval:{args.seed}")
    prompts: dict[str, list[tuple[str, int]]] = {"truth": [], "none": [], "random": []}
    oracle = 0.0
    for i in range(args.eval_episodes):
        episode = draw_episode(rng, vocabulary, pool, args.shots)
        oracle += keyword_matching_credit(episode.demonstrations, episode.query)
        truth = [planted_rationale_words(d, args.k) for d in episode.demonstrations]
        noise = [random_words(d.text, args.k, seed=1000 * i + j) for j, d in enumerate(episode.demonstrations)]
        for name, words in (("truth", truth), ("none", None), ("random", noise)):
            prompts[name].append((episode_prompt(episode, words), episode.query.label))
    return prompts, oracle / args.eval_episodes


def other_tokens_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy over the tokens of ``ids [B, T]`` (``mask [B, T]``) other than the
    first and the label words at ``(rows, positions)`` (their loss is counted apart), from ``logits [B, T, V]``."""
    weight = mask[:, 1:].float().clone()
    weight[rows, positions - 1] = 0.0
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                               reduction="none")
    return (losses * weight.flatten()).sum() / weight.sum().clamp(min=1.0)


def _label_ids(tokenizer) -> list[int]:
    """The token of each label word as it follows ``Label:`` (its first token after a space)."""
    return list(label_tokens(tokenizer, LABEL_NAMES)[0])


def _quote_ids(tokenizer) -> list[int]:
    """The first token of each label as a rationale quotes it (``... to predict 'first' ...``)."""
    return list(label_tokens(tokenizer, LABEL_NAMES)[1])


def _query_rows(rows: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: which of the label words (listed row by row, ``rows [P]``) is the last of its row."""
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = rows[1:] != rows[:-1]
    return last


def label_hits(logits: torch.Tensor, targets: torch.Tensor,
               label_ids: Sequence[int] | torch.Tensor) -> tuple[int, int]:
    """``(right, seen)``: how many of the predictions ``logits [Q, V]`` give their own label token (the truth
    ``targets [Q]``, one of the two ``label_ids``: shared ``[2]``, or each prediction's own ``[Q, 2]``) the
    larger of the two logits, and ``Q``."""
    candidates = torch.as_tensor(label_ids, device=logits.device).expand(len(targets), 2)
    predicted = logits.gather(1, candidates).argmax(-1)
    truth = (targets == candidates[:, 1]).long()
    return int((predicted == truth).sum()), len(targets)


def query_hits(label_logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
               label_ids: Sequence[int] | torch.Tensor) -> tuple[int, int]:
    """``(right, queries)`` of a batch: :func:`label_hits` of the queries alone (each row's last label word,
    :func:`_query_rows`). ``label_logits [P, V]`` predict the label words ``targets [P]`` of rows ``rows [P]``,
    choosing between ``label_ids`` (``[2]``, or ``[P, 2]``)."""
    queries = _query_rows(rows)
    if torch.is_tensor(label_ids) and label_ids.dim() == 2:
        label_ids = label_ids[queries]
    return label_hits(label_logits[queries], targets[queries], label_ids)


@torch.no_grad()
def query_accuracy(model, tokenizer, prompts: list[tuple[str, int]], device) -> float:
    """The share of prompts whose query label word has the larger next-token logit after ``Label:``."""
    label_ids = _label_ids(tokenizer)
    model.eval()
    correct = 0
    for prompt, label in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        logits = model(input_ids=ids).logits[0, -1, label_ids]
        correct += int(logits.argmax()) == label
    model.train()
    return correct / len(prompts)


def save_checkpoint(path: Path, model, optimiser, schedule, step: int, history: list, seconds: float) -> None:
    """Everything a ``--resume`` needs, written to a temporary file first so that a kill never leaves half a file."""
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                "step": step, "history": history, "seconds": seconds}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def save_model(args, model, tokenizer) -> None:
    """The model as a Hugging Face directory in ``--out``, its weights in float16 (half the size; it is
    loaded back in float32), with the tokenizer; the live model is left in float32."""
    model.save_pretrained(args.out, state_dict={name: value.half() if value.is_floating_point() else value
                                                 for name, value in model.state_dict().items()})
    tokenizer.save_pretrained(args.out)


#: What the episode-drawing processes share (set before they fork).
_DRAW: dict = {}


def training_batch(step: int) -> list[Row]:
    """The encoded episodes of training step ``step``: a function of ``--seed`` and ``step`` alone."""
    args, tokenizer, vocabulary, pool = (_DRAW[key] for key in ("args", "tokenizer", "vocabulary", "pool"))
    rng = random.Random(f"icl-train:{args.seed}:{step}")
    return [training_row(rng, args, tokenizer, vocabulary, pool) for _ in range(args.batch_size)]


def training_row(rng: random.Random, args, tokenizer, vocabulary: Sequence[str], pool: SentenceIndex) -> Row:
    """One training episode: the demonstrations of ``--tasks`` random tasks (each at least one, in random
    order; each task with its own two label names when they are random words) and the query of one of them."""
    shots, tasks = rng.randint(*args.train_shots), rng.randint(*args.tasks)
    counts = [1] * tasks
    for _ in range(shots - tasks):
        counts[rng.randrange(tasks)] += 1
    difficulty = rng.randint(*args.words_per_set)
    episodes = [draw_episode(rng, vocabulary, pool, count, args.words, difficulty) for count in counts]
    if args.random_labels > 0 and rng.random() < args.random_labels:
        by_word = _name_tokens(tokenizer, vocabulary)
        taken = [word for e in episodes for word in (*e.task.keywords[0], *e.task.keywords[1], *e.task.decoys)]
        drawn = random_label_names(rng, vocabulary, taken, by_word, 2 * tasks)
        names = [drawn[2 * t:2 * t + 2] for t in range(tasks)]
    else:
        by_word = _name_tokens(tokenizer, LABEL_NAMES)
        names = [list(LABEL_NAMES)] * tasks
    # per task: (the two names' first tokens after Label:, the two as quoted)
    tokens = [((by_word[a][0], by_word[b][0]), (by_word[a][1], by_word[b][1])) for a, b in names]
    order = [(t, example) for t, episode in enumerate(episodes) for example in episode.demonstrations]
    rng.shuffle(order)
    with_rationale = rng.random() < args.rationale_share        # the whole episode's, unless drawn per demonstration
    demos = []
    for t, example in order:
        given = rng.random() < args.rationale_share if args.rationales == "demonstration" else with_rationale
        words = planted_rationale_words(example, args.k) if given else []
        name = names[t][example.label]
        demos.append(Demonstration(text=example.text, label=name, label_word=name, words=words,
                                   rationale=rationale_sentence(words, name) if words else None))
    asked = rng.randrange(tasks)
    query = episodes[asked].query
    return encode(tokenizer, build_prompt(demos, query.text), names[asked][query.label],
                  [tokens[t][0] for t, _ in order] + [tokens[asked][0]],
                  [tokens[t][1] for (t, _), demo in zip(order, demos) if demo.rationale])


#: Label tokens computed once per tokenizer and word list (the vocabulary, or the fixed names) in each
#: process that draws episodes.
_TOKEN_CACHE: dict = {}


def _name_tokens(tokenizer, words: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{word: (first token after Label:, first token quoted)}`` of every word (:func:`label_tokens_of_words`)."""
    key = (id(tokenizer), tuple(words))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = {word: (after, quoted)
                             for word, after, quoted in zip(words, *label_tokens_of_words(tokenizer, words))}
    return _TOKEN_CACHE[key]


def label_tokens_of_words(tokenizer, words: Sequence[str]) -> tuple[list[int], list[int]]:
    """:func:`label_tokens` of every word of ``words`` as a label name: the first tokens after ``Label:``, and
    those as a rationale quotes it, in the order of ``words`` (a batched call of the tokenizer)."""
    after_label = [ids[0] for ids in tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]]
    lines = ["Rationale: " + rationale_sentence(["word"], w) for w in words]
    encoded = tokenizer(lines, add_special_tokens=False, return_offsets_mapping=True)
    quoted = [ids[quoted_label_positions(line, offsets)[0]]
              for line, ids, offsets in zip(lines, encoded["input_ids"], encoded["offset_mapping"])]
    return after_label, quoted


def training_batches(args, first_step: int):
    """The batches of steps ``first_step, ..., --steps - 1`` in order, drawn by ``--workers`` processes ahead."""
    steps = range(first_step, args.steps)
    if args.workers < 1:
        yield from map(training_batch, steps)
        return
    import multiprocessing
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the fast tokenizer's threads do not survive a fork
    with multiprocessing.get_context("fork").Pool(args.workers) as workers:
        yield from workers.imap(training_batch, steps, chunksize=4)


def main(argv=None) -> int:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    pools = sentence_pools(args)
    vocabulary = keyword_vocabulary(pools["train"].sentences, held_out_words() if args.exclude_held_out_words else ())
    needed = 2 * max(args.words_per_set[1], 6) + DEFAULT_DECOYS
    if needed > len(vocabulary):
        raise SystemExit(f"error: --words-per-set {args.words_per_set[1]} needs {needed} distinct keywords and decoys "
                         f"per task; the keyword vocabulary has {len(vocabulary)}")
    evaluation, oracle = eval_prompts(args, vocabulary, pools["validation"])
    print(f"the keyword-matching oracle answers {oracle:.1%} of the evaluation episodes")
    model = build_model(args, tokenizer).to(args.device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    step, history, seconds = 0, [], 0.0
    checkpoint = args.out / "checkpoint.pt"
    if args.resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        step, history, seconds = state["step"], state["history"], state["seconds"]
        print(f"resumed at step {step}")
    args.out.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="meta-training", disable=not args.progress)
    began = time.perf_counter() - seconds
    this_run = time.perf_counter()
    _DRAW.update(args=args, tokenizer=tokenizer, vocabulary=vocabulary, pool=pools["train"])
    training_right = training_seen = 0  # training episodes' queries answered right since the last evaluation
    quotes_right = quotes_seen = 0      # and the rationales' quoted labels
    induction_losses: list[float] = []  # the induction rows' losses since the last evaluation
    for rows in training_batches(args, step):
        if args.time_limit is not None and time.perf_counter() - this_run > args.time_limit:
            save_checkpoint(checkpoint, model, optimiser, schedule, step, history, time.perf_counter() - began)
            save_model(args, model, tokenizer)  # what is trained so far, usable (and small enough to fetch)
            (args.out / "progress.json").write_text(json.dumps({"step": step, "history": history}, indent=2) + "\n")
            bar.close()
            print(f"stopped at step {step} of {args.steps} after --time-limit {args.time_limit:g}s; "
                  "rerun with --resume to continue")
            return 3
        ids, mask, where_rows, where_pos, quote_rows, quote_pos = batch_tensors(rows, pad_id, args.device)
        label_ids, quote_ids = batch_candidates(rows, args.device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        label_logits = logits[where_rows, where_pos - 1].float()
        loss = torch.nn.functional.cross_entropy(label_logits, ids[where_rows, where_pos])
        if args.quote_weight > 0 and len(quote_rows):
            loss = loss + args.quote_weight * torch.nn.functional.cross_entropy(
                logits[quote_rows, quote_pos - 1].float(), ids[quote_rows, quote_pos])
        if args.lm_weight > 0:
            loss = loss + args.lm_weight * other_tokens_loss(logits, ids, mask, where_rows, where_pos)
        if args.induction_rows > 0:
            repeated = induction_loss(model, induction_batch(args, step, len(tokenizer), args.device))
            loss = loss + repeated
            induction_losses.append(repeated.item())
        right, seen = query_hits(label_logits, ids[where_rows, where_pos], where_rows, label_ids)
        training_right, training_seen = training_right + right, training_seen + seen
        right, seen = label_hits(logits[quote_rows, quote_pos - 1].detach(), ids[quote_rows, quote_pos], quote_ids)
        quotes_right, quotes_seen = quotes_right + right, quotes_seen + seen
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            record = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - began, 1),
                      "training_query_accuracy": round(training_right / max(training_seen, 1), 4),
                      "training_quote_accuracy": round(quotes_right / max(quotes_seen, 1), 4)}
            if induction_losses:
                record["induction_loss"] = round(sum(induction_losses) / len(induction_losses), 4)
            training_right = training_seen = quotes_right = quotes_seen = 0
            induction_losses = []
            record.update({f"accuracy_{name}": query_accuracy(model, tokenizer, prompts, args.device)
                           for name, prompts in evaluation.items()})
            history.append(record)
            tqdm.write(json.dumps(record))
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(checkpoint, model, optimiser, schedule, step, history, time.perf_counter() - began)
    bar.close()
    model.eval()
    if args.init is not None:
        from implicit_attention.benchmark import training

        training.disable_fast_training(model)
    save_model(args, model, tokenizer)
    machine = (f"{torch.cuda.get_device_name(0)} GPU" if str(args.device).startswith("cuda")
               else f"{platform.machine()} CPU") + f", torch {torch.__version__}"
    (args.out / "icl.json").write_text(json.dumps({
        "settings": {k: str(v) for k, v in vars(args).items()}, "label_names": list(LABEL_NAMES),
        "vocabulary_size": len(vocabulary), "held_out_words": held_out_words(), "oracle_accuracy": round(oracle, 4),
        "parameters": sum(p.numel() for p in model.parameters()), "history": history,
        "seconds": round(time.perf_counter() - began, 1), "machine": machine}, indent=2) + "\n")
    print(f"saved {args.out} ({history[-1] if history else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
