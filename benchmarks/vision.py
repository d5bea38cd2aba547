#!/usr/bin/env python
"""The image evaluations of explanations on the Fashion-MNIST composites: every model and method.

For each model (trained by scripts/train_vision.py into --model-dir/<model>) and each method,
every test composite is explained (the predicted class) and scored by the segmentation test
against its exact mask (pixel accuracy and mIoU of the map thresholded at its mean, the paper's
mAP and a threshold-free AP) and the positive and negative patch-perturbation tests (accuracy AUC
over removing 10%..90% of the patches, set to the data set's mean); see
implicit_attention.vision.evaluation. Results are appended to OUT/results.jsonl image by image
(a batch at a time) and never recomputed: rerun the same command after an interruption. At the
end OUT/summary.json (bootstrap 95% intervals over images) and OUT/table.md (the published
layout: rows methods; columns model x {positive AUC, negative AUC, segmentation}) are written.

A method is a name of implicit_attention.METHODS, optionally with a variant: attribution:s6 is the
S6-only (predecessor) attribution of a Mamba; --option NAME=VALUE sets method options.

Examples::

    python benchmarks/vision.py --limit 20 --models vit --methods raw,attribution      # CPU, quick
    python benchmarks/vision.py --device cuda --limit 2000 --models vit,deit,vim        # the full run
    python benchmarks/vision.py --report-only                                          # tables again
"""

from __future__ import annotations

import argparse
import json
import os
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

from implicit_attention.vision.composites import (  # noqa: E402
    CompositeFolder,
    FashionComposites,
    FashionMNISTMissing,
    normalize,
)
from implicit_attention.vision.evaluation import (  # noqa: E402
    evaluate_batch,
    format_paired,
    format_table,
    interval_dict,
    paired_comparison,
    summarize,
)

DEFAULT_METHODS = "raw,rollout,attribution,paper,grad_x_input,random"
SAVED = REPO_ROOT / "data" / "fashion-composites" / "test"
#: Settings that must match to resume a run.
RESUME_KEYS = ("data", "fill", "options", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit,deit,vim", help="models in --model-dir (default %(default)s; "
                        "missing ones are reported and skipped)")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "out" / "vision-models")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="default %(default)s")
    parser.add_argument("--option", dest="options", action="append", default=[], metavar="NAME=VALUE",
                        help="a method option (steps=16 for integrated gradients, ...), repeatable")
    parser.add_argument("--data", default="generated",
                        help="'generated' (the test split from the Debian package's t10k files, or FASHION_MNIST_DIR; "
                             "the saved PNGs when they are absent) or a folder written by scripts/make_fashion_composites.py")
    parser.add_argument("--limit", type=int, default=1000, help="test images (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the composites' seed")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "vision-benchmark")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="images explained together")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--report-only", action="store_true", help="only summarise what results.jsonl holds")
    parser.add_argument("--force", action="store_true", help="start over when the settings differ")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


