#!/usr/bin/env python
"""Calibrate a trained task model: fit the temperature of its label logits on the task's validation
split and record it in the model's ``task.json`` (``temperature``; ``calibration``: test ECE and NLL
before and after). The library then shows calibrated probabilities; predictions and explanations
do not change.

Examples::

    python scripts/calibrate.py src/implicit_attention/bundled/rt-sentiment-mamba
    python scripts/calibrate.py zoo/gla --task sentiment
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

from implicit_attention.benchmark import training  # noqa: E402
from implicit_attention.benchmark.tasks import groundtruth_task, sentiment_task  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a trained task model's directory (with task.json)")
    parser.add_argument("--task", choices=("sentiment", "groundtruth"), default="sentiment",
                        help="the task it was trained on (default: sentiment)")
    parser.add_argument("--groundtruth", type=Path, default=REPO_ROOT / "out" / "groundtruth",
                        help="the ground-truth splits, for --task groundtruth (default: out/groundtruth)")
    args = parser.parse_args(argv)
    if not (args.model_dir / "task.json").is_file():
        parser.error(f"{args.model_dir} has no task.json")
    task = sentiment_task() if args.task == "sentiment" else groundtruth_task(args.groundtruth)
    record = training.calibrate_task_model(args.model_dir, task)
    print(f"temperature {record['temperature']:.4f}: " + json.dumps(record["calibration"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
