"""Explain a whole data set: the engine of ``implicit-attention explain-dataset``.

Input: a text file (one text per line), a CSV/TSV file (a text column and optionally a gold label
column) or a JSON Lines file (a text field and optionally a label field). Each input keeps its
0-based index in the file (line of a text or JSONL file, data row of a CSV file); empty texts are
skipped and counted.

Output, in the directory ``out``:

- ``results.jsonl``: one JSON object per explained input, sorted by index::

      {"index": 3, "text": "...", "tokens": ["<s>", " a", ...], "relevance": [0.0012, ...],
       "prediction": "positive", "probability": 0.93, "probabilities": {"positive": 0.93, ...},
       "gold": "positive", "gold_raw": "1", "correct": true,
       "target": {"id": 1560, "token": " positive", "label": "positive"}, "batch_max_error": 2.1e-07}

  ``relevance`` is aligned with ``tokens`` (the prompt's real tokens, padding removed);
  ``batch_max_error`` is the largest relative reconstruction error of the layers decomposed for the
  batch the input ran in (``null`` for the baseline methods, which decompose nothing).
- ``summary.json``: counts, accuracy against the gold labels (if any), mean/max reconstruction
  error, settings, time taken, examples per second and number of processes; written at the end,
  atomically, from the full results file.
- ``run.json``: the settings of the run, checked when a run is resumed.
- ``.explain-dataset.lock``: locked (``flock``) by rank 0 while a run is going, so that a second run on
  the same directory at the same time is refused.

Resuming
    Results are appended in completed batches to a shard file ``results.rank{r}.jsonl`` (flushed and
    fsync'ed per batch). When a run starts, the shards left by an interrupted run are merged into
    ``results.jsonl`` (a trailing partial line, from a kill during a write, is dropped; an index seen
    twice is kept once) and the inputs already there are skipped. Rerunning an interrupted command
    therefore continues where it stopped, losing and duplicating nothing. The settings that change
    the results (input file contents, format, columns, label mapping, model, method, variant,
    layers, aggregate, dtype, target, check) are stored in ``run.json``; resuming with other
    settings is refused unless ``force`` (which deletes this tool's files in ``out`` and starts
    over). The batch size, device, device map, ``limit`` and number of processes may change
    between runs: a run with a larger ``limit`` continues one with a smaller one.

Data parallelism
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (``nccl`` when CUDA is
    available and the device is CUDA, else ``gloo``); after skipping the inputs already done, rank
    ``r`` takes the remaining indices ``i`` with ``i % world_size == r``, runs on ``cuda:LOCAL_RANK``
    when on GPU and appends to its own shard. After a barrier, rank 0 merges every shard into
    ``results.jsonl`` sorted by index (the same file a single process writes, which uses the same
    code with one shard), removes the shards and writes the summary. Relevance values may differ
    from a single-process run in the last bits only (other batch compositions, other padding), and
    ``batch_max_error`` is the error of the batch an input actually ran in.

Large models
    ``device_map="auto"`` (or ``"balanced"``, ``"sequential"``, or an explicit map read from a JSON
    file) loads the model through ``accelerate`` across the visible GPUs instead of moving it to
    one device. Every method works on such a model. The capture hooks
    record each token-mixing layer's input and output where the layer runs, and each layer is
    decomposed on the device that holds it (its factors are recomputed from its own parameters
    there, and its reconstruction error is measured against the output captured there); gradients
    reach every layer through ``accelerate``'s device moves. The matrix methods then move each
    layer's map to the inputs' device one layer at a time and combine it there (rollout,
    attribution, ...: see :func:`~implicit_attention.explain.combine`), so no device holds the maps
    of all layers. The memory estimate checks each device against its own free memory. Layers
    offloaded to the CPU or disk (parameters on the ``meta`` device) cannot be decomposed and are
    refused with a clear error. ``summary.json`` lists the devices of the selected layers
    (``layer_devices``). ``device_map`` is meant for one process (it is refused under ``torchrun``).

Example::

    from implicit_attention.dataset import DatasetOptions, run_dataset
    summary = run_dataset(DatasetOptions(path="reviews.csv", out="runs/rt", label_key="label"))
    print(summary["accuracy"], summary["examples_per_second"])
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EmptyInputError, ImplicitAttentionError

__all__ = [
    "FORMATS", "GPU_BATCH_SIZE", "LOCK_FILE", "RESULTS_FILE", "RUN_FILE", "SUMMARY_FILE", "DatasetError",
    "DatasetOptions", "Distributed", "InputRecord", "append_results", "batch_size", "check_run", "detect_format",
    "done_indices", "explain_batch", "gold_aliases", "layer_devices", "load_for_run", "map_gold", "merge_results",
    "parse_label_map", "read_inputs", "read_results", "resolve_device_map", "run_dataset", "run_lock",
    "shard_indices", "shard_path", "start_run", "summarize", "write_atomic",
]

#: Input formats (``format=None`` picks one from the file's extension).
FORMATS: tuple[str, ...] = ("text", "csv", "tsv", "jsonl")
_EXTENSIONS = {".txt": "text", ".text": "text", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
               ".ndjson": "jsonl"}

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"
LOCK_FILE = ".explain-dataset.lock"
_SHARD_PREFIX, _SHARD_SUFFIX = "results.rank", ".jsonl"
#: Default batch size on a GPU (see :attr:`DatasetOptions.batch_size`).
GPU_BATCH_SIZE = 16
#: Version of the ``run.json`` / result layout; a run of another version is not resumed.
RUN_VERSION = 1
#: Keys of :meth:`DatasetOptions.settings` that must match for a run to be resumed.
RESUME_KEYS: tuple[str, ...] = (
    "input_sha256", "format", "text_key", "label_key", "label_map", "model", "method", "variant", "layers",
    "aggregate", "dtype", "target", "check")


class DatasetError(ImplicitAttentionError, ValueError):
    """A data set file, an output directory or the options of a data set run are unusable."""


# ------------------------------------------------------------------------------------ options
@dataclass
class DatasetOptions:
    """What :func:`run_dataset` explains and how (the ``explain-dataset`` options).

    Attributes:
        path: the data set file.
        out: the output directory (created if missing).
        format: ``"text"``, ``"csv"``, ``"tsv"`` or ``"jsonl"``; ``None`` picks by extension.
        text_key: CSV column / JSONL field holding the text (default ``"text"``; unused for text files).
        label_key: CSV column / JSONL field holding the gold label, or ``None``.
        label_map: ``{gold value: label name}`` added to the default mapping (see :func:`gold_aliases`).
        model, dtype, device: as for :func:`~implicit_attention.bundled.load_model`.
        device_map: load the model through ``accelerate`` with this ``device_map``: ``"auto"``,
            ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, or the path of a JSON file mapping
            module names to devices (``{"backbone.layers.0": "cuda:0", ...}``); see :func:`resolve_device_map`.
        method, variant, layers, aggregate, check: as for :func:`~implicit_attention.run_explanation`.
        target: a fixed target for every input (label name, token id or one-token string); ``None``
            explains each prediction.
        batch_size: inputs per forward/backward pass (left-padded together); ``None``: 1 on the CPU, where
            larger batches were slower per text (padding, memory traffic; measured on the bundled model
            with one thread: 13 texts/s with batches of 1, 3 with batches of 8), and :data:`GPU_BATCH_SIZE` on a GPU.
        limit: read only the first ``limit`` inputs of the file (empty ones included).
        force: delete an earlier run's files in ``out`` and start over.
        progress: show a tqdm progress bar on stderr (rank 0 only).
    """

    path: str | os.PathLike
    out: str | os.PathLike
    format: str | None = None
    text_key: str = "text"
    label_key: str | None = None
    label_map: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None
    method: str = "attribution"
    variant: str = "unified"
    layers: list[int] | None = None
    aggregate: str = "abs"
    check: bool = True
    target: str | None = None
    batch_size: int | None = None
    limit: int | None = None
    force: bool = False
    progress: bool = True

    def settings(self, fmt: str, sha256: str) -> dict[str, Any]:
        """The settings stored in ``run.json``; those in :data:`RESUME_KEYS` must match to resume."""
        return {
            "input": str(Path(self.path).expanduser().resolve()), "input_sha256": sha256, "format": fmt,
            "text_key": None if fmt == "text" else self.text_key, "label_key": self.label_key,
            "label_map": dict(sorted(self.label_map.items())), "model": self.model or "rt-sentiment-mamba",
            "method": self.method, "variant": self.variant,
            "layers": list(self.layers) if self.layers else None, "aggregate": self.aggregate,
            "dtype": self.dtype, "target": self.target, "check": self.check,
        }


@dataclass
class Distributed:
    """This process's place in a data-parallel run (``rank 0 of 1`` without torchrun).

    ``barrier`` synchronises all processes (a no-op for one process); tests may pass their own.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    barrier: Callable[[], None] = lambda: None
    initialised: bool = False

    @classmethod
    def from_env(cls, device: str | None) -> Distributed:
        """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

        The backend is ``nccl`` when CUDA is available and ``device`` is a CUDA device, else ``gloo``.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device is not None and torch.device(device).type == "cuda"
        created = False
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if cuda else "gloo")
            created = True
        return cls(rank=rank, world_size=world, local_rank=local, barrier=dist.barrier, initialised=created)

    def close(self) -> None:
        """Leave the process group if :meth:`from_env` created it."""
        if self.initialised:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.initialised = False


@dataclass(frozen=True)
class InputRecord:
    """One input of the data set: its 0-based index in the file, its text and raw gold label."""

    index: int
    text: str
    gold: str | None = None

    @property
    def empty(self) -> bool:
        return not self.text.strip()


# ------------------------------------------------------------------------------------- reading
def detect_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """``fmt`` if given (checked), else the format of ``path``'s extension."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DatasetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DatasetError(f"cannot tell the format of {os.fspath(path)!r} from its extension {suffix or '(none)'!r}; "
                           f"pass --format ({', '.join(FORMATS)})")
    return _EXTENSIONS[suffix]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (identifies the input of a run)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gold_string(value: Any) -> str | None:
    """A gold label as a string: ``None``/empty -> ``None``; integral floats as integers (``1.0`` -> ``"1"``)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _read_text(path: Path, limit: int | None) -> list[InputRecord]:
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line starts no new input
    return [InputRecord(i, line.rstrip("\r")) for i, line in enumerate(lines[:limit])]


def _read_csv(path: Path, delimiter: str, text_key: str, label_key: str | None,
              limit: int | None) -> list[InputRecord]:
    records = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        for key, what in ((text_key, "text"), (label_key, "label")):
            if key is not None and key not in columns:
                raise DatasetError(f"{path}: no {what} column {key!r}; the columns are {', '.join(map(repr, columns))}"
                                   f" (choose one with --{what}-column)")
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            records.append(InputRecord(i, row.get(text_key) or "",
                                       _gold_string(row.get(label_key)) if label_key else None))
    return records


def _read_jsonl(path: Path, text_key: str, label_key: str | None, limit: int | None) -> list[InputRecord]:
    records = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines[:limit]):
        if not line.strip():
            records.append(InputRecord(i, ""))
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{path}, line {i + 1}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}, line {i + 1}: expected a JSON object, got {type(obj).__name__}")
        if text_key not in obj:
            raise DatasetError(f"{path}, line {i + 1}: no field {text_key!r} (choose the text field with "
                               f"--text-field); its fields are {', '.join(map(repr, obj))}")
        text = obj[text_key]
        if text is not None and not isinstance(text, str):
            raise DatasetError(f"{path}, line {i + 1}: field {text_key!r} is a {type(text).__name__}, not a string")
        records.append(InputRecord(i, text or "", _gold_string(obj.get(label_key)) if label_key else None))
    return records


def read_inputs(path: str | os.PathLike, fmt: str | None = None, *, text_key: str = "text",
                label_key: str | None = None, limit: int | None = None) -> list[InputRecord]:
    """Every input of the file (empty texts included, see :attr:`InputRecord.empty`), in file order.

    Args:
        path: the file.
        fmt: as for :func:`detect_format`.
        text_key, label_key: CSV column / JSONL field of the text and the gold label (ignored for text files).
        limit: read only the first ``limit`` inputs (lines, rows or JSON objects).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"no such file: {os.fspath(path)!r}")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    fmt = detect_format(path, fmt)
    try:
        if fmt == "text":
            return _read_text(path, limit)
        if fmt in ("csv", "tsv"):
            return _read_csv(path, "," if fmt == "csv" else "\t", text_key, label_key, limit)
        return _read_jsonl(path, text_key, label_key, limit)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: malformed CSV ({exc})") from None


