#!/usr/bin/env python
"""AMPLIFY's effect on a held-out task: the target's accuracy with rationales from each source.

The task is the faithfulness benchmark's planted-keyword task (food against tools among distractor
English; ``python -m implicit_attention.benchmark.groundtruth``), which the target
(``scripts/train_icl_target.py``) never saw. Each of ``--episodes`` episodes draws ``--pool-size``
training examples, lets the proxy (a model trained on the task: ``scripts/train_zoo.py`` writes
``out/zoo/<model>/groundtruth``) pick ``--shots`` demonstrations by misclassification confidence
(AMPLIFY's rule), and asks the target for the label of one test example (test examples in order).
The demonstrations are the same for every source; only their rationales differ:

- a method of the library on the proxy, explaining the gold label (``attribution``, ``attribution:s6``
  for the predecessor's variant, ``grad_x_input``, ``integrated_gradients``, ...): its top ``--k`` words;
- ``truth``: the planted keywords (the upper bound); ``random``: ``--k`` random words (the control);
  ``none``: no rationale (plain few-shot prompting);
- ``oracle``: no target at all, the label of the demonstrations that share the query's planted words
  (a coin on a tie: half a point; ``episodes.keyword_matching_prediction``): the accuracy these
  demonstrations allow when the keyword sets are read from them alone.

For each source: the target's accuracy with a bootstrap 95% interval over episodes, and the paired
difference from ``none`` (bootstrap interval, sign-flip p-value). Each source's predictions are
kept in ``--out/sources/`` (a rerun computes only the missing ones); ``--out/results.json`` and
``--out/table.md`` at the end.

Examples::

    python benchmarks/amplify_effect.py --proxy out/zoo/mamba/groundtruth --target out/icl-target
    python benchmarks/amplify_effect.py --episodes 40 --sources attribution,truth,none   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

import torch  # noqa: E402

DEFAULT_SOURCES = "attribution,attribution:s6,grad_x_input,integrated_gradients,truth,random,none,oracle"
#: Settings that must match to resume a run.
RESUME_KEYS = ("proxy", "target", "groundtruth", "episodes", "shots", "k", "pool_size", "seed")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout kept, and every option's default shown."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--proxy", default=str(REPO_ROOT / "out" / "zoo" / "mamba" / "groundtruth"),
                        help="the proxy: a model trained on the ground-truth task")
    parser.add_argument("--target", default=str(REPO_ROOT / "out" / "icl-target"),
                        help="the target LM (scripts/train_icl_target.py)")
    parser.add_argument("--groundtruth", default=str(REPO_ROOT / "out" / "groundtruth"),
                        help="the ground-truth splits")
    parser.add_argument("--sources", default=DEFAULT_SOURCES, help="comma-separated")
    parser.add_argument("--episodes", type=int, default=500, help="held-out episodes (queries)")
    parser.add_argument("--shots", type=int, default=4, help="demonstrations per prompt")
    parser.add_argument("--k", type=int, default=3, help="words per rationale")
    parser.add_argument("--pool-size", type=int, default=16, help="training examples the proxy picks from per episode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pools")
    parser.add_argument("--device", default=None, help="torch device (cuda if available)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "amplify-effect", help="results directory")
    parser.add_argument("--force", action="store_true", help="delete an earlier run's files in --out first")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    for name in ("episodes", "shots", "k", "pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.shots > args.pool_size:
        parser.error("--shots must not exceed --pool-size")
    return args


def check_run(args) -> None:
    settings = {key: getattr(args, key) for key in RESUME_KEYS}
    run_file = args.out / "run.json"
    if args.force and args.out.exists():
        shutil.rmtree(args.out)
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        changed = [f"--{k.replace('_', '-')}: {before.get(k)!r} there, {v!r} now" for k, v in settings.items()
                   if before.get(k) != v]
        if changed:
            sys.exit(f"error: {args.out} holds a run with other settings ({'; '.join(changed)}); "
                     "pass --force to start over or choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def episodes_of(args, train, test, proxy) -> list[dict]:
    """Per episode: the selected training indices (prompt order) and the query's test index."""
    from implicit_attention.applications.amplify import (
        misclassification_confidence,
        proxy_probabilities,
        select_demonstrations,
    )

    rng = random.Random(f"amplify-effect:{args.seed}")
    pools = [rng.sample(range(len(train)), args.pool_size) for _ in range(args.episodes)]
    used = sorted({i for pool in pools for i in pool})
    probabilities = proxy_probabilities(proxy, [train[i].text for i in used])                    # [U, 2]
    gold = torch.tensor([train[i].label for i in used])
    score = dict(zip(used, misclassification_confidence(probabilities, gold).tolist()))
    episodes = []
    for e, pool in enumerate(pools):
        chosen = select_demonstrations([train[i].label for i in pool], args.shots, "mcs",
                                       scores=[score[i] for i in pool])
        episodes.append({"demonstrations": [pool[c] for c in chosen], "query": e % len(test)})
    return episodes


def rationale_words(source: str, args, proxy, train, indices: list[int]) -> dict[int, list[str]]:
    """The rationale words of each training example in ``indices`` under ``source``."""
    from implicit_attention.applications.amplify import demonstration_words
    from implicit_attention.applications.episodes import planted_rationale_words

    texts, gold = [train[i].text for i in indices], [train[i].label for i in indices]
    if source == "truth":
        words = [planted_rationale_words(train[i], args.k) for i in indices]
    else:
        method, _, variant = source.partition(":")
        words = demonstration_words(proxy, texts, gold, method, k=args.k, variant=variant or "unified",
                                    seed=args.seed, keys=indices)
    return dict(zip(indices, words))


