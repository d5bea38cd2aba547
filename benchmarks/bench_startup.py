"""Start-up time of the command line and of ``import implicit_attention``, against references in the same run.

Each command runs in a fresh interpreter ``--repeat`` times; the median wall time is reported, with
its ratio to a bare ``python -c pass`` and to importing torch and transformers' model base class
(what the package imported eagerly before it became lazy). Target: ``implicit-attention --help``
and ``--version`` under 1.5 s on the project's 2-core machine.

    python benchmarks/bench_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 1.5


def median_seconds(command: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (default: %(default)s)")
    args = parser.parse_args()
    cli = shutil.which("implicit-attention") or None
    cli_prefix = [cli] if cli else [sys.executable, "-m", "implicit_attention"]
    commands = {
        "python -c pass (reference)": [sys.executable, "-c", "pass"],
        "import torch + PreTrainedModel (reference)": [sys.executable, "-c",
                                                        "import torch; from transformers import PreTrainedModel"],
        "import implicit_attention": [sys.executable, "-c", "import implicit_attention"],
        "implicit-attention --help": cli_prefix + ["--help"],
        "implicit-attention --version": cli_prefix + ["--version"],
        "implicit-attention explain --help": cli_prefix + ["explain", "--help"],
    }
    seconds = {name: median_seconds(command, args.repeat) for name, command in commands.items()}
    bare, heavy = seconds["python -c pass (reference)"], seconds["import torch + PreTrainedModel (reference)"]
    print(f"{'command':45s} {'median':>9s} {'x bare python':>14s} {'x torch+transformers':>21s}")
    for name, value in seconds.items():
        print(f"{name:45s} {value:8.3f}s {value / bare:13.1f}x {value / heavy:20.2f}x")
    slow = [name for name in ("implicit-attention --help", "implicit-attention --version")
            if seconds[name] > TARGET_SECONDS]
    print(f"target --help and --version <= {TARGET_SECONDS} s: " + ("met" if not slow else f"NOT met: {slow}"))


if __name__ == "__main__":
    main()
