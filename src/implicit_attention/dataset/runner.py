"""Running a data set: the options, loading the model, explaining batches, the summary and :func:`run_dataset`.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog import ROLLOUT_NEEDS_NON_NEGATIVE, check_method_options
from ..errors import LongInputWarning, MemoryBudgetError
from ..render import dataset_index_html
from .distributed import Distributed
from .errors import DatasetError
from .formats import InputRecord, detect_format, file_sha256, read_columns, read_inputs
from .labels import gold_aliases, map_gold
from .store import (
    INDEX_FILE,
    REPORTS_DIR,
    SUMMARY_FILE,
    append_results,
    check_run,
    done_indices,
    merge_results,
    run_lock,
    shard_indices,
    shard_path,
    start_run,
    write_atomic,
)

__all__ = [
    "DEVICE_MAP_STRATEGIES", "GPU_BATCH_SIZE", "LENGTH_WINDOW", "DatasetOptions", "batch_size", "explain_batch",
    "layer_devices", "length_sorted_batches", "load_for_run", "resolve_device_map", "run_dataset", "summarize",
]

#: Default number of batches whose inputs are sorted by length together (:attr:`DatasetOptions.length_window`).
LENGTH_WINDOW = 8
#: Default batch size on a GPU (see :attr:`DatasetOptions.batch_size`).
GPU_BATCH_SIZE = 16


#: The fields of every result object (a kept column may not take one of these names).
RESULT_KEYS: tuple[str, ...] = ("index", "text", "tokens", "relevance", "in_span", "offsets", "prediction",
                                "probability", "probabilities", "gold", "gold_raw", "correct", "target",
                                "batch_max_error", "diagnostics")


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
        keep_columns: CSV columns / JSONL fields copied into each input's result (``--keep-columns``);
            an ``id`` column or field is always copied (see :func:`~.formats.read_columns`). A name
            that a result already holds (``text``, ``relevance``, ...) is refused.
        label_map: ``{gold value: label name}`` added to the default mapping (see
            :func:`~implicit_attention.dataset.labels.gold_aliases`).
        model, dtype, device: as for :func:`~implicit_attention.loading.load_model`.
        device_map: load the model through ``accelerate`` with this ``device_map``: ``"auto"``,
            ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, or the path of a JSON file mapping
            module names to devices (``{"backbone.layers.0": "cuda:0", ...}``); see :func:`resolve_device_map`.
        method, variant, layers, aggregate, check: as for :func:`~implicit_attention.run_explanation`.
        method_options: the method's own options (``{"steps": 64}`` for integrated gradients; see
            :data:`~implicit_attention.catalog.METHOD_OPTIONS`).
        target: a fixed target for every input (label name, token id or one-token string); ``None``
            explains each prediction.
        score: ``"contrast"``, ``"logit"`` or ``"log_prob"`` (see
            :func:`~implicit_attention.explanations.texts.explain_texts`); ``None``: the model's default
            (the label contrast for task models).
        batch_size: inputs per forward/backward pass (left-padded together); ``None``: 1 on the CPU, where
            larger batches were slower per text (padding, memory traffic; measured on the bundled model
            with one thread: 13 texts/s with batches of 1, 3 with batches of 8), and :data:`GPU_BATCH_SIZE` on a GPU.
        length_window: batch inputs of similar length together: the pending inputs are cut into windows of
            ``length_window`` batches and sorted by token count within each window before batching, so
            that left padding wastes little of a batch while the file's order is kept coarsely (progress
            and resuming are unchanged: results are stored by index). 1 keeps the file's order; no effect
            with batches of 1.
        limit: read only the first ``limit`` inputs of the file (empty ones included).
        force: delete an earlier run's files in ``out`` and start over.
        progress: show a tqdm progress bar on stderr (rank 0 only).
        reports: write the full report (``report.html`` with the per-layer matrices, as ``explain --out``)
            of the first ``reports`` explained inputs into ``out/reports/<index>/``, linked from
            ``index.html`` (0, the default here: none; the command's default is 10).
    """

    path: str | os.PathLike
    out: str | os.PathLike
    format: str | None = None
    text_key: str = "text"
    label_key: str | None = None
    keep_columns: list[str] = field(default_factory=list)
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
    method_options: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    score: str | None = None
    batch_size: int | None = None
    length_window: int = LENGTH_WINDOW
    limit: int | None = None
    force: bool = False
    reports: int = 0
    progress: bool = True

    def __post_init__(self):
        # every setting is checked before anything is written, so that a refused run leaves no files behind
        check_method_options(self.method, self.method_options)
        taken = [key for key in self.keep_columns if key in RESULT_KEYS]
        if taken:
            raise DatasetError(f"--keep-columns {', '.join(taken)}: each result already has a field of that name "
                               f"(the result fields are {', '.join(RESULT_KEYS)}); rename the column")
        if self.length_window < 1:
            raise DatasetError(f"--length-window must be at least 1, got {self.length_window}")
        if self.method == "rollout" and self.aggregate == "mean":
            raise ValueError(ROLLOUT_NEEDS_NON_NEGATIVE)

    def settings(self, fmt: str, sha256: str) -> dict[str, Any]:
        """The settings stored in ``run.json``; those in :data:`~implicit_attention.dataset.store.RESUME_KEYS`
        must match to resume."""
        return {
            "input": str(Path(self.path).expanduser().resolve()), "input_sha256": sha256, "format": fmt,
            "text_key": None if fmt == "text" else self.text_key, "label_key": self.label_key,
            "label_map": dict(sorted(self.label_map.items())), "model": self.model or "rt-sentiment-mamba",
            "method": self.method, "variant": self.variant,
            "layers": list(self.layers) if self.layers else None, "aggregate": self.aggregate,
            "dtype": self.dtype, "target": self.target, "score": self.score, "check": self.check,
            "method_options": dict(sorted(self.method_options.items())),
            "keep_columns": list(self.keep_columns) or None,
        }


