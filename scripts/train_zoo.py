#!/usr/bin/env python
"""Train the model zoo: one small causal LM per architecture, on the sentiment and ground-truth tasks.

Stages (each resumable: a finished stage's directory is kept and skipped on the next run):

    tokenizer    one shared BPE tokenizer (work/tokenizer)
    pretrain     language modelling on the English corpus (work/<model>/pretrained, and
                 work/<model>/pretrained-small for the smaller ground-truth model)
    sentiment    Rotten Tomatoes sentences, prompted (work/<model>/sentiment, float16)
    groundtruth  the planted-keyword task (work/<model>/groundtruth, float16)

Inputs are built once with ``python scripts/build_corpus.py`` (the English corpus) and
``python -m implicit_attention.benchmark.groundtruth`` (the ground-truth splits). Models train in
parallel worker processes (``--jobs``), spread over the visible GPUs. ``--export zoo`` then copies
the sentiment models into the repository's ``zoo/`` and writes ``zoo/zoo.json`` (accuracy with its
95% Wilson interval, calibration, parameter counts, time and hardware).

Examples::

    python scripts/train_zoo.py --device cuda --jobs 13            # everything, resumable
    python scripts/train_zoo.py --models mamba,gpt2 --pretrain-steps 50 --epochs 1   # a quick try
    python scripts/train_zoo.py --export zoo                       # ship the sentiment models
    python scripts/train_zoo.py --models gpt2 --finetune-seeds 3   # keep the best of 3 on validation
    python scripts/train_reference.py --teacher-labels             # MiniLM's labels, then distil them:
    python scripts/train_zoo.py --models llama --teacher out/teacher/minilm-sentiment-train.json --distill-weight 0.5

With ``--finetune-seeds N`` each task is fine-tuned N times from the one pre-trained model (seeds
``--seed`` .. ``--seed`` + N - 1, each in ``<model>/<task>-seed<S>``); the run with the best validation
accuracy becomes ``<model>/<task>`` (the test split plays no part in the choice) and its task.json
records every seed's validation accuracy. With ``--jobs`` the seeds train in parallel. ``--soup`` also
averages the seeds' weights (a uniform model soup, ``<model>/<task>-soup``) and ships it where its
validation accuracy beats every seed's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

import torch  # noqa: E402

from implicit_attention.benchmark import training  # noqa: E402
from implicit_attention.benchmark.tasks import groundtruth_task, sentiment_task  # noqa: E402
from implicit_attention.benchmark.workers import run_workers  # noqa: E402
from implicit_attention.benchmark.zoo import ZOO, ZOO_LAYERS, ZOO_WIDTH  # noqa: E402

STAGES = ("tokenizer", "pretrain", "sentiment", "groundtruth")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=type("Help", (argparse.RawDescriptionHelpFormatter,
                                                                        argparse.ArgumentDefaultsHelpFormatter), {}))
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "out" / "zoo", help="checkpoints and logs")
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / "out" / "corpus" / "english.jsonl.gz",
                        help="the English corpus (scripts/build_corpus.py)")
    parser.add_argument("--groundtruth", type=Path, default=REPO_ROOT / "out" / "groundtruth",
                        help="directory of the ground-truth splits")
    parser.add_argument("--models", default="all", help=f"comma-separated subset of: {', '.join(ZOO)}")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once (worker processes)")
    parser.add_argument("--vocab-size", type=int, default=3072, help="tokens of the shared BPE tokenizer")
    parser.add_argument("--groundtruth-width", type=int, default=64, help="width of the ground-truth models")
    parser.add_argument("--groundtruth-layers", type=int, default=2, help="depth of the ground-truth models")
    parser.add_argument("--pretrain-steps", type=int, default=training.PretrainSettings.steps,
                        help="language-model pre-training steps of the sentiment models")
    parser.add_argument("--pretrain-batch", type=int, default=training.PretrainSettings.batch_size,
                        help="rows of 128 tokens per pre-training step")
    parser.add_argument("--groundtruth-pretrain-batch", type=int, default=32,
                        help="rows per pre-training step of the smaller ground-truth models")
    parser.add_argument("--groundtruth-pretrain-steps", type=int, default=300,
                        help="pre-training steps of the smaller ground-truth models")
    parser.add_argument("--epochs", type=int, default=training.TaskSettings.epochs, help="sentiment epochs")
    parser.add_argument("--groundtruth-epochs", type=int, default=1, help="ground-truth task epochs")
    parser.add_argument("--limit", type=int, default=0, help="use only N training examples per task (a quick try)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    parser.add_argument("--finetune-seeds", type=int, default=1,
                        help="fine-tune each task this many times (seeds --seed, --seed + 1, ...) and keep "
                             "the best by validation accuracy")
    parser.add_argument("--soup", action="store_true",
                        help="with --finetune-seeds: also average the seeds' weights (a uniform model soup) "
                             "and keep the soup where its validation accuracy beats every seed's")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a teacher's label probabilities on the sentiment training split (JSON of "
                             "scripts/train_reference.py --teacher-labels), for --distill-weight")
    parser.add_argument("--distill-weight", type=float, default=training.TaskSettings.distill_weight,
                        help="sentiment label loss: (1 - w) * cross-entropy + w * T^2 * KL(teacher || model)")
    parser.add_argument("--distill-temperature", type=float, default=training.TaskSettings.distill_temperature,
                        help="the temperature T of the distillation")
    parser.add_argument("--export", type=Path, default=None,
                        help="copy the trained sentiment models here (e.g. zoo) and write zoo.json; trains nothing")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-part", default="all", help=argparse.SUPPRESS)  # all | pretrain | seed<S>
    args = parser.parse_args(argv)
    args.models = list(ZOO) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if bad := [s for s in args.stages if s not in STAGES]:
        parser.error(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    if args.finetune_seeds < 1:
        parser.error("--finetune-seeds must be at least 1")
    if args.soup and args.finetune_seeds < 2:
        parser.error("--soup averages fine-tuning seeds: give --finetune-seeds 2 or more")
    if not 0 <= args.distill_weight <= 1:
        parser.error("--distill-weight is a fraction between 0 and 1")
    if args.distill_weight > 0 and args.teacher is None:
        parser.error("--distill-weight needs --teacher (scripts/train_reference.py --teacher-labels writes it)")
    if args.teacher is not None and not args.teacher.is_file():
        parser.error(f"--teacher {args.teacher}: no such file")
    if args.distill_temperature <= 0:
        parser.error("--distill-temperature must be positive")
    return args


def load_tasks(args) -> dict[str, training.PromptTask]:
    tasks = {"sentiment": sentiment_task()}
    if {"tokenizer", "groundtruth"} & set(args.stages):  # the tokenizer learns both prompts
        tasks["groundtruth"] = groundtruth_task(args.groundtruth)
    if args.limit:
        for task in tasks.values():
            task.splits["train"] = task.splits["train"][: args.limit]
    return tasks


def build_tokenizer(args, tasks) -> Path:
    out = args.work / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from implicit_attention.corpora import read_english_corpus

    texts = [row["text"] for row in read_english_corpus(args.corpus)]
    extra: list[str] = []
    for task in tasks.values():
        texts += [text for text, _ in task.splits["train"]]
        extra += task.prompt_lines()
    start = time.perf_counter()
    tokenizer = training.train_tokenizer(texts, args.vocab_size, extra_lines=extra)
    out.mkdir(parents=True, exist_ok=True)
    training.save_tokenizer(tokenizer, out)
    print(f"tokenizer: {len(tokenizer)} tokens from {len(texts):,} texts in {time.perf_counter() - start:.0f}s")
    return out


def run_model(name: str, args, tasks, part: str = "all") -> None:
    """Every requested stage of one model, skipping the finished ones.

    The sentiment model is pre-trained at the zoo's width and depth; the ground-truth task, which
    only needs keyword spotting, gets a smaller model of the same architecture
    (``--groundtruth-width`` / ``--groundtruth-layers``), pre-trained the same way.

    ``part`` splits the work of ``--finetune-seeds`` between workers: ``pretrain`` pre-trains only,
    ``seed<S>`` fine-tunes seed S only, ``all`` does everything (seeds one after the other).
    """
    from transformers import AutoTokenizer

    from implicit_attention.corpora import read_english_corpus

    torch.set_num_threads(1 if args.jobs > 1 else torch.get_num_threads())
    home = args.work / name
    shapes = {"sentiment": (ZOO_WIDTH, ZOO_LAYERS, home / "pretrained"),
              "groundtruth": (args.groundtruth_width, args.groundtruth_layers, home / "pretrained-small")}
    seeds = finetune_seeds(args) if part in ("all", "pretrain") else [int(part.removeprefix("seed"))]
    rows = None
    for task_name, task in tasks.items():
        width, layers, pretrained = shapes[task_name]
        out = home / task_name
        if task_name not in args.stages or (out / "task.json").is_file():
            continue  # not asked for, or finished: its pre-training is not needed either
        if "pretrain" in args.stages and not (pretrained / "pretrain.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(args.work / "tokenizer")
            steps, batch = ((args.pretrain_steps, args.pretrain_batch) if task_name == "sentiment"
                            else (args.groundtruth_pretrain_steps, args.groundtruth_pretrain_batch))
            settings = training.PretrainSettings(steps=steps, batch_size=batch, seed=args.seed)
            if rows is None:
                passages = [r["text"] for r in read_english_corpus(args.corpus)]
                rows = training.pack_tokens(tokenizer, passages, settings.seq_len)
            training.pretrain(name, tokenizer, rows, pretrained, settings, device=args.device,
                              width=width, layers=layers)
        if not (pretrained / "pretrain.json").is_file():
            raise SystemExit(f"{name}: stage {task_name} needs the pretrain stage first ({pretrained})")
        if part == "pretrain":
            continue
        for seed in seeds:
            target = out if args.finetune_seeds == 1 else seed_directory(home, task_name, seed)
            if not (target / "task.json").is_file():
                training.train_task(name, task, pretrained, target, task_settings(args, task_name, seed),
                                    device=args.device, teacher=teacher_labels(args, task_name, task))
        if part == "all" and args.finetune_seeds > 1:
            select_seed(home, task_name, finetune_seeds(args), soup_maker(args, name, task))


def task_settings(args, task_name: str, seed: int) -> training.TaskSettings:
    """Fine-tuning settings of a task: its epochs, the seed, and for sentiment the distillation options."""
    if task_name != "sentiment":
        return training.TaskSettings(epochs=args.groundtruth_epochs, seed=seed)
    return training.TaskSettings(epochs=args.epochs, seed=seed, distill_weight=args.distill_weight,
                                 distill_temperature=args.distill_temperature)


def teacher_labels(args, task_name: str, task) -> torch.Tensor | None:
    """``[N, labels]`` the teacher's probabilities on the sentiment training examples (``--limit``: the first
    N), checked against the whole split; ``None`` without distillation or for the other task."""
    if task_name != "sentiment" or args.distill_weight == 0:
        return None
    return training.read_teacher_labels(args.teacher, sentiment_task())[: len(task.splits["train"])]


def log_file(work: Path, name: str, part: str) -> Path:
    """A worker's log: ``<model>/log.txt``, or ``<model>/log-<part>.txt`` for a part of the seeds' work."""
    return work / name / ("log.txt" if part == "all" else f"log-{part}.txt")


def finetune_seeds(args) -> list[int]:
    """The fine-tuning seeds of ``--finetune-seeds``: ``--seed`` and the next ones."""
    return [args.seed + i for i in range(args.finetune_seeds)]


def seed_directory(home: Path, task_name: str, seed: int) -> Path:
    return home / f"{task_name}-seed{seed}"


def soup_maker(args, name: str, task):
    """``(runs, out) -> task.json`` building the model soup of ``runs`` in ``out``, or ``None`` without ``--soup``."""
    if not args.soup:
        return None
    settings = task_settings(args, task.name, args.seed)
    return lambda runs, out: training.soup_task_models(name, task, runs, out, settings, device=args.device)


def select_seed(home: Path, task_name: str, seeds: list[int], make_soup=None) -> int | str:
    """Copy the fine-tuned run with the best validation accuracy (ties: the first seed) to
    ``home/<task>`` and record every seed's validation accuracy in its task.json. With ``make_soup``
    (:func:`soup_maker`) the seeds' averaged weights are saved in ``home/<task>-soup`` and chosen where
    their validation accuracy is strictly higher than every seed's.

    Returns:
        the chosen seed, or ``"soup"``.
    """
    scores, seconds = {}, {}
    for seed in seeds:
        task_file = seed_directory(home, task_name, seed) / "task.json"
        if not task_file.is_file():
            raise SystemExit(f"{home.name}: seed {seed} of {task_name} did not finish ({task_file.parent})")
        run = json.loads(task_file.read_text())
        scores[seed], seconds[seed] = run["validation_accuracy"], run["training_time_seconds"]
    chosen: int | str = max(seeds, key=lambda seed: (scores[seed], -seeds.index(seed)))
    source = seed_directory(home, task_name, chosen)
    selection = {"rule": "best validation accuracy over the fine-tuning seeds",
                 "validation_accuracy": {str(seed): scores[seed] for seed in seeds},
                 "training_time_seconds": {str(seed): seconds[seed] for seed in seeds}}
    if make_soup is not None:
        soup_dir = home / f"{task_name}-soup"
        if not (soup_dir / "task.json").is_file():
            make_soup([seed_directory(home, task_name, seed) for seed in seeds], soup_dir)
        soup_score = json.loads((soup_dir / "task.json").read_text())["validation_accuracy"]
        selection["rule"] += ", or their uniform soup where it beats every seed on validation"
        selection["soup_validation_accuracy"] = soup_score
        if soup_score > scores[chosen]:
            chosen, source = "soup", soup_dir
    selection["chosen_seed"] = chosen
    out = home / task_name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    task = json.loads((out / "task.json").read_text())
    task["seed_selection"] = selection
    (out / "task.json").write_text(json.dumps(task, indent=2) + "\n")
    print(f"{home.name} {task_name}: {'the soup' if chosen == 'soup' else f'seed {chosen}'} chosen (validation "
          "accuracy " + ", ".join(f"{seed}: {scores[seed]:.4f}" for seed in seeds)
          + (f", soup: {selection['soup_validation_accuracy']:.4f}" if make_soup is not None else "") + ")")
    return chosen


def run_all(args) -> int:
    tasks = load_tasks(args)
    if "tokenizer" in args.stages or not (args.work / "tokenizer" / "tokenizer.json").is_file():
        build_tokenizer(args, tasks)
    if args.jobs <= 1:
        for name in args.models:
            run_model(name, args, tasks)
        return 0
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0

    def workers(parts: list[str]) -> list[str]:
        """Run ``name@part`` for every model and part; the failed ones are returned."""
        units = [f"{name}@{part}" for name in args.models for part in parts]
        return run_workers(units, lambda unit: [sys.executable, __file__, "--worker", unit.split("@")[0],
                                                "--worker-part", unit.split("@")[1], *sys.argv[1:]],
                           lambda unit: log_file(args.work, *unit.split("@")), jobs=args.jobs, gpus=gpus)

    if args.finetune_seeds == 1:
        return 1 if workers(["all"]) else 0
    # pre-training first, then every (model, seed) fine-tuning at once, then the choice of seed
    failed = workers(["pretrain"])
    failed += workers([f"seed{seed}" for seed in finetune_seeds(args)])
    for name in args.models:
        for task_name in tasks:
            done = (args.work / name / task_name / "task.json").is_file()
            if task_name in args.stages and not done and not any(f.startswith(f"{name}@") for f in failed):
                select_seed(args.work / name, task_name, finetune_seeds(args), soup_maker(args, name, tasks[task_name]))
    return 1 if failed else 0


def export(args) -> int:
    """Copy every finished sentiment model to ``args.export/<model>`` and summarise them in zoo.json."""
    from implicit_attention.benchmark.stats import wilson_interval

    args.export.mkdir(parents=True, exist_ok=True)
    # exporting some models updates their entries and keeps the others' (in the zoo's order)
    previous = args.export / "zoo.json"
    summary = json.loads(previous.read_text()) if previous.is_file() else {}
    for name in args.models:
        source = args.work / name / "sentiment"
        if not (source / "task.json").is_file():
            print(f"{name}: no finished sentiment model in {source}; skipped")
            continue
        target = args.export / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for file in ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
                     "task.json"):
            if (source / file).is_file():
                shutil.copy2(source / file, target / file)
        # the zoo shares one tokenizer: stored once (EXPORT/tokenizer.json), each model links to it
        shutil.copy2(source / "tokenizer.json", args.export / "tokenizer.json")
        (target / "tokenizer.json").symlink_to(Path("..") / "tokenizer.json")
        task = json.loads((source / "task.json").read_text())
        pretrain_file = args.work / name / "pretrained" / "pretrain.json"
        pretrain = json.loads(pretrain_file.read_text()) if pretrain_file.is_file() else {}
        n = task["num_examples"]["test"]
        interval = wilson_interval(round(task["test_accuracy"] * n), n)
        summary[name] = {
            "title": ZOO[name].title, "test_accuracy": task["test_accuracy"],
            "test_accuracy_95": [round(interval.low, 4), round(interval.high, 4)],
            "test_ece": task["test_ece"], "validation_accuracy": task["validation_accuracy"],
            "parameters": task["num_parameters"], "pretrain_validation_loss": pretrain.get("validation_loss"),
            "pretrain_seconds": pretrain.get("seconds"),
            # every seed's fine-tuning counts, not only the chosen one's
            "finetune_seconds": round(sum(selection["training_time_seconds"].values()), 1)
            if (selection := task.get("seed_selection")) else task["training_time_seconds"],
            "finetune_seeds": len(selection["validation_accuracy"]) if selection else 1,
            "soup": bool(selection) and selection.get("chosen_seed") == "soup",
            "distill_weight": task.get("settings", {}).get("distill_weight", 0.0),
            "machine": task["machine"], "size_bytes": sum(f.stat().st_size for f in target.iterdir()),
        }
        print(f"{name:8s} test accuracy {task['test_accuracy']:.3f} ECE {task['test_ece']:.3f} -> {target}")
    summary = {name: summary[name] for name in [*ZOO, *summary] if name in summary}
    (args.export / "zoo.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.export / "README.md").write_text(zoo_table(summary))
    return 0


def zoo_table(summary: dict) -> str:
    """The zoo as a Markdown table (written to zoo/README.md and shown in the project README)."""
    lines = ["| model | parameters | test accuracy [95% Wilson] | ECE | fine-tuning |", "|---|---|---|---|---|"]
    for name, row in summary.items():
        low, high = row["test_accuracy_95"]
        lines.append(f"| {row['title']} | {row['parameters'] / 1e6:.2f} M | {100 * row['test_accuracy']:.1f} "
                     f"[{100 * low:.1f}, {100 * high:.1f}] | {row['test_ece']:.3f} | "
                     f"{row['finetune_seconds']:.0f} s{seeds_note(row)} |")
    return "\n".join(lines) + "\n"


def seeds_note(row: dict) -> str:
    seeds = row.get("finetune_seeds", 1)
    notes = [f"soup of {seeds} seeds, chosen on validation" if row.get("soup")
             else f"{seeds} seeds, best on validation" if seeds > 1 else ""]
    if row.get("distill_weight"):
        notes.append(f"distilled, weight {row['distill_weight']:g}")
    notes = [note for note in notes if note]
    return f" ({'; '.join(notes)})" if notes else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.export is not None:
        return export(args)
    if args.worker:
        run_model(args.worker, args, load_tasks(args), part=args.worker_part)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
