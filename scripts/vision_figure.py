#!/usr/bin/env python
"""Draw the README's example overlays: a few saved test composites, their true masks, and the
explanation maps of the bundled Vision Mamba (unified and S6-only attribution) and DeiT (attribution),
and of a ViT trained by scripts/train_vision.py when one is given.

Every map is the positive part of the patch relevance of the predicted class, upsampled to the pixels
and min-max normalised (as explain-image draws it). Writes one PNG.

Examples::

    python scripts/vision_figure.py                                   # docs/benchmark/vision_overlays.png
    python scripts/vision_figure.py --vit out/vision-models/vit --images 0,1,2,3
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from implicit_attention.bundled import bundled_image_model_path  # noqa: E402
from implicit_attention.vision.classifiers import load_classifier  # noqa: E402
from implicit_attention.vision.images import Preprocessing, explain_image, label_of  # noqa: E402


def columns(vit: Path | None) -> list[tuple[str, Path, dict]]:
    """``(title, model directory, explain options)`` of each map column."""
    vim, deit = bundled_image_model_path("fashion-vim"), bundled_image_model_path("fashion-deit")
    picked = [("ViM, unified attribution", vim, {"method": "attribution"}),
              ("ViM, S6-only attribution", vim, {"method": "attribution", "variant": "s6"}),
              ("DeiT, attribution", deit, {"method": "attribution"})]
    if vit is not None:
        picked.append(("ViT, attribution", vit, {"method": "attribution"}))
    return picked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=REPO_ROOT / "data" / "fashion-composites" / "test",
                        help="saved composites (index.csv with file, mask, label)")
    parser.add_argument("--images", default="0,1,2,3,4", help="row numbers of index.csv to draw")
    parser.add_argument("--vit", type=Path, default=None, help="a trained ViT's directory (an extra column)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmark" / "vision_overlays.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from PIL import Image

    with open(args.folder / "index.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    picked = [rows[int(i)] for i in args.images.split(",")]
    maps = columns(args.vit)
    models = {path: load_classifier(path) for _, path, _ in maps}
    figure, axes = plt.subplots(len(picked), 2 + len(maps), figsize=(1.6 * (2 + len(maps)), 2.05 * len(picked)),
                                squeeze=False)
    torch.manual_seed(0)
    for r, row in enumerate(picked):
        image = np.asarray(Image.open(args.folder / row["file"]).convert("L"))
        mask = np.asarray(Image.open(args.folder / row["mask"]).convert("L")) > 0
        label = label_of(models[maps[0][1]], int(row["label"]))
        axes[r, 0].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[r, 0].set_title(f"{row['file']}\n{label}", fontsize=7)
        axes[r, 1].imshow(mask, cmap="gray")
        axes[r, 1].set_title("true mask", fontsize=7)
        for c, (title, path, options) in enumerate(maps, start=2):
            model = models[path]
            item = explain_image(model, args.folder / row["file"], Preprocessing.for_model(model, path), **options)
            predicted = next(iter(item.probabilities))
            heat = item.heat.numpy()
            blended = 0.55 * np.repeat(image[..., None] / 255, 3, axis=-1) + 0.45 * colormaps["jet"](heat)[..., :3]
            axes[r, c].imshow(np.clip(blended, 0, 1))
            mark = "" if predicted == label else " (wrong)"
            axes[r, c].set_title(f"{title}\n{predicted}{mark}", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    figure.tight_layout(pad=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80)
    # a 256-colour palette: a quarter of the size, no visible change at this resolution
    Image.open(args.out).convert("RGB").quantize(colors=256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
