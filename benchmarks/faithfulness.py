#!/usr/bin/env python
"""The faithfulness benchmark: every explanation method on every zoo model, with intervals.

Beside the thirteen zoo models, ``minilm`` is the pretrained Transformer reference: all-MiniLM-L6-v2
fine-tuned as a sentiment classifier on the zoo's split (``python scripts/train_reference.py``
writes it to out/zoo/minilm/sentiment; implicit_attention.benchmark.reference). It runs on the
sentiment task only: the ground-truth task checks the zoo's operators and is not needed for it.
``--models all`` includes it where its checkpoint exists.

Four steps, each resumable (results are appended example by example and never recomputed):

    prepare   write the evaluation examples: the Rotten Tomatoes test sentences and the
              ground-truth test texts with their planted spans (out/benchmark/examples/)
    run       explain every example with every method and score it (out/benchmark/results/)
    report    tables with bootstrap 95% intervals, paired tests, CSV and plots (out/benchmark/report/)
    index     list the finished (example, method) pairs in out/benchmark/done/, small enough to
              travel to another machine whose run then skips them (scripts/accelerator.sh)

On the sentiment task each explanation gets the perturbation tests (deletion and pad
replacement, positive and negative), ERASER comprehensiveness / sufficiency and dA; on the
ground-truth task the localisation scores (ROC AUC against the planted tokens, pointing game).

Examples::

    python benchmarks/faithfulness.py prepare
    python benchmarks/faithfulness.py run --device cuda --jobs 13 --limit 500
    python benchmarks/faithfulness.py run --device cuda --jobs 30 --shards 3  # 3 workers per model
    python benchmarks/faithfulness.py run --models mamba,gpt2 --limit 20      # a quick look on the CPU
    python benchmarks/faithfulness.py report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

from implicit_attention.benchmark.reference import REFERENCES, reference_model_dir  # noqa: E402
from implicit_attention.benchmark.workers import run_workers  # noqa: E402
from implicit_attention.benchmark.zoo import ZOO, zoo_model_dir  # noqa: E402

TASKS = ("sentiment", "groundtruth")
DEFAULT_ROOT = REPO_ROOT / "out" / "benchmark"
#: Display names of every model the benchmark knows: the zoo's, then the pretrained references.
TITLES = {**{k: v.title for k, v in ZOO.items()}, **{k: v.title for k, v in REFERENCES.items()}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=type("Help", (argparse.RawDescriptionHelpFormatter,
                                                                        argparse.ArgumentDefaultsHelpFormatter), {}))
    parser.add_argument("step", choices=("prepare", "run", "report", "index"), help="what to do (see below)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="examples, results and report go here")
    parser.add_argument("--models", default="all", help=f"comma-separated subset of: {', '.join(TITLES)}")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of: sentiment, groundtruth")
    parser.add_argument("--limit", type=int, default=500, help="examples per task")
    parser.add_argument("--device", default="cpu", help="torch device of the models (cuda on a GPU machine)")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (worker processes)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per model and task, then stop")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "out" / "zoo",
                        help="the zoo's training directory (ground-truth models)")
    parser.add_argument("--groundtruth", type=Path, default=REPO_ROOT / "out" / "groundtruth",
                        help="the ground-truth splits (python -m implicit_attention.benchmark.groundtruth)")
    parser.add_argument("--shards", type=int, default=1,
                        help="workers per model, each on every n-th example (its own results file)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the no_conv / no_gate / ... rows")
    parser.add_argument("--keep", type=Path, default=None, metavar="SUMMARY",
                        help="report: the summary.json of an earlier report, whose model/task tables are kept "
                             "where this run has no records (a rerun of some models updates their rows only)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = list(TITLES) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in args.models if m not in TITLES]:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(TITLES)}")
    if args.shards < 1:
        parser.error(f"--shards must be at least 1, got {args.shards}")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if bad := [t for t in args.tasks if t not in TASKS]:
        parser.error(f"unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}")
    return args


def prepare(args) -> None:
    """The examples of both tasks as JSON lines (id, text, label, planted character spans)."""
    from implicit_attention.benchmark.groundtruth import read_split
    from implicit_attention.data import load_rotten_tomatoes

    directory = args.root / "examples"
    directory.mkdir(parents=True, exist_ok=True)
    if "sentiment" in args.tasks:
        with open(directory / "sentiment.jsonl", "w") as handle:
            for i, (text, label) in enumerate(load_rotten_tomatoes("test")):
                handle.write(json.dumps({"id": f"rt-test-{i}", "text": " ".join(text.split()), "label": label}) + "\n")
        print(f"wrote {directory}/sentiment.jsonl")
    if "groundtruth" not in args.tasks:
        return
    if not (args.groundtruth / "test.jsonl").is_file():
        print(f"no ground-truth splits in {args.groundtruth}: build them with `python scripts/build_corpus.py` "
              "and `python -m implicit_attention.benchmark.groundtruth`, then run `prepare` again")
        return
    with open(directory / "groundtruth.jsonl", "w") as handle:
        for i, example in enumerate(read_split(args.groundtruth / "test.jsonl")):
            if example.text != " ".join(example.text.split()):
                raise ValueError(f"ground-truth example {i}: text is not whitespace-normalised")
            handle.write(json.dumps({"id": f"gt-test-{i}", "text": example.text, "label": example.label,
                                     "planted": [list(span) for span in example.planted]}) + "\n")
    print(f"wrote {directory}/groundtruth.jsonl")


def run_one(worker: str, args) -> None:
    """Both tasks of one model (``"mamba"``), or of one shard of its examples (``"mamba@2"``: every
    ``--shards``-th example from the third on, written to ``<task>-part2.jsonl``)."""
    import torch
    from tqdm.auto import tqdm

    from implicit_attention.benchmark.runner import load_examples, run_model_task, shard_file

    name, _, shard_text = worker.partition("@")
    shard = int(shard_text) if shard_text else None

    torch.set_num_threads(1 if args.jobs > 1 else torch.get_num_threads())
    for task in args.tasks:
        if name in REFERENCES:
            if reference_skipped(name, task, args):
                continue
            model_dir = reference_model_dir(name, task, work=args.work)
        else:
            model_dir = zoo_model_dir(name, task, work=str(args.work))
        if not (Path(model_dir) / "config.json").is_file():
            how = ("`python scripts/train_zoo.py --models " + name + " --stages pretrain,groundtruth`"
                   if task == "groundtruth" else "`python scripts/train_zoo.py`")
            print(f"{name} {task}: no trained model in {model_dir} (the ground-truth models are not shipped: "
                  f"train them with {how}); skipped", flush=True)
            continue
        examples_file = args.root / "examples" / f"{task}.jsonl"
        if not examples_file.is_file():
            print(f"{name} {task}: no examples in {examples_file} (see `prepare`); skipped", flush=True)
            continue
        examples = load_examples(examples_file, limit=args.limit)
        if shard is not None:
            examples = examples[shard::args.shards]
        bar = tqdm(total=len(examples), desc=f"{worker} {task}", disable=not sys.stderr.isatty() or args.jobs > 1)
        progress = lambda done, total: bar.update(done - bar.n)  # noqa: E731
        result = run_model_task(model_dir, examples, shard_file(args.root / "results" / name, task, shard),
                                ablations=not args.no_ablations,
                                device=args.device, progress=progress, time_limit=args.time_limit, model_name=name,
                                task_name=task, perturbation=task == "sentiment")
        bar.close()
        print(f"{worker} {task}: {result}", flush=True)


def reference_skipped(name: str, task: str, args, *, say: bool = True) -> bool:
    """Whether reference ``name`` has nothing to run on ``task``: a task it is not trained for, or no
    fine-tuned checkpoint yet (each said in one line)."""
    entry = REFERENCES[name]
    if task not in entry.tasks:
        why = f"{entry.title} is trained for {', '.join(entry.tasks)} only (the {task} task is not needed for it)"
    elif not (reference_model_dir(name, task, work=args.work) / "config.json").is_file():
        why = (f"no fine-tuned model in {reference_model_dir(name, task, work=args.work)} "
               f"(fine-tune it with `python scripts/train_reference.py`)")
    else:
        return False
    if say:
        print(f"{name} {task}: {why}; skipped", flush=True)
    return True


def run(args) -> int:
    if not (args.root / "examples" / "sentiment.jsonl").is_file():
        raise SystemExit(f"no examples in {args.root / 'examples'}: run `python {sys.argv[0]} prepare` first")
    # a reference with nothing to run (no checkpoint, or only tasks it is not trained for) gets no worker
    models = []
    for name in args.models:
        if name in REFERENCES and all(reference_skipped(name, task, args, say=False) for task in args.tasks):
            for task in args.tasks:
                reference_skipped(name, task, args)  # says why
            continue
        models.append(name)
    workers = (list(models) if args.shards == 1
               else [f"{name}@{k}" for k in range(args.shards) for name in models])
    if args.jobs <= 1:
        for worker in workers:
            run_one(worker, args)
        return 0
    import torch

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    failed = run_workers(workers, lambda name: [sys.executable, __file__, "run", "--worker", name, *sys.argv[2:]],
                         lambda name: args.root / "logs" / f"{name.replace('@', '-part')}.txt", jobs=args.jobs,
                         gpus=gpus)
    return 1 if failed else 0


def note_references(root: Path, ran: set[str]) -> None:
    """Add to ``tables.md`` which tasks each pretrained reference in the report (``ran``) ran, and why not the
    others."""
    notes = [f"- {entry.title} (`{name}`): fine-tuned from {entry.base} on {', '.join(entry.tasks)} only"
             + ("; the ground-truth task checks the localisation of the zoo's operators and is not needed for a "
                "pretrained reference." if "groundtruth" not in entry.tasks else ".")
             for name, entry in REFERENCES.items() if name in ran]
    if notes:
        tables = root / "report" / "tables.md"
        tables.write_text(tables.read_text() + "\nPretrained references:\n\n" + "\n".join(notes) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.keep is not None and args.step != "report":
        raise SystemExit("--keep belongs to `report` (it keeps an earlier report's tables)")
    if args.step == "prepare":
        prepare(args)
        return 0
    if args.step == "index":
        from implicit_attention.benchmark.runner import write_done_index

        count = write_done_index(args.root / "results", args.root / "done")
        print(f"{count} finished (example, method) pairs listed in {args.root / 'done'}")
        return 0
    if args.step == "report":
        from implicit_attention.benchmark.report import read_results, write_report

        if not any(read_results(args.root / "results").values()):
            raise SystemExit(f"no results in {args.root / 'results'}: run `python {sys.argv[0]} run` first")
        if args.keep is not None and not args.keep.is_file():
            raise SystemExit(f"--keep {args.keep}: no such summary file")
        keep = json.loads(args.keep.read_text()) if args.keep is not None else None
        summaries = write_report(args.root / "results", args.root / "report", titles=TITLES, keep=keep)
        note_references(args.root, {key.split("/")[0] for key in summaries})
        print((args.root / "report" / "tables.md").read_text())
        return 0
    if args.worker:
        run_one(args.worker, args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
