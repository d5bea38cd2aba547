"""Benchmark: ``explain-dataset`` throughput on one device, batch size and length sorting against the file's order.

Two workloads (``--workloads``):

- ``bundled``: the bundled sentiment model on the Rotten Tomatoes test sentences (892; ``--n``);
- ``long``: a randomly initialised Mamba of ``--layers`` layers and width ``--width`` (shaped like
  Mamba-130M by default) on ``--long-n`` texts of ``--length / 2`` to ``--length`` tokens (test
  sentences joined until each text reaches its drawn length), explaining its own next-token prediction.

Each workload runs every configuration of ``--configs`` (``BATCH:WINDOW`` pairs: ``16:1`` is a batch
of 16 in the file's order, the default before length sorting; ``16:8`` sorts the texts by token count
within windows of 8 batches, the default now) in-process through
:func:`implicit_attention.dataset.run_dataset`, after a warm-up run that is not timed. For each it
prints texts per second over the explaining time (``summary.json``'s ``explain_seconds``), the
share of each batch's token slots that is padding, and the GPU's utilisation sampled by
``nvidia-smi`` every 0.2 s while the configuration runs (mean and median; ``-`` where it is absent),
and the batch size the run fell back to where a batch did not fit (``summary.json``'s
``batch_size_reduced_to``; ``-``: none did). Every configuration must give the same predictions as
the first, and relevance within ``1e-4`` (batches composed differently change only the float rounding).

Usage (a GPU machine; about 3 minutes on one H200)::

    python benchmarks/bench_dataset_throughput.py --device cuda
    python benchmarks/bench_dataset_throughput.py --device cuda --workloads long --configs 1:1,16:1,16:8,32:8

On the CPU, ``--device cpu --workloads bundled --n 64 --configs 1:1,8:1,8:8`` is a quick look.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class UtilisationSampler:
    """GPU utilisation (percent) polled from ``nvidia-smi`` in a thread; empty where it is absent."""

    def __init__(self, device_index: int, period: float = 0.2):
        self.command = [shutil.which("nvidia-smi") or "", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                        "-i", str(device_index)]
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(self.command, capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self._stop.wait(self.period)

    def __enter__(self) -> UtilisationSampler:
        if self.command[0]:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def sentences(n: int) -> list[tuple[str, str]]:
    from implicit_attention.data import load_rotten_tomatoes

    return [(text, str(label)) for text, label in load_rotten_tomatoes("test")[:n]]


def long_texts(tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` texts of ``length // 2`` to ``length`` tokens: test sentences joined in a shuffled order."""
    pool = [text for text, _ in sentences(10_000)]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        goal, parts, count = rng.randint(length // 2, length), [], 0
        while count < goal:
            sentence = rng.choice(pool)
            parts.append(sentence)
            count += len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        text = " ".join(parts)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:goal]
        texts.append(tokenizer.decode(ids))
    return texts


def random_mamba(directory: Path, layers: int, width: int) -> Path:
    """A randomly initialised Mamba with the zoo's tokenizer, saved as a model directory."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=3072, hidden_size=width, num_hidden_layers=layers, state_size=16,
                         expand=2, conv_kernel=4, time_step_rank=max(1, width // 16), tie_word_embeddings=True)
    MambaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(REPO_ROOT / "src" / "implicit_attention" / "bundled" / "rt-sentiment-mamba" / name, directory)
    return directory


def padding_share(tokenizer, texts: list[str], batch: int, window: int) -> float:
    """The share of the batches' token slots that is left padding, for this batching."""
    from implicit_attention.dataset import length_sorted_batches

    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = length_sorted_batches(list(range(len(texts))), lengths, batch, window)
    slots = sum(len(b) * max(lengths[i] for i in b) for b in order)
    return 1.0 - sum(lengths) / slots


def run_config(args, data: Path, out: Path, model: str | None, labelled: bool, batch: int, window: int,
               limit: int | None = None) -> dict:
    from implicit_attention.dataset import DatasetOptions, run_dataset

    options = DatasetOptions(path=data, out=out, label_key="label" if labelled else None, model=model,
                             device=args.device, method=args.method, batch_size=batch, length_window=window,
                             limit=limit, force=True, progress=False)
    index = int(args.device.split(":")[1]) if ":" in args.device else 0
    start = time.perf_counter()
    with UtilisationSampler(index) if args.device.startswith("cuda") else _NoSampler() as sampler:
        summary = run_dataset(options)
    summary["wall_seconds"] = time.perf_counter() - start
    summary["gpu_utilisation"] = sampler.samples
    return summary


