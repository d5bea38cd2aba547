"""Write the first test composites as PNGs with their masks: data/fashion-composites/test.

    python scripts/make_fashion_composites.py            # 300 items of the test split, seed 0
    python scripts/make_fashion_composites.py --count 1000 --out /tmp/composites

Needs the Debian package dataset-fashion-mnist (or FASHION_MNIST_DIR). Rerunning it writes the
same bytes: item i is a function of (seed, split, i) alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from implicit_attention.vision.composites import FashionComposites, save_composites  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "data" / "fashion-composites" / "test"))
    args = parser.parse_args()
    out = save_composites(FashionComposites(args.split, seed=args.seed), args.out, args.count)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"wrote {args.count} composites and masks to {os.path.relpath(out)} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
