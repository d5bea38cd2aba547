"""Running one worker process per model, a few at a time, each logging to its own file."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["run_workers"]


def run_workers(names: Sequence[str], command: Callable[[str], list[str]], log: Callable[[str], Path], *,
                jobs: int, gpus: int = 0, poll_seconds: float = 2.0) -> list[str]:
    """Run ``command(name)`` for every name, at most ``jobs`` at once, output appended to ``log(name)``;
    with several GPUs each worker sees one (``CUDA_VISIBLE_DEVICES``, round robin); unless set, each gets
    ``OMP_NUM_THREADS`` = its share of the CPUs. Prints a line as
    each worker ends and returns the names whose worker failed."""
    pending, running, failed = list(names), [], []
    start, started = time.perf_counter(), 0
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            env = dict(os.environ)
            # the CPU shared out: without it each worker's torch takes every core (30 workers on 16 cores)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(started % gpus)
            started += 1
            log(name).parent.mkdir(parents=True, exist_ok=True)
            handle = open(log(name), "a")
            running.append((name, subprocess.Popen(command(name), env=env, stdout=handle,
                                                   stderr=subprocess.STDOUT), handle))
        time.sleep(poll_seconds)
        for item in list(running):
            name, process, handle = item
            if process.poll() is None:
                continue
            running.remove(item)
            handle.close()
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"[{time.perf_counter() - start:5.0f}s] {name}: {status}; log {log(name)}", flush=True)
            if process.returncode:
                failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return failed