# ----------------------------------------------------------------------------------- explaining
def load_for_run(options: DatasetOptions, device: str | None):
    """Load the model on ``device``, or with ``device_map`` spread over the GPUs through ``accelerate``."""
    from ..loading import load_model

    device_map = None if options.device_map is None else resolve_device_map(options.device_map)
    return load_model(options.model, dtype=options.dtype, device=device, device_map=device_map)


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
    from ..devices import execution_device
    from ..hooks import select_layers

    return sorted({str(execution_device(module)) for _, module, _ in select_layers(model, layers)})


def explain_batch(loaded, batch: Sequence[InputRecord], options: DatasetOptions, target_id: int | None,
                  gold: dict[int, str]) -> list[dict]:
    """Explain one batch of non-empty inputs; returns their result objects (see the package doc)."""
    from ..explanations.texts import explain_texts
    from ..text import finite

    result = explain_texts(loaded, [record.text for record in batch], method=options.method,
                           variant=options.variant, layers=options.layers, target=target_id, score=options.score,
                           position=-1, aggregate=options.aggregate, check=options.check, **options.method_options)
    rows = []
    for record, example in zip(batch, result):
        error = example.run.max_error
        pred, label = example.prediction, gold.get(record.index)
        guess = pred.label if pred.is_label else pred.label.strip()
        rows.append({
            "index": record.index, "text": record.text, "tokens": example.tokens,
            "relevance": [finite(r) for r in example.relevance.tolist()],
            "in_span": list(example.in_span), "offsets": [list(o) if o else None for o in example.offsets],
            "prediction": pred.label,
            "probability": finite(pred.probability),
            "probabilities": {k: finite(v) for k, v in pred.probabilities.items()},
            "gold": label, "gold_raw": record.gold, "correct": None if label is None else guess == label.strip(),
            "target": {"id": example.target.id, "token": example.target.token, "label": example.target.label,
                       "score": example.target.score},
            "batch_max_error": None if error is None else finite(float(error)),
            "diagnostics": {key: finite(value) for key, value in example.diagnostics.items()},
        })
        rows[-1].update(record.columns)                       # its id and the --keep-columns
    return rows


