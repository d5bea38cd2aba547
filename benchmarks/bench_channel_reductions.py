#!/usr/bin/env python
"""Per-channel reductions of one layer, each architecture's own path against the generic channel blocks.

For one decomposed layer it times the mean of ``abs(A)`` (``aggregate("abs")``) and the attribution map of a random
gradient, by the layer's fast path (Mamba's tiles, ``channel_reduced``; Mamba-2's and the delta rule's
per-head conv accumulation, ``heads.head_conv_reduce``; the per-head sign split of head-shared layers,
``heads.head_shared_attribution``) and by the channel blocks (``aggregate_by_blocks``,
``attribution_by_blocks``), in the same run, and prints the ratio and the largest relative difference.

Models: the bundled Mamba (width 128, inner 256) and random models of ``bench_architectures`` (width 256).

Examples::

    python benchmarks/bench_channel_reductions.py                       # Mamba and Mamba-2, L = 256, 512
    python benchmarks/bench_channel_reductions.py --models Mamba,RetNet --lengths 512,1024
    python benchmarks/bench_channel_reductions.py --device cuda --models Mamba,Mamba2 --lengths 2048 --width 768
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import implicit_attention as ia  # noqa: E402
from implicit_attention.loading import load_model  # noqa: E402


def best_of(run, repeats: int, device: torch.device) -> float:
    run()                                                     # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def build(name: str, width: int) -> torch.nn.Module:
    if name == "bundled":
        return load_model(None).model
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_architectures

    args = types.SimpleNamespace(hidden=width, layers=1, vocab=1024, seed=0, dtype="float32")
    return bench_architectures.build(name, args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 3)[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bundled,Mamba2",
                        help="'bundled' and/or names of benchmarks/bench_architectures.py (Mamba2, RetNet, ...)")
    parser.add_argument("--lengths", default="256,512", help="comma-separated input lengths")
    parser.add_argument("--width", type=int, default=256, help="width of the random models")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best of) after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (cuda on a GPU machine)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
    print(f"one layer, float32, batch 1, {where}, torch {torch.__version__}; "
          f"seconds (best of {args.repeats})")
    print("| model | layer | L | what | fast path (s) | channel blocks (s) | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = build(name, args.width).to(device)
        for length in (int(x) for x in args.lengths.split(",")):
            ids = torch.randint(0, model.config.vocab_size, (1, length),
                                generator=torch.Generator().manual_seed(length)).to(device)
            layer = ia.decompose(model, ids, layers=[0])[0]
            grad = torch.randn(layer.output.shape, generator=torch.Generator().manual_seed(0)).to(layer.device)
            at_matrix = layer.matrix_gradient(grad)
            pairs = [("abs(A)", lambda: layer._fast_aggregate("abs"), lambda: layer.aggregate_by_blocks("abs")),
                     ("attribution", lambda: layer._fast_attribution(at_matrix), lambda: layer.attribution_by_blocks(at_matrix))]
            for what, fast, blocks in pairs:
                if fast() is None:
                    print(f"| {name} | {type(layer).__name__} | {length} | {what} | no fast path | | | |")
                    continue
                difference = float((fast() - blocks()).abs().max() / blocks().abs().max())
                t_fast, t_blocks = best_of(fast, args.repeats, device), best_of(blocks, args.repeats, device)
                print(f"| {name} | {type(layer).__name__} | {length} | {what} | {t_fast:.3f} | {t_blocks:.3f} | "
                      f"{t_blocks / t_fast:.1f}x | {difference:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
