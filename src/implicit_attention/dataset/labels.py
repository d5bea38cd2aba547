"""Gold labels: the ``--label-map`` option, the aliases of a task's labels and the mapping of gold values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import DatasetError
from .formats import InputRecord

__all__ = ["gold_aliases", "map_gold", "parse_label_map"]


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