def batch_size(options: DatasetOptions, loaded) -> int:
    """``options.batch_size``, or its default for the model's device (1 on the CPU, :data:`GPU_BATCH_SIZE` else)."""
    if options.batch_size is not None:
        return options.batch_size
    return 1 if loaded.device.type == "cpu" else GPU_BATCH_SIZE


def length_sorted_batches(items: Sequence[InputRecord], lengths: Sequence[int], size: int,
                          window: int) -> list[list[InputRecord]]:
    """``items`` in batches of ``size``, sorted by ``lengths`` within each window of ``window`` batches.

    Padding a batch to its longest input costs what the shorter ones lack; sorting within a window
    (rather than over the whole file) keeps the file's order coarsely, so the first results still come
    from the first inputs. Ties keep the file's order (a stable sort).
    """
    if size < 1 or window < 1:
        raise ValueError(f"batch size and length window must be at least 1, got {size} and {window}")
    if len(lengths) != len(items):
        raise ValueError(f"{len(items)} inputs but {len(lengths)} lengths")
    span = size * window
    ordered: list[InputRecord] = []
    for start in range(0, len(items), span):
        chunk = range(start, min(start + span, len(items)))
        ordered.extend(items[i] for i in sorted(chunk, key=lambda i: lengths[i]))
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def _batches(loaded, items: Sequence[InputRecord], size: int, window: int) -> list[list[InputRecord]]:
    if size == 1 or window == 1:
        return [list(items[start:start + size]) for start in range(0, len(items), size)]
    lengths = [len(loaded.tokenizer(record.text, add_special_tokens=False)["input_ids"]) for record in items]
    return length_sorted_batches(items, lengths, size, window)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says a batch did not fit (the library's budget check, or the device itself)."""
    import torch

    return isinstance(error, (MemoryBudgetError, torch.OutOfMemoryError))


def _release_memory(loaded) -> None:
    import gc

    import torch

    gc.collect()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()


def _explain_share(loaded, share: list[InputRecord], options: DatasetOptions, target_id: int | None,
                   gold: dict[int, str], dist: Distributed) -> int | None:
    """Explain this rank's inputs batch by batch, appending each finished batch to its shard.

    A batch that does not fit in memory (:class:`~implicit_attention.errors.MemoryBudgetError` or the
    device's out-of-memory error) is halved and retried, and later batches are cut to the size that
    fitted; a single input that does not fit stops the run. Returns that reduced batch size, or ``None``.
    """
    from tqdm.auto import tqdm

    desc = "explaining" if dist.world_size == 1 else f"explaining (rank 0 of {dist.world_size})"
    bar = tqdm(total=len(share), desc=desc, unit="text", file=sys.stderr, dynamic_ncols=True,
               disable=not options.progress or dist.rank != 0 or not share)
    limit, warned = loaded.max_training_tokens, False
    try:
        with open(shard_path(options.out, dist.rank), "a", encoding="utf-8", newline="\n") as handle, \
                warnings.catch_warnings():
            # explain_texts warns of every long input; a data set hears of the first one only
            warnings.filterwarnings("ignore", message="(?!explain-dataset: )", category=LongInputWarning)
            queue, cap = deque(_batches(loaded, share, batch_size(options, loaded), options.length_window)), None
            while queue:
                batch = queue.popleft()
                if cap is not None and len(batch) > cap:
                    queue.extendleft(reversed([batch[i:i + cap] for i in range(0, len(batch), cap)]))
                    continue
                try:
                    rows = explain_batch(loaded, batch, options, target_id, gold)
                except Exception as error:
                    if len(batch) == 1 or not _out_of_memory(error):
                        raise
                    _release_memory(loaded)
                    cap = len(batch) // 2
                    queue.extendleft([batch[cap:], batch[:cap]])
                    warnings.warn(f"explain-dataset: a batch of {len(batch)} texts did not fit in memory "
                                  f"({str(error).splitlines()[0][:160]}); continuing with batches of {cap}",
                                  RuntimeWarning, stacklevel=2)
                    continue
                append_results(handle, rows)
                bar.update(len(batch))
                long = [row for row in rows if limit is not None and sum(row["in_span"]) > limit]
                if long and not warned:
                    warned = True
                    warnings.warn(f"explain-dataset: input {long[0]['index']} is {sum(long[0]['in_span']):,} tokens "
                                  f"long, but {loaded.name or 'the model'} was trained on texts of at most {limit} "
                                  "tokens (max_sentence_tokens of its task.json): predictions and explanations of "
                                  "longer texts are less reliable (later long inputs are not reported)",
                                  LongInputWarning, stacklevel=2)
    finally:
        bar.close()
    return cap


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
        "target": settings["target"], "score": (rows[0]["target"].get("score") if rows else settings.get("score")),
        "check": settings["check"], "input": settings["input"],
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
    """:func:`run_dataset` in this process (see :mod:`implicit_attention.dataset` for the order of the steps)."""
    fmt = detect_format(options.path, options.format)
    records = read_inputs(options.path, fmt, text_key=options.text_key, label_key=options.label_key,
                          limit=options.limit)
    kept = read_columns(options.path, fmt, options.keep_columns, limit=options.limit)
    records = [dataclasses.replace(r, columns=tuple(kept[r.index].items())) if r.index in kept else r
               for r in records]
    settings = options.settings(fmt, file_sha256(Path(options.path).expanduser()))
    check_run(options.out, settings, options.force)
    loaded = load_for_run(options, _rank_device(options, dist))
    if options.method == "lrp":  # refused before the run directory is touched
        from ..explanations.lrp import refuse_unsupported

        refuse_unsupported(loaded.model)
    gold = map_gold(records, gold_aliases(loaded, options.label_map), loaded.labels)
    from ..text import target_token_id
    target_id = target_token_id(loaded, options.target)

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
    reduced_batch = _explain_share(loaded, share, options, target_id, gold, dist)
    dist.barrier()  # every shard is complete
    explain_seconds = time.perf_counter() - t0
    if dist.rank != 0:
        return None
    rows = merge_results(options.out)
    runtime = {"batch_size": batch_size(options, loaded), "batch_size_reduced_to": reduced_batch,
               "length_window": options.length_window,
               "limit": options.limit,
               "device": f"device_map={options.device_map}" if options.device_map else str(loaded.device),
               "layer_devices": layer_devices(loaded.model, options.layers)}
    summary = summarize(rows, records, settings=settings, model_name=loaded.name, done_before=len(done),
                        processes=dist.world_size, elapsed=time.perf_counter() - started,
                        explain_seconds=explain_seconds, runtime=runtime)
    write_atomic(Path(options.out) / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    reports = write_example_reports(loaded, rows[:options.reports], options, target_id) if options.reports > 0 else {}
    write_atomic(Path(options.out) / INDEX_FILE, dataset_index_html(summary, rows, reports))
    return summary


def write_example_reports(loaded, rows: Sequence[dict], options: DatasetOptions, target_id: int | None) -> dict:
    """The report of each of ``rows`` (explained again, alone, as ``explain --out`` does) in
    ``out/reports/<index>/``; returns ``{index: path of its report.html relative to out}``."""
    from ..explanations.texts import explain_texts
    from ..reports import decompositions_for_report, write_text_report

    written = {}
    for row in rows:
        with warnings.catch_warnings():          # the run itself has warned of long inputs, once
            warnings.simplefilter("ignore", LongInputWarning)
            result = explain_texts(loaded, [row["text"]], method=options.method, variant=options.variant,
                                   layers=options.layers, target=target_id, score=options.score, position=-1,
                                   aggregate=options.aggregate, check=options.check, **options.method_options)
        decompositions = decompositions_for_report(loaded, result, variant=options.variant, layers=options.layers,
                                                   check=options.check)
        settings = {"layers": ",".join(map(str, options.layers)) if options.layers else "all",
                    "target": options.target, "score": result[0].target.score, "dtype": options.dtype,
                    "check": options.check, "device": str(loaded.device), "input": f"{options.path}, input {row['index']}"}
        path = write_text_report(Path(options.out) / REPORTS_DIR / str(row["index"]), loaded, result, decompositions,
                                 method=options.method, variant=options.variant, settings=settings, overwrite=True)
        written[row["index"]] = path.relative_to(Path(options.out)).as_posix()
    return written
