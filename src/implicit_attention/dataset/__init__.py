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

  An ``id`` column/field of the input, and the columns named by ``keep_columns``
  (``--keep-columns``), are copied into the input's object. ``relevance`` is aligned with ``tokens`` (the prompt's real tokens, padding removed);
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
    attribution, ...: see :func:`~implicit_attention.explanations.combine`), so no device holds the maps
    of all layers. The memory estimate checks each device against its own free memory. Layers
    offloaded to the CPU or disk (parameters on the ``meta`` device) cannot be decomposed and are
    refused with a clear error. ``summary.json`` lists the devices of the selected layers
    (``layer_devices``). ``device_map`` is meant for one process (it is refused under ``torchrun``).

Example::

    from implicit_attention.dataset import DatasetOptions, run_dataset
    summary = run_dataset(DatasetOptions(path="reviews.csv", out="runs/rt", label_key="label"))
    print(summary["accuracy"], summary["examples_per_second"])

Modules (one concern each; their public names are re-exported here)
    :mod:`~implicit_attention.dataset.formats`: the input formats and :func:`read_inputs`;
    :mod:`~implicit_attention.dataset.labels`: gold labels and ``--label-map``;
    :mod:`~implicit_attention.dataset.store`: the resumable result store (shards, merge, ``run.json``,
    lock; no torch); :mod:`~implicit_attention.dataset.distributed`: the torchrun process group;
    :mod:`~implicit_attention.dataset.runner`: the options, the model and :func:`run_dataset`;
    :mod:`~implicit_attention.dataset.errors`: :class:`DatasetError`.
"""

from __future__ import annotations

from .distributed import Distributed
from .errors import DatasetError
from .formats import FORMATS, ID_KEY, InputRecord, detect_format, file_sha256, read_columns, read_inputs
from .labels import gold_aliases, map_gold, parse_label_map
from .runner import (
                     DEVICE_MAP_STRATEGIES,
                     GPU_BATCH_SIZE,
                     LENGTH_WINDOW,
                     RESULT_KEYS,
                     DatasetOptions,
                     batch_size,
                     explain_batch,
                     layer_devices,
                     length_sorted_batches,
                     load_for_run,
                     resolve_device_map,
                     run_dataset,
                     summarize,
)
from .store import (
                     LOCK_FILE,
                     RESULTS_FILE,
                     RESUME_KEYS,
                     RUN_FILE,
                     RUN_VERSION,
                     SUMMARY_FILE,
                     append_results,
                     check_run,
                     done_indices,
                     merge_results,
                     read_results,
                     run_lock,
                     shard_indices,
                     shard_path,
                     start_run,
                     write_atomic,
)

__all__ = [
    "DEVICE_MAP_STRATEGIES", "FORMATS", "GPU_BATCH_SIZE", "ID_KEY", "LENGTH_WINDOW", "LOCK_FILE", "RESULTS_FILE", "RESULT_KEYS",
    "RESUME_KEYS", "RUN_FILE",
    "RUN_VERSION", "SUMMARY_FILE", "DatasetError", "file_sha256",
    "DatasetOptions", "Distributed", "InputRecord", "append_results", "batch_size", "check_run", "detect_format",
    "done_indices", "explain_batch", "gold_aliases", "layer_devices", "length_sorted_batches", "load_for_run", "map_gold", "merge_results",
    "parse_label_map", "read_columns", "read_inputs", "read_results", "resolve_device_map", "run_dataset", "run_lock",
    "shard_indices", "shard_path", "start_run", "summarize", "write_atomic",
]
