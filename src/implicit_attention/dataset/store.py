"""The resumable result store of a run in its output directory (no torch: it only reads and writes files).

Files, in the directory ``out``:

- ``results.jsonl``: the merged result objects, one JSON object a line, sorted by index.
- ``results.rank{r}.jsonl``: the shard rank ``r`` appends its completed batches to (flushed and
  fsync'ed per batch); merged into ``results.jsonl`` (and removed) when a run starts and ends.
- ``summary.json``: written by the runner at the end, atomically (:func:`write_atomic`).
- ``index.html``: the run's page (accuracy, a sortable table of the examples with their tokens
  coloured by relevance; :func:`implicit_attention.render.dataset_index_html`), written after it.
- ``reports/<index>/``: the full report of each of the first ``--reports`` examples, linked from it.
- ``run.json``: the settings of the run (:data:`RUN_VERSION`, and the :data:`RESUME_KEYS` that must
  match for a run to be resumed: :func:`check_run`, :func:`start_run`).
- ``.explain-dataset.lock``: locked (``flock``) by rank 0 while a run is going (:func:`run_lock`).

See :mod:`implicit_attention.dataset` for how a run resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import DatasetError

__all__ = [
    "INDEX_FILE", "LOCK_FILE", "REPORTS_DIR", "RESULTS_FILE", "RESUME_KEYS", "RUN_FILE", "RUN_VERSION", "SETTING_OPTIONS", "SUMMARY_FILE",
    "append_results",
    "check_run", "done_indices", "merge_results", "read_results", "run_lock", "shard_indices", "shard_path",
    "start_run", "write_atomic",
]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.html"
REPORTS_DIR = "reports"
RUN_FILE = "run.json"
LOCK_FILE = ".explain-dataset.lock"
_SHARD_PREFIX, _SHARD_SUFFIX = "results.rank", ".jsonl"
#: Version of the ``run.json`` / result layout; a run of another version is not resumed.
RUN_VERSION = 3
#: Keys of :meth:`~implicit_attention.dataset.runner.DatasetOptions.settings` that must match for a run to be resumed.
RESUME_KEYS: tuple[str, ...] = (
    "input_sha256", "format", "text_key", "label_key", "label_map", "model", "method", "variant", "layers",
    "aggregate", "dtype", "target", "score", "check", "method_options", "keep_columns")
#: How the ``explain-dataset`` command line sets each of :data:`RESUME_KEYS` (for the refusal message).
SETTING_OPTIONS: dict[str, str] = {
    "input_sha256": "the input file's contents", "format": "--format", "text_key": "--text-column/--text-field",
    "label_key": "--label-column/--label-field", "label_map": "--label-map", "model": "--model",
    "method": "--method", "variant": "--variant", "layers": "--layers", "aggregate": "--aggregate",
    "dtype": "--dtype", "target": "--target", "score": "--score", "check": "--no-check",
    "method_options": "--option", "keep_columns": "--keep-columns",
}


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
    """The result objects of a JSONL results or shard file (``[]`` if it does not exist), in file order.

    ``read_results("runs/rt/results.jsonl")`` reads what ``explain-dataset`` wrote: one ``dict`` per
    explained (non-empty) input, sorted by ``index``, holding

    - ``index``: the input's 0-based index in the file (line of a text/JSONL file, data row of a CSV);
    - ``id`` (when the input has an ``id`` column or field) and each ``--keep-columns`` column, as read
      (strings from a CSV, any JSON value from JSONL);
    - ``text``: the input text; ``tokens``: the prompt's token strings (the task template filled in,
      padding removed); ``relevance``: one float per token (``null`` for a non-finite value);
      ``in_span``: per token, whether it comes from the text (not the template); ``offsets``: per
      token, ``[start, end]`` characters in the text, ``null`` outside it;
    - ``prediction``: the predicted label (or next token); ``probability``: its probability;
      ``probabilities``: ``{label: probability}`` (task models) or the top next tokens;
    - ``gold``: the mapped gold label (``null`` without ``--label-column``/``--label-field``);
      ``gold_raw``: the value as read; ``correct``: ``prediction == gold`` (``null`` without gold);
    - ``target``: the explained score: ``{"id", "token", "label", "score"}`` (``score`` in words);
    - ``batch_max_error``: the largest reconstruction error of the batch the input ran in (``null``
      for the baselines); ``diagnostics``: what the method reported (e.g. ``convergence_delta``).

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
    names = [RESULTS_FILE, SUMMARY_FILE, INDEX_FILE, RUN_FILE]
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
        what = "; ".join(f"{SETTING_OPTIONS.get(key, key)}: {_shown(key, before.get(key))} there, "
                         f"{_shown(key, settings.get(key))} now" for key in changed)
        hint = " (the input file's contents changed)" if "input_sha256" in changed else ""
        raise DatasetError(f"{os.fspath(out)!r} holds a run with other settings{hint} ({what}); rerun with the "
                           "same arguments to resume it, choose another --out, or pass --force to start over")


def _shown(key: str, value) -> str:
    """A stored setting as the user would write it on the command line."""
    if key == "layers":
        return "all" if value is None else ",".join(map(str, value)) if isinstance(value, list) else repr(value)
    if key == "check":
        return "on" if value is True else "off" if value is False else repr(value)
    if key == "input_sha256":
        return f"sha256 {str(value)[:12]}..."
    if key == "label_map" and isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value is None else repr(value)


def start_run(out: str | os.PathLike, settings: dict, force: bool) -> list[dict]:
    """Rank 0, before any explaining: start over if ``force``, write ``run.json``, merge old shards.

    Returns the rows already done (merged into ``results.jsonl``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if force:
        for path in _our_files(out):
            path.unlink()
        shutil.rmtree(out / REPORTS_DIR, ignore_errors=True)
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
    is removed when the run ends (a killed run leaves it behind, unlocked and harmless). Without
    ``fcntl`` (Windows) no lock is taken.
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
            with contextlib.suppress(OSError):  # removed while still held: no run can take it in between
                os.unlink(out / LOCK_FILE)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def done_indices(out: str | os.PathLike) -> set[int]:
    """Indices already in ``out/results.jsonl``."""
    return {row["index"] for row in read_results(Path(out) / RESULTS_FILE)}
