#!/usr/bin/env python
"""Build the plain-English pre-training corpus ``out/corpus/english.jsonl.gz``.

Run this once before training the model zoo. It reads three locally installed sources (see
:mod:`implicit_attention.corpora`) and writes every passage as one gzip-compressed JSON line
``{"source": ..., "text": ...}``:

* ``fortunes``: ``sudo apt-get install fortunes fortunes-min``
* ``jane_austen``: ``sudo apt-get install r-cran-janeaustenr``
* ``wikipedia``: gensim's Wikipedia test sample, read from the gensim wheel. Without
  ``--gensim-wheel`` the wheel is fetched with ``python -m pip download --no-deps
  gensim==4.4.0`` (the current interpreter's pip; always the CPython 3.11 manylinux x86-64
  wheel, whose data file is all that is read) into a temporary directory, which is deleted
  afterwards; gensim is never installed.

The output is byte-identical when rebuilt from the same package versions. Usage::

    python scripts/build_corpus.py                       # all sources -> out/corpus/english.jsonl.gz
    python scripts/build_corpus.py --gensim-wheel DIR    # a wheel (or its directory) already downloaded
    python scripts/build_corpus.py --sources fortunes jane_austen --out /tmp/small.jsonl.gz
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from implicit_attention.corpora import ENGLISH_SOURCES, GENSIM_VERSION, build_english_corpus, find_gensim_wheel

DEFAULT_OUT = Path("out/corpus/english.jsonl.gz")
#: Always the same wheel (CPython 3.11, manylinux x86-64), whatever machine runs this: only its data
#: file is read, so it need not match the local interpreter, and the corpus is the same everywhere.
WHEEL_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                  "--abi", "cp311")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the plain-English pre-training corpus (gzip-compressed JSON lines).",
        epilog="Sources: " + "; ".join(f"{s.name}: {s.install}" for s in ENGLISH_SOURCES.values()),
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default: {DEFAULT_OUT})")
    parser.add_argument("--sources", nargs="+", choices=list(ENGLISH_SOURCES), default=list(ENGLISH_SOURCES),
                        help="sources to include, in this order (default: all)")
    parser.add_argument("--gensim-wheel", type=Path, default=None,
                        help=f"a gensim wheel or a directory holding one (default: download gensim=={GENSIM_VERSION} "
                             "with pip into a temporary directory)")
    return parser.parse_args(argv)


def download_gensim_wheel(directory: Path) -> Path:
    """Download the gensim wheel (no dependencies) into ``directory`` with this interpreter's pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *WHEEL_PLATFORM,
               f"gensim=={GENSIM_VERSION}", "-d", str(directory)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    wheel = find_gensim_wheel(directory)
    if wheel is None:
        raise FileNotFoundError(f"pip download did not leave a gensim wheel in {directory}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gensim-wheel-") as scratch:
        wheel = args.gensim_wheel
        if "wikipedia" in args.sources and wheel is None:
            wheel = download_gensim_wheel(Path(scratch))
        try:
            counts = build_english_corpus(args.out, sources=args.sources, wheel_dir=wheel)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(f"wrote {counts['path']} ({Path(counts['path']).stat().st_size / 1e6:.1f} MB)")
    print(f"{'source':<12} {'passages':>9} {'words':>10}")
    for name, source_counts in counts["sources"].items():
        print(f"{name:<12} {source_counts['passages']:>9,} {source_counts['words']:>10,}")
    print(f"{'total':<12} {counts['passages']:>9,} {counts['words']:>10,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