def parse_option(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    for convert in (int, float):
        try:
            return name, convert(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def dataset(args):
    if args.data == "generated":
        try:
            return FashionComposites("test", length=args.limit, seed=args.seed), f"generated test split, seed {args.seed}"
        except FashionMNISTMissing:
            pass
        print(f"Fashion-MNIST is not installed: using the {len(CompositeFolder(SAVED))} saved composites in "
              f"{SAVED.relative_to(REPO_ROOT)} (apt-get install dataset-fashion-mnist for more)", file=sys.stderr)
        folder = SAVED
    else:
        folder = Path(args.data)
    return CompositeFolder(folder, length=args.limit), f"folder {folder}"


def read_results(path: Path) -> list[dict]:
    """The complete lines of ``results.jsonl`` (a line cut by an interruption is dropped and the file rewritten)."""
    if not path.is_file():
        return []
    records, broken = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            broken = True
    if broken:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def check_settings(args, out: Path, description: str) -> None:
    settings = {"data": description, "fill": 0.0, "options": sorted(args.options), "seed": args.seed}
    run_file = out / "run.json"
    if run_file.is_file() and not args.force:
        previous = json.loads(run_file.read_text())
        differ = [k for k in RESUME_KEYS if previous.get(k) != settings[k]]
        if differ:
            raise SystemExit(f"{out} holds a run with other settings ({', '.join(differ)}): pass --force to start "
                             "over, or choose another --out")
    elif args.force and (out / "results.jsonl").is_file():
        (out / "results.jsonl").unlink()
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def run(args, models: list[str], methods: list[str]) -> None:
    from tqdm.auto import tqdm

    from implicit_attention.vision.classifiers import load_classifier

    data, description = dataset(args)
    check_settings(args, args.out, description)
    path = args.out / "results.jsonl"
    done = {(r["model"], r["method"], r["index"]) for r in read_results(path)}
    options = dict(parse_option(o) for o in args.options)
    available = []
    for model_name in models:
        if (args.model_dir / model_name / "config.json").is_file():
            available.append(model_name)
        else:
            print(f"{model_name}: no model in {args.model_dir / model_name} (scripts/train_vision.py): skipped",
                  file=sys.stderr)
    todo = {(m, meth): [i for i in range(len(data)) if (m, meth, i) not in done] for m in available for meth in methods}
    total = sum(len(v) for v in todo.values())
    bar = tqdm(total=total, unit="image", disable=not args.progress, file=sys.stderr, dynamic_ncols=True)
    with open(path, "a", encoding="utf-8") as sink:
        for model_name in available:
            model = None
            # images outer, methods inner: at any stop every method has scored the same images
            pending = {spec: list(todo[(model_name, spec)]) for spec in methods}
            while any(pending.values()):
                for spec in methods:
                    chunk, pending[spec] = pending[spec][:args.batch_size], pending[spec][args.batch_size:]
                    if not chunk:
                        continue
                    model = model or load_classifier(args.model_dir / model_name, device=args.device)
                    bar.set_description(f"{model_name} {spec}")
                    try:
                        records = score_chunk(model, data, chunk, spec, options, args.device)
                    except (ValueError, NotImplementedError) as exc:
                        print(f"{model_name} {spec}: {exc}; skipped", file=sys.stderr)
                        bar.update(len(chunk) + len(pending[spec]))
                        pending[spec] = []
                        continue
                    for index, record in zip(chunk, records):
                        sink.write(json.dumps({"model": model_name, "method": spec, "index": index, **record}) + "\n")
                    sink.flush()
                    bar.update(len(chunk))
    bar.close()


def score_chunk(model, data, chunk: list[int], spec: str, options: dict, device) -> list[dict]:
    """The records of the images ``chunk`` explained by ``spec`` (``method`` or ``method:variant``), each with
    the seconds per image."""
    method, _, variant = spec.partition(":")
    extra = {"variant": variant} if variant else {}
    items = [data[i] for i in chunk]
    pixels = normalize(torch.stack([p for p, _, _ in items])).to(device)
    began = time.time()
    records = evaluate_batch(model, pixels, [lab for _, lab, _ in items], torch.stack([m for _, _, m in items]),
                             method=method, fill=0.0, **extra, **options)
    seconds = (time.time() - began) / len(chunk)
    return [{"seconds": seconds, **record} for record in records]


def report(args, models: list[str], methods: list[str]) -> str:
    records = read_results(args.out / "results.jsonl")
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        grouped.setdefault((r["model"], r["method"]), []).append(r)
    summary, out = {}, {}
    for (model_name, method), rows in sorted(grouped.items()):
        if model_name not in models or method not in methods:
            continue
        rows = sorted(rows, key=lambda r: r["index"])
        s = summarize(rows, resamples=args.resamples)
        summary.setdefault(model_name, {})[method] = s
        out.setdefault(model_name, {})[method] = {
            "n": s["n"], "positive_auc": interval_dict(s["positive"]), "negative_auc": interval_dict(s["negative"]),
            "accuracy": interval_dict(s["accuracy"]),
            "segmentation": {k: interval_dict(v) for k, v in s["segmentation"].items()},
            "seconds_per_image": sum(r["seconds"] for r in rows) / len(rows)}
    shown = [m for m in models if m in summary]
    table = format_table(summary, shown, methods)
    counts = ", ".join(f"{m}: {min(s['n'] for s in summary[m].values())} images, model accuracy "
                       f"{100 * next(iter(summary[m].values()))['accuracy'].mean:.1f}%" for m in shown)
    # each variant against the method's own default (unified), image by image
    comparisons = {}
    for model_name in shown:
        for method in methods:
            base, _, variant = method.partition(":")
            if variant and (model_name, base) in grouped and (model_name, method) in grouped:
                comparisons[(model_name, base, method)] = paired_comparison(
                    grouped[(model_name, base)], grouped[(model_name, method)], resamples=args.resamples)
    paired = ""
    if comparisons:
        paired = ("\nPaired comparisons over the same images (mean difference a - b, 95% bootstrap interval, "
                  "sign-flip p-value; the better side named where the interval excludes 0):\n\n"
                  f"{format_paired(comparisons)}\n")
        for (model_name, a, b), results in comparisons.items():
            out[model_name].setdefault("paired", {})[f"{a} vs {b}"] = {k: v.to_dict() for k, v in results.items()}
    text = (f"Perturbation AUC (accuracy, percent, 10%..90% of the patches removed, set to the mean; positive: "
            f"lower is better, negative: higher) and segmentation (percent); 95% bootstrap intervals over images. "
            f"{counts}.\n\n{table}\n{paired}")
    (args.out / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "table.md").write_text(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()                                  # no weight-loading bars between ours
    try:
        if not args.report_only:
            if args.device == "cpu":
                torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
            run(args, models, methods)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    print(report(args, models, methods))
    print(f"results: {args.out / 'results.jsonl'}; summary: {args.out / 'summary.json'}; table: "
          f"{args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
