#!/usr/bin/env python
"""End-to-end explanations with the model's scans token by token (stock) or in parallel (mambapy).

``implicit_attention.scans.parallel_scans`` runs ``transformers``' Mamba mixers with mambapy's parallel
scan while ``explain`` and ``decompose`` run the model (the default). This times, in one run and on one
machine, the model's forward + backward and each matrix method, both ways, and prints the ratios.

Examples::

    python benchmarks/bench_scans.py                          # the bundled model, L = 512, CPU (~3 minutes)
    python benchmarks/bench_scans.py --lengths 128,512 --repeats 3
    # a random Mamba shaped like Mamba-130M on a GPU, the token loop timed up to 1024 tokens:
    python benchmarks/bench_scans.py --device cuda --random-layers 24 --random-width 768 --lengths 1024,2048 --stock-max-length 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import implicit_attention as ia  # noqa: E402
from implicit_attention import scans  # noqa: E402
from implicit_attention.loading import load_model  # noqa: E402

METHODS = ("raw", "paper", "rollout", "attribution")


def seconds(run, repeats: int) -> float:
    run()                                             # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def random_mamba(layers: int, width: int, vocab: int = 1024):
    """A randomly initialised ``MambaForCausalLM`` of ``layers`` x ``width`` (inner ``2 * width``, state
    16, conv 4: the shape of Mamba-130M at 24 x 768), with the seed fixed."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, state_size=16,
                         num_hidden_layers=layers, conv_kernel=4)
    return MambaForCausalLM(config).eval()


def synchronised(run, device: torch.device):
    def call():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return call


def forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, use_cache=False).logits[0, -1].sum().backward()     # as explain runs it: no cache


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or Hub id (default: the bundled model)")
    parser.add_argument("--lengths", default="512", help="comma-separated input lengths")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (after a warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (cuda on a GPU machine)")
    parser.add_argument("--random-layers", type=int, default=0,
                        help="time a randomly initialised Mamba of this depth instead of --model")
    parser.add_argument("--random-width", type=int, default=768, help="its width (inner size twice that)")
    parser.add_argument("--stock-max-length", type=int, default=None,
                        help="time the token-loop column only up to this length (it is slow on long inputs)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timings, profile each method once (torch.profiler) and print its N "
                             "costliest operators by self time (device time on a GPU)")
    args = parser.parse_args(argv)
    if args.profile < 0:
        parser.error("--profile takes the number of operators to print (0: no profile)")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()        # the missing-CUDA-kernel notes: both columns lack them
    device = torch.device(args.device)
    model = (random_mamba(args.random_layers, args.random_width) if args.random_layers
             else load_model(args.model).model).to(device)
    vocab = model.config.vocab_size
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{type(model).__name__}, {model.config.num_hidden_layers} layers, width {model.config.hidden_size}; "
          f"torch {torch.__version__}, {where}; seconds per call (mean of "
          f"{args.repeats} after a warm-up), the model's scans token by token / with mambapy")
    cuda = device.type == "cuda"
    print("| L | what | token loop (s) | mambapy (s) | speed-up |" + (" peak GiB |" if cuda else ""))
    print("|---|---|---|---|---|" + ("---|" if cuda else ""))
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        stock = args.stock_max_length is None or length <= args.stock_max_length
        for name, run in [("forward + backward", lambda: forward_backward(model, ids))] + [
                (f"explain {m}", lambda m=m: ia.explain(model, ids, method=m)) for m in METHODS]:
            timed = {}
            for enabled in (False, True) if stock else (True,):
                scans.ENABLED = enabled
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                if name == "forward + backward":    # the model alone: switch the scans as explain does
                    with scans.parallel_scans(model, tuple(ids.shape)):
                        timed[enabled] = seconds(synchronised(run, device), args.repeats)
                else:
                    timed[enabled] = seconds(synchronised(run, device), args.repeats)
            scans.ENABLED = True
            loop, ratio = (f"{timed[False]:.2f}", f"{timed[False] / timed[True]:.1f}x") if stock else ("-", "-")
            peak = f" {torch.cuda.max_memory_allocated(device) / 2**30:.1f} |" if cuda else ""
            print(f"| {length} | {name} | {loop} | {timed[True]:.2f} | {ratio} |{peak}", flush=True)
        if args.profile:
            for method in METHODS:
                profile(lambda m=method: ia.explain(model, ids, method=m), device, f"explain {method}, L = {length}",
                        args.profile)
    return 0


def profile(run, device: torch.device, title: str, rows: int) -> None:
    """Print the ``rows`` operators of ``run`` with the most self time (on the GPU where there is one)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run()                                             # warm-up (compiled kernels, caches)
    with torch_profile(activities=activities) as prof:
        synchronised(run, device)()
    keys = ["self_cuda_time_total", "cpu_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    for key in keys:                                  # on a GPU also the host's view: launch-bound stretches
        print(f"\n{title}: the {rows} operators with the most {key.replace('_', ' ')}")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
