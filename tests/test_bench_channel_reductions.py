"""benchmarks/bench_channel_reductions.py, which prints the README's per-layer figures of the fast reductions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_channel_reductions.py"


def test_the_script_times_both_paths_and_they_agree():
    done = subprocess.run([sys.executable, str(SCRIPT), "--models", "bundled,Mamba2", "--lengths", "20",
                           "--width", "64", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| bundled")
            or line.startswith("| Mamba2")]
    assert [(r[0].strip(), r[3].strip()) for r in rows] == [("bundled", "abs(A)"), ("bundled", "attribution"),
                                                            ("Mamba2", "abs(A)"), ("Mamba2", "attribution")]
    assert all(float(r[7]) < 1e-5 for r in rows)          # float32: the fast paths equal the channel blocks
