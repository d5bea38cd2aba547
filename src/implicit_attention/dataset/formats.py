"""Reading a data set: the input formats (text, CSV/TSV, JSON Lines) and their records.

Each input keeps its 0-based index in the file (line of a text or JSONL file, data row of a CSV
file); empty texts are kept and marked (:attr:`InputRecord.empty`), the runner skips and counts them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DatasetError

__all__ = ["FORMATS", "ID_KEY", "InputRecord", "detect_format", "file_sha256", "read_columns", "read_inputs"]

#: Input formats (``format=None`` picks one from the file's extension).
FORMATS: tuple[str, ...] = ("text", "csv", "tsv", "jsonl")
_EXTENSIONS = {".txt": "text", ".text": "text", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
               ".ndjson": "jsonl"}


@dataclass(frozen=True)
class InputRecord:
    """One input of the data set: its 0-based index in the file, its text and raw gold label.

    ``columns``: ``(name, value)`` pairs copied into the input's result (its ``id`` and the
    ``--keep-columns``; see :func:`read_columns`), not compared between records.
    """

    index: int
    text: str
    gold: str | None = None
    columns: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @property
    def empty(self) -> bool:
        return not self.text.strip()


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
        if not columns:
            return records  # an empty file: no header, no inputs (refused by read_inputs)
        for key, what in ((text_key, "text"), (label_key, "label")):
            if key is not None and key not in columns:
                raise DatasetError(f"{path}: no {what} column {key!r}; the columns are {', '.join(map(repr, columns))}"
                                   f" (choose one with --{what}-column)")
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            if None in row or None in row.values():  # more fields than the header (restkey None), or fewer
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                raise DatasetError(f"{path}, line {reader.line_num}: {fields} field(s), but the header has "
                                   f"{len(columns)} (quote a text that holds the delimiter)")
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
            records = _read_text(path, limit)
        elif fmt in ("csv", "tsv"):
            records = _read_csv(path, "," if fmt == "csv" else "\t", text_key, label_key, limit)
        else:
            records = _read_jsonl(path, text_key, label_key, limit)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: malformed CSV ({exc})") from None
    if not records:
        raise DatasetError(f"{path}: no inputs: the file " + ("has a header row but no data rows"
                                                             if fmt in ("csv", "tsv") and path.stat().st_size
                                                             else "is empty"))
    return records


#: The column / field an input's id is read from when the file has one (kept in its result).
ID_KEY = "id"


def read_columns(path: str | os.PathLike, fmt: str | None = None, keep: tuple[str, ...] | list[str] = (), *,
                 limit: int | None = None) -> dict[int, dict[str, Any]]:
    """``{index: {name: value}}``: the columns (CSV/TSV) or fields (JSONL) to copy into each input's result.

    Always the :data:`ID_KEY` (``"id"``) column or field where the input has one, and every name in
    ``keep`` (``--keep-columns``): a CSV column that the header lacks is an error, a JSONL field that a
    line lacks is ``None``. CSV values are strings; JSONL values are kept as they are (any JSON).
    A text file has no columns: ``keep`` is refused there. Indices are those of :func:`read_inputs`
    (call it first: it validates the file).
    """
    path = Path(path).expanduser()
    fmt = detect_format(path, fmt)
    keep = list(dict.fromkeys(keep))
    if fmt == "text":
        if keep:
            raise DatasetError(f"--keep-columns {','.join(keep)}: a text file has no columns (use CSV, TSV or JSONL)")
        return {}
    found: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8-sig", newline="") as handle:
        if fmt in ("csv", "tsv"):
            reader = csv.DictReader(handle, delimiter="," if fmt == "csv" else "\t")
            columns = reader.fieldnames or []
            missing = [key for key in keep if key not in columns]
            if missing:
                raise DatasetError(f"{path}: no column {', '.join(map(repr, missing))} to keep; the columns are "
                                   f"{', '.join(map(repr, columns))}")
            names = ([ID_KEY] if ID_KEY in columns and ID_KEY not in keep else []) + keep
            for i, row in enumerate(reader):
                if limit is not None and i >= limit:
                    break
                found[i] = {name: row.get(name) for name in names}
            return found
        lines = handle.read().split("\n")
    for i, line in enumerate(lines[:limit]):
        try:
            obj = json.loads(line) if line.strip() else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            continue
        row = {ID_KEY: obj[ID_KEY]} if ID_KEY in obj else {}
        row.update({name: obj.get(name) for name in keep})
        if row:
            found[i] = row
    return found