def oracle_row(train, test, episodes, began: float) -> dict:
    """The keyword-matching oracle's row: correct is 1, 0 or 0.5 (a tie, a coin's expectation)."""
    from implicit_attention.applications.episodes import keyword_matching_credit, keyword_matching_prediction

    demos = [[train[i] for i in e["demonstrations"]] for e in episodes]
    probabilities = [keyword_matching_prediction(d, test[e["query"]]) for d, e in zip(demos, episodes)]
    correct = [keyword_matching_credit(d, test[e["query"]]) for d, e in zip(demos, episodes)]
    return {"source": "oracle", "correct": correct, "predictions": probabilities, "first_prompt": None,
            "rationales_empty": 0, "seconds": round(time.perf_counter() - began, 1)}


def run_source(source: str, args, proxy, target, train, test, episodes) -> dict:
    from implicit_attention.applications.amplify import target_label_logits
    from implicit_attention.applications.episodes import LABEL_NAMES, Episode, episode_prompt
    from implicit_attention.benchmark.groundtruth import DEFAULT_TASK

    began = time.perf_counter()
    if source == "oracle":
        return oracle_row(train, test, episodes, began)
    needed = sorted({i for episode in episodes for i in episode["demonstrations"]})
    words = rationale_words(source, args, proxy, train, needed)
    prompts = []
    for episode in episodes:
        demos = [train[i] for i in episode["demonstrations"]]
        prompts.append(episode_prompt(Episode(DEFAULT_TASK, demos, test[episode["query"]]),
                                      [words[i] for i in episode["demonstrations"]]))
    logits = target_label_logits(target, prompts, LABEL_NAMES, progress=args.progress)
    predictions = logits.argmax(-1).tolist()
    correct = [int(p == test[e["query"]].label) for p, e in zip(predictions, episodes)]
    return {"source": source, "correct": correct, "predictions": predictions, "first_prompt": prompts[0],
            "rationales_empty": sum(not words[i] for i in needed), "seconds": round(time.perf_counter() - began, 1)}


def summarise(rows: list[dict]) -> list[dict]:
    from implicit_attention.benchmark.stats import mean_ci, paired_bootstrap

    base = next((row for row in rows if row["source"] == "none"), None)
    table = []
    for row in rows:
        entry = {"source": row["source"], "accuracy": mean_ci(row["correct"]).to_dict(), "n": len(row["correct"])}
        if base is not None and row is not base:
            entry["versus_none"] = paired_bootstrap(row["correct"], base["correct"]).to_dict()
        table.append(entry)
    return table


def table_markdown(summary: list[dict]) -> str:
    def pct(d: dict, key: str = "mean") -> str:
        return f"{100 * d[key]:.1f}"

    lines = ["| rationale source | target accuracy [95% CI] | difference from none [95% CI], p |", "|---|---|---|"]
    for entry in summary:
        acc = entry["accuracy"]
        versus = entry.get("versus_none")
        diff = "-"
        if versus is not None:
            p_value = "p < 0.001" if versus["p_value"] < 0.001 else f"p = {versus['p_value']:.3f}"
            diff = (f"{100 * versus['difference']:+.1f} [{100 * versus['low']:+.1f}, "
                    f"{100 * versus['high']:+.1f}], {p_value}")
        lines.append(f"| {entry['source']} | {pct(acc)} [{pct(acc, 'low')}, {pct(acc, 'high')}] | {diff} |")
    return "\n".join(lines) + f"\n\n{summary[0]['n']} episodes; bootstrap intervals over episodes.\n"


def main(argv=None) -> int:
    from implicit_attention.applications.amplify import load_target
    from implicit_attention.benchmark.groundtruth import read_split
    from implicit_attention.loading import load_model

    args = parse_args(argv)
    for path, what in ((Path(args.groundtruth) / "train.jsonl", "ground-truth splits"),
                       (Path(args.proxy) / "task.json", "proxy"), (Path(args.target) / "config.json", "target")):
        if not path.is_file():
            sys.exit(f"error: no {what} at {path.parent} (see --help)")
    check_run(args)
    train = read_split(Path(args.groundtruth) / "train.jsonl")
    test = read_split(Path(args.groundtruth) / "test.jsonl")
    proxy = load_model(args.proxy, device=args.device)
    target = load_target(args.target, device=args.device)
    episodes_file = args.out / "episodes.json"
    if episodes_file.is_file():
        episodes = json.loads(episodes_file.read_text())
    else:
        episodes = episodes_of(args, train, test, proxy)
        episodes_file.write_text(json.dumps(episodes) + "\n")
    rows = []
    for source in args.sources:
        row_file = args.out / "sources" / f"{source.replace(':', '-')}.json"
        if row_file.is_file():
            rows.append(json.loads(row_file.read_text()))
            print(f"{source}: done before")
            continue
        row = run_source(source, args, proxy, target, train, test, episodes)
        row_file.parent.mkdir(parents=True, exist_ok=True)
        row_file.write_text(json.dumps(row) + "\n")
        rows.append(row)
        print(f"{source}: accuracy {sum(row['correct']) / len(row['correct']):.3f} ({row['seconds']} s)", flush=True)
    summary = summarise(rows)
    (args.out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "sources": summary}, indent=2) + "\n")
    text = table_markdown(summary)
    (args.out / "table.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