# ------------------------------------------------------------------------------------- labels
def parse_label_map(value: str | Iterable[str] | None) -> dict[str, str]:
    """``"fresh=positive,rotten=negative"`` (or a list of such strings) -> ``{"fresh": "positive", ...}``."""
    if value is None:
        return {}
    parts = [value] if isinstance(value, str) else list(value)
    mapping: dict[str, str] = {}
    for part in ",".join(parts).split(","):
        if not part.strip():
            continue
        key, sep, label = part.partition("=")
        if not sep or not key.strip() or not label.strip():
            raise DatasetError(f"label map entries look like GOLD=LABEL (e.g. fresh=positive), got {part!r}")
        mapping[key.strip()] = label.strip()
    return mapping


def gold_aliases(loaded, label_map: dict[str, str]) -> dict[str, str]:
    """Lower-cased gold value -> label name.

    For a task model: each label name (``positive``), its label word without spaces, and the keys of
    the task's ``labels`` entry (``"1" -> positive``, ``"0" -> negative`` for the bundled model); then
    ``label_map`` on top (``fresh=positive``). The target of a ``label_map`` entry must be a label
    name. Without a task only ``label_map`` applies and gold values are compared with the predicted
    token's string (stripped).
    """
    aliases: dict[str, str] = {}
    names = list(getattr(loaded, "label_ids", {}) or {})
    task = getattr(loaded, "task", None) or {}
    for name in names:
        aliases[name.lower()] = name
        word = (task.get("label_words") or {}).get(name)
        if isinstance(word, str) and word.strip():
            aliases[word.strip().lower()] = name
    for key, name in (task.get("labels") or {}).items():
        if name in names:
            aliases[str(key).strip().lower()] = name
    for key, name in label_map.items():
        if names and name not in names:
            raise DatasetError(f"label map {key}={name}: {name!r} is not a label of the task "
                               f"({', '.join(names)})")
        aliases[key.lower()] = name
    return aliases