class _NoSampler:
    samples: list[float] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def largest_difference(a: list[dict], b: list[dict]) -> float:
    assert [r["index"] for r in a] == [r["index"] for r in b], "different inputs explained"
    worst = 0.0
    for x, y in zip(a, b):
        assert x["prediction"] == y["prediction"], f"prediction differs at input {x['index']}"
        worst = max([worst] + [abs(p - q) for p, q in zip(x["relevance"], y["relevance"])])
    return worst


def workload(args, name: str, root: Path) -> list[dict]:
    from transformers import AutoTokenizer

    if name == "bundled":
        from implicit_attention.bundled import bundled_model_path

        model, rows = None, sentences(args.n)
        tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
        description = f"bundled model, {len(rows)} test sentences"
    else:
        model = str(random_mamba(root / "random-mamba", args.layers, args.width))
        tokenizer = AutoTokenizer.from_pretrained(model)
        rows = [(text, "") for text in long_texts(tokenizer, args.long_n, args.length)]
        description = (f"random Mamba, {args.layers} layers, width {args.width}, {len(rows)} texts of "
                       f"{args.length // 2}-{args.length} tokens")
    labelled = name == "bundled"
    data = root / f"{name}.csv"
    with open(data, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"\n{description}; method {args.method}")
    first = args.configs[0]
    run_config(args, data, root / "warm-up", model, labelled, first[0], first[1], limit=min(len(rows), 2 * first[0]))
    print(f"{'batch':>5} {'window':>6} {'texts/s':>8} {'explain s':>9} {'padding':>8} {'GPU % mean':>10} "
          f"{'median':>6} {'max diff':>8} {'halved to':>9}")
    measured, reference = [], None
    for batch, window in args.configs:
        out = root / f"{name}-{batch}-{window}"
        summary = run_config(args, data, out, model, labelled, batch, window)
        rows_now = results(out)
        diff = 0.0 if reference is None else largest_difference(reference, rows_now)
        reference = reference or rows_now
        util = summary.pop("gpu_utilisation")
        record = {"workload": name, "batch_size": batch, "length_window": window,
                  "texts_per_second": summary["examples_per_second"], "explain_seconds": summary["explain_seconds"],
                  "padding_share": padding_share(tokenizer, [text for text, _ in rows], batch, window),
                  "gpu_utilisation_mean": statistics.fmean(util) if util else None,
                  "gpu_utilisation_median": statistics.median(util) if util else None,
                  "gpu_samples": len(util), "max_relevance_difference": diff, "accuracy": summary.get("accuracy"),
                  "batch_size_reduced_to": summary.get("batch_size_reduced_to")}
        measured.append(record)
        mean = "-" if record["gpu_utilisation_mean"] is None else f"{record['gpu_utilisation_mean']:.0f}"
        median = "-" if record["gpu_utilisation_median"] is None else f"{record['gpu_utilisation_median']:.0f}"
        print(f"{batch:>5} {window:>6} {record['texts_per_second']:8.1f} {record['explain_seconds']:9.2f} "
              f"{100 * record['padding_share']:7.1f}% {mean:>10} {median:>6} {diff:8.1e} "
              f"{record['batch_size_reduced_to'] or '-':>9}", flush=True)
        if diff > 1e-4:
            sys.exit(f"batch {batch}, window {window} disagrees with the first configuration by {diff:.2e}")
    return measured


def parse_configs(value: str) -> list[tuple[int, int]]:
    configs = []
    for item in value.split(","):
        batch, _, window = item.partition(":")
        configs.append((int(batch), int(window or 1)))
    return configs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default: %(default)s)")
    parser.add_argument("--workloads", default="bundled,long", help="bundled, long or both (default: %(default)s)")
    parser.add_argument("--configs", type=parse_configs, default=parse_configs("1:1,16:1,16:8,64:8"),
                        help="BATCH:WINDOW pairs to time (default: 1:1,16:1,16:8,64:8)")
    parser.add_argument("--method", default="attribution", help="explanation method (default: %(default)s)")
    parser.add_argument("--n", type=int, default=892, help="test sentences of the bundled workload (default: all)")
    parser.add_argument("--long-n", type=int, default=128, help="texts of the long workload (default: %(default)s)")
    parser.add_argument("--length", type=int, default=512, help="longest text of the long workload, in tokens")
    parser.add_argument("--layers", type=int, default=24, help="layers of the random Mamba (default: %(default)s)")
    parser.add_argument("--width", type=int, default=768, help="its width (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements to this file")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = sorted(set(names) - {"bundled", "long"})
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}: give bundled, long or both")

    import torch

    from implicit_attention.errors import LongInputWarning
    # the random model has no training length, and a few test sentences exceed the bundled model's
    warnings.filterwarnings("ignore", category=LongInputWarning)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device "
          f"{args.device}" + (f" ({torch.cuda.get_device_name(0)})" if args.device.startswith("cuda") else ""))
    measured = []
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        for name in names:
            measured += workload(args, name, Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": measured},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
