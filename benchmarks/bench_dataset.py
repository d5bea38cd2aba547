"""Benchmark: ``implicit-attention explain-dataset`` with one process against ``--nproc`` processes.

Writes the first ``--n`` Rotten Tomatoes test sentences (``implicit_attention.data.load_rotten_tomatoes``,
gold labels 1/0) to a CSV file, then explains them twice into fresh output directories:

1. one process: ``python -m implicit_attention explain-dataset ...``;
2. ``--nproc`` processes: ``python -m torch.distributed.run --standalone --nproc_per_node NPROC -m
   implicit_attention explain-dataset ...`` (data-parallel; with ``--device cuda`` each process uses
   ``cuda:LOCAL_RANK``, on the CPU the processes use gloo and torchrun gives each one thread).

For each it prints the wall time of the whole command (start-up, model loading, merge included), the
explaining time from ``summary.json`` (``explain_seconds``: from the start of the first batch to the
end of the slowest process's last batch), examples per second and the speed-up over one process.
It also checks that both runs wrote the same results (indices, predictions; relevance within 1e-5).

Usage (a two-GPU machine)::

    python benchmarks/bench_dataset.py --device cuda --nproc 2 --n 892
    python benchmarks/bench_dataset.py --device cuda --nproc 2 --n 892 --batch-size 64

On the CPU (``--device cpu``, the default) ``--threads`` sets the single process's threads
(default: torch's default, all cores); each torchrun process gets ``--threads-per-process`` (default 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_csv(path: Path, n: int) -> int:
    """The first ``n`` test sentences as ``text,label``; returns how many were written."""
    from implicit_attention.data import load_rotten_tomatoes

    rows = load_rotten_tomatoes("test")[:n]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return len(rows)


def explain_args(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    command = ["explain-dataset", str(data), "--label-column", "label", "--out", str(out), "--method", args.method,
               "--dtype", args.dtype, "--device", args.device, "--no-progress"]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.model:
        command += ["--model", args.model]
    return command


def timed_run(command: list[str], env: dict, out: Path, timeout: float) -> dict:
    """Run ``command``, return its wall time and ``summary.json``; stop with its output if it fails."""
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_seconds": wall, **summary}


def compare(a: Path, b: Path) -> float:
    """Largest relevance difference between two results files (raises if the inputs or predictions differ)."""
    rows_a = [json.loads(line) for line in (a / "results.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows_a] == [r["index"] for r in rows_b], "different inputs explained"
    worst = 0.0
    for x, y in zip(rows_a, rows_b):
        assert x["prediction"] == y["prediction"], f"prediction differs at index {x['index']}"
        worst = max([worst] + [abs(p - q) for p, q in zip(x["relevance"], y["relevance"])])
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="number of test sentences (default: %(default)s; 892 = all)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the parallel run (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: explain-dataset's (1 on the CPU, 16 on a GPU)")
    parser.add_argument("--method", default="attribution")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the single process")
    parser.add_argument("--threads-per-process", type=int, default=1, help="CPU threads of each torchrun process")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements to this file")
    args = parser.parse_args()

    import torch
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"device {args.device}" + (f" ({torch.cuda.device_count()} GPUs: {torch.cuda.get_device_name(0)})"
                                     if args.device.startswith("cuda") and torch.cuda.is_available() else ""))
    base_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="bench_dataset_") as tmp:
        root = Path(tmp)
        data = root / "rt_test.csv"
        n = write_csv(data, args.n)
        print(f"{n} Rotten Tomatoes test sentences, batch size {args.batch_size or 'default'}, method {args.method}, "
              f"{args.dtype}")

        single_env = dict(base_env)
        if args.threads is not None:
            single_env["OMP_NUM_THREADS"] = str(args.threads)
        one = timed_run([sys.executable, "-m", "implicit_attention", *explain_args(args, data, root / "one")],
                        single_env, root / "one", args.timeout)
        many_env = dict(base_env, OMP_NUM_THREADS=str(args.threads_per_process))
        many = timed_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(args.nproc), "-m", "implicit_attention", *explain_args(args, data, root / "many")],
                         many_env, root / "many", args.timeout)
        diff = compare(root / "one", root / "many")

    print(f"{'processes':>9}  {'wall s':>8}  {'explain s':>9}  {'ex/s':>8}  {'speed-up':>8}  accuracy")
    for run in (one, many):
        speedup = one["explain_seconds"] / run["explain_seconds"]
        print(f"{run['processes']:>9}  {run['wall_seconds']:8.2f}  {run['explain_seconds']:9.2f}  "
              f"{run['examples_per_second']:8.2f}  {speedup:7.2f}x  {run['accuracy']:.4f}")
    print(f"speed-up of {args.nproc} processes: {one['explain_seconds'] / many['explain_seconds']:.2f}x explaining, "
          f"{one['wall_seconds'] / many['wall_seconds']:.2f}x wall (start-up and model loading included); "
          f"max relevance difference {diff:.1e}")
    if diff > 1e-5:
        sys.exit(f"the runs disagree: relevance differs by {diff:.2e}")
    if args.json is not None:
        args.json.write_text(json.dumps({"n": n, "args": {k: str(v) for k, v in vars(args).items()},
                                         "single": one, "parallel": many, "max_relevance_difference": diff},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