def _alias_keys(value: str) -> list[str]:
    """Lookup keys of a gold value: lower-cased, and ``"1"`` for an integral number such as ``"1.0"``."""
    keys = [value.lower()]
    try:
        number = float(value)
    except ValueError:
        return keys
    if number.is_integer():
        keys.append(str(int(number)))
    return keys


def map_gold(records: Sequence[InputRecord], aliases: dict[str, str], labels: Sequence[str]) -> dict[int, str]:
    """``{index: label}`` of the records with a gold label; raises on values that map to no label."""
    mapped: dict[int, str] = {}
    unknown: dict[str, int] = {}
    for record in records:
        if record.gold is None or record.empty:
            continue
        label = next((aliases[key] for key in _alias_keys(record.gold) if key in aliases), None)
        if label is None and not labels:
            label = record.gold  # no task: compare with the predicted token as given
        if label is None:
            unknown.setdefault(record.gold, record.index)
        else:
            mapped[record.index] = label
    if unknown:
        shown = ", ".join(f"{value!r} (input {index})" for value, index in list(unknown.items())[:5])
        example = ",".join(f"{value}={labels[i % len(labels)]}" for i, value in enumerate(list(unknown)[:2]))
        raise DatasetError(f"gold labels {shown} are not labels of the task ({', '.join(labels)}); map them with "
                           f"--label-map, e.g. --label-map {example}")
    return mapped


# ---------------------------------------------------------------------------- result files
def shard_path(out: str | os.PathLike, rank: int) -> Path:
    """``out/results.rank{rank}.jsonl``: the file rank ``rank`` appends its batches to."""
    return Path(out) / f"{_SHARD_PREFIX}{rank}{_SHARD_SUFFIX}"


def _shards(out: Path) -> list[Path]:
    found = []
    for path in out.glob(f"{_SHARD_PREFIX}*{_SHARD_SUFFIX}"):
        middle = path.name[len(_SHARD_PREFIX):-len(_SHARD_SUFFIX)]
        if middle.isdigit():
            found.append((int(middle), path))
    return [path for _, path in sorted(found)]


def read_results(path: str | os.PathLike) -> list[dict]:
    """The result objects of a JSONL results or shard file (``[]`` if it does not exist).

    A last line without its newline is a write cut short by an interruption: it is ignored. Any
    other unreadable line means the file is damaged and raises :class:`DatasetError`.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    rows = []
    for number, line in enumerate(complete.decode("utf-8", errors="replace").split("\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("index"), int):
            raise DatasetError(f"{path}, line {number}: not a result object; the file is damaged (rerun with "
                               "--force to start over)")
        rows.append(row)
    return rows


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _dump(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, allow_nan=False)


def append_results(handle, rows: Sequence[dict]) -> None:
    """Append ``rows`` to an open shard file as one write, then flush and fsync it."""
    if not rows:
        return
    handle.write("".join(_dump(row) + "\n" for row in rows))
    handle.flush()
    os.fsync(handle.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def merge_results(out: str | os.PathLike) -> list[dict]:
    """Merge ``results.jsonl`` and every shard into ``results.jsonl``, sorted by index; remove the shards.

    Partial trailing lines are dropped and an index present twice is kept once (the first seen:
    ``results.jsonl`` first, then the shards by rank), so merging again after a crash during a merge
    changes nothing. ``results.jsonl`` is replaced atomically; it is only rewritten when there are
    shards or it lost a partial line. Returns the merged rows.
    """
    out = Path(out)
    results = out / RESULTS_FILE
    shards = _shards(out)
    rows = read_results(results)
    clean = not results.exists() or results.stat().st_size == 0 or results.read_bytes().endswith(b"\n")
    if not shards and clean:
        return sorted(rows, key=lambda row: row["index"])
    merged: dict[int, dict] = {}
    for row in rows + [row for shard in shards for row in read_results(shard)]:
        merged.setdefault(row["index"], row)
    ordered = [merged[i] for i in sorted(merged)]
    write_atomic(results, "".join(_dump(row) + "\n" for row in ordered))
    for shard in shards:
        shard.unlink()
    return ordered


def shard_indices(pending: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The pending indices rank ``rank`` explains: those with ``index % world_size == rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return [i for i in pending if i % world_size == rank]


# ------------------------------------------------------------------------------------- run state
def _our_files(out: Path) -> list[Path]:
    names = [RESULTS_FILE, SUMMARY_FILE, RUN_FILE]
    return [out / n for n in names if (out / n).exists()] + _shards(out) + list(out.glob(".*.tmp*"))


def check_run(out: str | os.PathLike, settings: dict, force: bool) -> None:
    """Refuse to continue a run in ``out`` made with other settings (read-only; every rank calls it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {os.fspath(out)!r} exists and is not a directory")
    if force or not out.is_dir():
        return
    run_file = out / RUN_FILE
    if not run_file.is_file():
        if (out / RESULTS_FILE).exists() or _shards(out):
            raise DatasetError(f"{os.fspath(out)!r} holds results but no {RUN_FILE}: it was not written by "
                               "explain-dataset, or is damaged; pass --force to start over")
        return
    try:
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        before = stored["settings"]
        version = stored.get("version")
    except (OSError, ValueError, KeyError, TypeError):
        raise DatasetError(f"cannot read {run_file}; pass --force to start over") from None
    if version != RUN_VERSION:
        raise DatasetError(f"{run_file} is from another version of explain-dataset ({version}); pass --force "
                           "to start over")
    changed = [key for key in RESUME_KEYS if before.get(key) != settings.get(key)]
    if changed:
        what = "; ".join(f"{key}: {before.get(key)!r} there, {settings.get(key)!r} now" for key in changed)
        hint = " (the input file's contents changed)" if "input_sha256" in changed else ""
        raise DatasetError(f"{os.fspath(out)!r} holds a run with other settings{hint} ({what}); rerun with the "
                           "same arguments to resume it, choose another --out, or pass --force to start over")


def start_run(out: str | os.PathLike, settings: dict, force: bool) -> list[dict]:
    """Rank 0, before any explaining: start over if ``force``, write ``run.json``, merge old shards.

    Returns the rows already done (merged into ``results.jsonl``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if force:
        for path in _our_files(out):
            path.unlink()
    run_file = out / RUN_FILE
    if not run_file.exists():
        write_atomic(run_file, json.dumps({"version": RUN_VERSION, "settings": settings,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    return merge_results(out)


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.explain-dataset.lock`` (rank 0, for the whole run).

    A second run on the same directory while one is going is refused instead of mixing their
    files. The lock is the operating system's (``flock``): a killed run releases it. The lock file
    stays (it holds nothing). Without ``fcntl`` (Windows) no lock is taken.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"another explain-dataset run is writing to {os.fspath(out)!r} (it holds "
                               f"{LOCK_FILE}); wait for it to finish or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def done_indices(out: str | os.PathLike) -> set[int]:
    """Indices already in ``out/results.jsonl``."""
    return {row["index"] for row in read_results(Path(out) / RESULTS_FILE)}


# ----------------------------------------------------------------------------------- explaining
def load_for_run(options: DatasetOptions, device: str | None):
    """Load the model on ``device``, or with ``device_map`` through ``accelerate``."""
    from .bundled import load_model

    if options.device_map is None:
        return load_model(options.model, dtype=options.dtype, device=device)
    device_map = resolve_device_map(options.device_map)
    if importlib.util.find_spec("accelerate") is None:
        raise DatasetError(f"--device-map {options.device_map} needs the accelerate package, which is not "
                           "installed: pip install accelerate")
    from unittest import mock

    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def with_device_map(*args, **kwargs):
        kwargs.setdefault("device_map", device_map)
        return original(*args, **kwargs)

    # load_model has no device_map argument: give it one for this call (its checks and task stay)
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", with_device_map):
        loaded = load_model(options.model, dtype=options.dtype, device=None)
    return loaded


#: ``device_map`` strategies ``accelerate`` understands by name.
DEVICE_MAP_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(value: str) -> str | dict[str, str | int]:
    """``value`` as ``from_pretrained``'s ``device_map``: a strategy name, or the dict in a JSON file.

    The file maps module names to devices (``"cuda:1"``, ``"cpu"``, a GPU index), e.g. the
    ``model.hf_device_map`` of a model loaded before; ``accelerate`` checks that it covers the model.
    """
    if value in DEVICE_MAP_STRATEGIES:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DatasetError(f"--device-map {value!r} is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} nor a JSON "
                           "file mapping module names to devices")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"--device-map {value}: not a readable JSON file ({exc})") from None
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) for k, v in mapping.items()):
        raise DatasetError(f"--device-map {value}: expected a JSON object mapping module names to devices, "
                           'e.g. {"backbone.layers.0": "cuda:0", "backbone.layers.1": "cuda:1"}')
    return mapping


def layer_devices(model, layers: Sequence[int] | None) -> list[str]:
    """The devices the selected token-mixing layers compute on, sorted (one entry on a single device)."""
    from .capture import execution_device, select_layers

    return sorted({str(execution_device(module)) for _, module, _ in select_layers(model, layers)})


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def explain_batch(loaded, batch: Sequence[InputRecord], options: DatasetOptions, target_id: int | None,
                  gold: dict[int, str]) -> list[dict]:
    """Explain one batch of non-empty inputs; returns their result objects (see the module doc)."""
    import torch

    from .bundled import _decode, encode, predict, token_strings
    from .explain import run_explanation

    ids, mask = encode(loaded, [record.text for record in batch])
    target: Any = target_id
    if target is None and loaded.label_ids:
        with torch.no_grad():
            first = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        target = [p.token_id for p in predict(loaded, first, -1)]
    explanation = run_explanation(loaded.model, ids, mask, method=options.method, variant=options.variant,
                                  layers=options.layers, target=target, position=-1,
                                  aggregate=options.aggregate, check=options.check)
    predictions = predict(loaded, explanation.logits, -1)
    decomposition = explanation.decomposition
    error = max(decomposition.errors) if decomposition is not None and decomposition.errors else None
    rows = []
    for b, record in enumerate(batch):
        keep = mask[b].bool()
        relevance = explanation.relevance[b].detach().cpu()[keep.cpu()].double().tolist()
        pred, tid = predictions[b], int(explanation.target.ids[b])
        label = gold.get(record.index)
        guess = pred.label if pred.is_label else pred.label.strip()
        rows.append({
            "index": record.index, "text": record.text, "tokens": token_strings(loaded, ids[b], mask[b]),
            "relevance": [_finite(r) for r in relevance], "prediction": pred.label,
            "probability": _finite(pred.probability),
            "probabilities": {k: _finite(v) for k, v in pred.probabilities.items()},
            "gold": label, "gold_raw": record.gold, "correct": None if label is None else guess == label.strip(),
            "target": {"id": tid, "token": _decode(loaded, tid),
                       "label": next((n for n, t in loaded.label_ids.items() if t == tid), None)},
            "batch_max_error": None if error is None else _finite(float(error)),
        })
    return rows


def batch_size(options: DatasetOptions, loaded) -> int:
    """``options.batch_size``, or its default for the model's device (1 on the CPU, :data:`GPU_BATCH_SIZE` else)."""
    if options.batch_size is not None:
        return options.batch_size
    return 1 if loaded.device.type == "cpu" else GPU_BATCH_SIZE


def _batches(items: Sequence[InputRecord], size: int) -> Iterable[list[InputRecord]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _explain_share(loaded, share: list[InputRecord], options: DatasetOptions, target_id: int | None,
                   gold: dict[int, str], dist: Distributed) -> None:
    """Explain this rank's inputs batch by batch, appending each finished batch to its shard."""
    from tqdm.auto import tqdm

    desc = "explaining" if dist.world_size == 1 else f"explaining (rank 0 of {dist.world_size})"
    bar = tqdm(total=len(share), desc=desc, unit="text", file=sys.stderr, dynamic_ncols=True,
               disable=not options.progress or dist.rank != 0)
    try:
        with open(shard_path(options.out, dist.rank), "a", encoding="utf-8", newline="\n") as handle:
            for batch in _batches(share, batch_size(options, loaded)):
                append_results(handle, explain_batch(loaded, batch, options, target_id, gold))
                bar.update(len(batch))
    finally:
        bar.close()


# -------------------------------------------------------------------------------------- summary
def summarize(rows: Sequence[dict], records: Sequence[InputRecord], *, settings: dict, model_name: str,
              done_before: int, processes: int, elapsed: float, explain_seconds: float,
              runtime: dict | None = None) -> dict:
    """The ``summary.json`` object of a run from all its result rows."""
    errors = [row["batch_max_error"] for row in rows if row.get("batch_max_error") is not None]
    labelled = [row for row in rows if row.get("gold") is not None]
    correct = sum(1 for row in labelled if row.get("correct"))
    wanted = {record.index for record in records if not record.empty}
    done = {row["index"] for row in rows}
    this_run = max(len(rows) - done_before, 0)
    return {
        "model": model_name, "method": settings["method"], "variant": settings["variant"],
        "layers": settings["layers"], "aggregate": settings["aggregate"], "dtype": settings["dtype"],
        "target": settings["target"], "check": settings["check"], "input": settings["input"],
        "format": settings["format"],
        "counts": {"inputs": len(records), "empty_skipped": sum(1 for r in records if r.empty),
                   "explained": len(rows), "explained_this_run": this_run, "remaining": len(wanted - done),
                   "labelled": len(labelled), "correct": correct,
                   "predicted": dict(sorted(Counter(str(row.get("prediction")) for row in rows).items()))},
        "accuracy": correct / len(labelled) if labelled else None,
        "reconstruction_error": ({"mean": sum(errors) / len(errors), "max": max(errors)} if errors else None),
        "complete": wanted <= done,
        "processes": processes, **(runtime or {}),
        "elapsed_seconds": round(elapsed, 3), "explain_seconds": round(explain_seconds, 3),
        "examples_per_second": (this_run / explain_seconds) if explain_seconds > 0 and this_run else None,
    }


# ------------------------------------------------------------------------------------------ run
def _rank_device(options: DatasetOptions, dist: Distributed) -> str | None:
    if options.device_map is not None:
        if options.device is not None:
            raise DatasetError("--device-map and --device exclude each other")
        if dist.world_size > 1:
            raise DatasetError("--device-map auto spreads one model over the GPUs for a single process; "
                               "do not combine it with torchrun (one process per GPU)")
        return None
    if dist.world_size > 1 and options.device is not None:
        import torch
        if torch.device(options.device).type == "cuda":
            return f"cuda:{dist.local_rank}"
    return options.device


def run_dataset(options: DatasetOptions, dist: Distributed | None = None) -> dict | None:
    """Explain every non-empty input of ``options.path`` into ``options.out``; resumable, data-parallel.

    With ``dist=None`` the process joins torchrun's process group when ``WORLD_SIZE`` > 1 (and
    leaves it at the end). Returns the summary on rank 0, ``None`` on the other ranks.
    """
    started = time.perf_counter()
    if options.batch_size is not None and options.batch_size < 1:
        raise DatasetError(f"--batch-size must be at least 1, got {options.batch_size}")
    own = dist is None
    if own:
        dist = Distributed.from_env(options.device)
    try:
        with contextlib.ExitStack() as stack:
            return _run(options, dist, stack, started)
    finally:
        if own:
            dist.close()


def _run(options: DatasetOptions, dist: Distributed, stack: contextlib.ExitStack, started: float) -> dict | None:
    """:func:`run_dataset` in this process (see the module doc for the order of the steps)."""
    fmt = detect_format(options.path, options.format)
    records = read_inputs(options.path, fmt, text_key=options.text_key, label_key=options.label_key,
                          limit=options.limit)
    settings = options.settings(fmt, file_sha256(Path(options.path).expanduser()))
    check_run(options.out, settings, options.force)
    loaded = load_for_run(options, _rank_device(options, dist))
    gold = map_gold(records, gold_aliases(loaded, options.label_map), loaded.labels)
    from .bundled import resolve_target
    target_id = resolve_target(loaded, options.target)

    dist.barrier()  # every rank has checked run.json before rank 0 touches the directory
    if dist.rank == 0:
        stack.enter_context(run_lock(options.out))
        start_run(options.out, settings, options.force)
    dist.barrier()
    done = done_indices(options.out)
    pending = [r.index for r in records if not r.empty and r.index not in done]
    by_index = {r.index: r for r in records}
    share = [by_index[i] for i in shard_indices(pending, dist.rank, dist.world_size)]
    t0 = time.perf_counter()
    _explain_share(loaded, share, options, target_id, gold, dist)
    dist.barrier()  # every shard is complete
    explain_seconds = time.perf_counter() - t0
    if dist.rank != 0:
        return None
    rows = merge_results(options.out)
    runtime = {"batch_size": batch_size(options, loaded), "limit": options.limit,
               "device": f"device_map={options.device_map}" if options.device_map else str(loaded.device),
               "layer_devices": layer_devices(loaded.model, options.layers)}
    summary = summarize(rows, records, settings=settings, model_name=loaded.name, done_before=len(done),
                        processes=dist.world_size, elapsed=time.perf_counter() - started,
                        explain_seconds=explain_seconds, runtime=runtime)
    write_atomic(Path(options.out) / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
