#!/usr/bin/env python
"""Weakly supervised segmentation of the Fashion-MNIST composites from explanation maps: one row per source.

For every pseudo-mask source (``--sources``), the training composites' image-level labels are
explained by a classifier, each map is thresholded at its mean and cleaned (a 3 x 3 opening, the
largest connected component: ``implicit_attention.vision.segmentation``), and a small segmentation
network (about 32 k parameters) is trained on these pseudo-masks alone; it is then scored against
the true masks of the test composites. The table gives, per source, the pseudo-masks' mIoU against
the true training masks and the network's test mIoU, each with a bootstrap 95% interval over images.

A source is ``MODEL:METHOD`` or ``MODEL:METHOD:VARIANT`` (``vim:attribution:s6`` is the S6-only
predecessor), with MODEL ``vim`` (the bundled ViM), ``deit`` (the bundled DeiT) or ``vit`` (trained
by ``scripts/train_vision.py`` into ``--models-dir/vit``; not shipped); or ``truth`` (the true masks:
the upper bound) or ``random`` (a random map per image, smoothed like a patch map: the control).

Each source's maps are cached chunk by chunk under ``OUT/maps/`` and its row in
``OUT/sources/<source>.json``: rerun the same command after an interruption and only what is missing
is computed (``--force`` starts over). ``OUT/results.json`` and ``OUT/table.md`` are written at the end.

Examples::

    python benchmarks/wsss.py                                   # the default sources, CPU (~35 minutes)
    python benchmarks/wsss.py --device cuda --train-images 4000 --test-images 2000 --steps 1500
    python benchmarks/wsss.py --data saved --train-images 150 --test-images 150 --sources deit:rollout,truth
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

import torch  # noqa: E402

DEFAULT_SOURCES = ("vim:attribution,vim:attribution:s6,vim:paper,vim:grad_x_input,deit:attribution,deit:rollout,"
                   "deit:grad_x_input,random,truth")
SAVED = REPO_ROOT / "data" / "fashion-composites" / "test"
#: Settings that must match to resume a run.
RESUME_KEYS = ("data", "train_images", "test_images", "steps", "batch_size", "lr", "width", "seed", "clean")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default=DEFAULT_SOURCES, help="comma-separated sources (default: %(default)s)")
    parser.add_argument("--data", choices=("generated", "saved"), default="generated",
                        help="generated: training composites from Fashion-MNIST's train split and test composites "
                             "from its test split (Debian dataset-fashion-mnist); saved: the 300 test composites "
                             "of data/fashion-composites/test, the first --train-images for training and the next "
                             "--test-images for testing (no Fashion-MNIST needed) (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=512, help="training composites (default: %(default)s)")
    parser.add_argument("--test-images", type=int, default=1000, help="test composites (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=600, help="segmenter training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="segmenter batch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="segmenter learning rate (default: %(default)s)")
    parser.add_argument("--width", type=int, default=16, help="segmenter width (default: %(default)s)")
    parser.add_argument("--explain-batch", type=int, default=64, help="images per explanation batch")
    parser.add_argument("--no-clean", dest="clean", action="store_false",
                        help="pseudo-masks without the opening and the largest component")
    parser.add_argument("--seed", type=int, default=0, help="segmenter and random-map seed (default: %(default)s)")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "out" / "vision-models",
                        help="where scripts/train_vision.py put the models not shipped (vit) (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "wsss", help="results (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="delete an earlier run's files in --out first")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    for source in args.sources:
        model, _, method = source.partition(":")
        if source in ("truth", "random"):
            continue
        if model not in ("vim", "deit", "vit") or not method:
            parser.error(f"--sources: {source!r} is not MODEL:METHOD[:VARIANT] with MODEL vim, deit or vit, "
                         "nor truth or random")
    for name in ("train_images", "test_images", "steps", "batch_size", "explain_batch", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.data == "saved" and args.train_images + args.test_images > 300:
        parser.error("--data saved holds 300 composites: --train-images + --test-images must be at most 300")
    return args


def load_data(args) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(train images [N, 1, H, W] in [0, 1], labels [N], masks [N, H, W]), (test images, test masks)``."""
    from implicit_attention.vision.composites import CompositeFolder, FashionComposites, FashionMNISTMissing

    def stack(dataset, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [dataset[i] for i in indices]
        return (torch.stack([p for p, _, _ in items]), torch.tensor([label for _, label, _ in items]),
                torch.stack([m for _, _, m in items]))

    if args.data == "saved":
        folder = CompositeFolder(SAVED)
        train = stack(folder, range(args.train_images))
        test = stack(folder, range(args.train_images, args.train_images + args.test_images))
    else:
        try:
            train = stack(FashionComposites("train", args.train_images), range(args.train_images))
            test = stack(FashionComposites("test", args.test_images), range(args.test_images))
        except FashionMNISTMissing as error:
            sys.exit(f"error: {error} (or run with --data saved)")
    return train, (test[0], test[2])


def load_model(name: str, args):
    from implicit_attention.bundled import bundled_image_model_path
    from implicit_attention.vision.classifiers import load_classifier

    path = {"vim": bundled_image_model_path("fashion-vim"), "deit": bundled_image_model_path("fashion-deit"),
            "vit": args.models_dir / "vit"}[name]
    if not (Path(path) / "config.json").is_file():
        sys.exit(f"error: no {name} model in {path} (python scripts/train_vision.py --models {name} trains it)")
    return load_classifier(path, device=args.device)


def random_maps(count: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """``[count, H, W]`` control maps: uniform noise on an 8 x 8 grid, upsampled like a patch map."""
    from implicit_attention.vision.evaluation import upsample

    generator = torch.Generator().manual_seed(seed)
    return torch.stack([upsample(torch.rand(64, generator=generator), (8, 8), size) for _ in range(count)]).float()


def source_maps(source: str, args, train, models: dict) -> torch.Tensor:
    """``[N, H, W]`` heatmaps of the training images for ``source`` (cached chunk by chunk)."""
    from tqdm.auto import tqdm

    from implicit_attention.vision.composites import normalize
    from implicit_attention.vision.segmentation import explanation_heatmaps

    images, labels, _ = train
    if source == "random":
        return random_maps(len(images), tuple(images.shape[-2:]), args.seed)
    model_name, _, spec = source.partition(":")
    method, _, variant = spec.partition(":")
    if model_name not in models:
        models[model_name] = load_model(model_name, args)
    model = models[model_name]
    cache = args.out / "maps" / source.replace(":", "-")
    cache.mkdir(parents=True, exist_ok=True)
    chunks = []
    starts = range(0, len(images), args.explain_batch)
    for start in tqdm(starts, desc=f"explaining ({source})", unit="batch", disable=not args.progress, leave=False):
        file = cache / f"{start:06d}.pt"
        if file.is_file():
            chunks.append(torch.load(file))
            continue
        stop = min(start + args.explain_batch, len(images))
        pixels = normalize(images[start:stop]).to(args.device)
        maps = explanation_heatmaps(model, pixels, labels[start:stop].tolist(), method=method,
                                    **({"variant": variant} if variant else {}))
        torch.save(maps, file.with_suffix(".tmp"))
        file.with_suffix(".tmp").replace(file)
        chunks.append(maps)
    return torch.cat(chunks)


def check_run(args) -> None:
    """Refuse to mix runs of other settings in ``--out`` (``--force`` starts over)."""
    settings = {key: getattr(args, key) for key in RESUME_KEYS}
    run_file = args.out / "run.json"
    if args.force and args.out.exists():
        shutil.rmtree(args.out)
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        changed = [f"--{k.replace('_', '-')}: {before.get(k)!r} there, {v!r} now" for k, v in settings.items()
                   if before.get(k) != v]
        if changed:
            sys.exit(f"error: {args.out} holds a run with other settings ({'; '.join(changed)}); "
                     "pass --force to start over or choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def table(rows: list[dict]) -> str:
    def cell(interval: dict) -> str:
        return f"{100 * interval['mean']:.1f} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"

    lines = ["| pseudo-mask source | pseudo-mask mIoU (training images) | segmenter mIoU (test images) |",
             "|---|---|---|"]
    lines += [f"| {row['source']} | {cell(row['pseudo_miou'])} | {cell(row['segmenter_miou'])} |" for row in rows]
    first = rows[0]
    return ("\n".join(lines) + f"\n\nmIoU x100 (background and foreground IoU pooled over images, averaged), "
            f"bootstrap 95% intervals over images; {first['train_images']} training and {first['test_images']} "
            "test composites.\n")


def main(argv=None) -> int:
    from implicit_attention.vision.segmentation import SegmenterTraining, evaluate_source, pseudo_masks

    args = parse_args(argv)
    check_run(args)
    train, test = load_data(args)
    settings = SegmenterTraining(steps=args.steps, batch_size=args.batch_size, lr=args.lr, width=args.width,
                                 seed=args.seed)
    models: dict = {}
    rows = []
    for source in args.sources:
        row_file = args.out / "sources" / f"{source.replace(':', '-')}.json"
        if row_file.is_file():
            rows.append(json.loads(row_file.read_text()))
            print(f"{source}: done before", flush=True)
            continue

        def masks_of(images, labels, truth, source=source):
            if source == "truth":
                return truth
            return pseudo_masks(source_maps(source, args, train, models), clean=args.clean)

        began = time.perf_counter()
        result, _ = evaluate_source(source, masks_of, train, test, settings, device=args.device,
                                    progress=args.progress)
        row = result.to_dict()
        row_file.parent.mkdir(parents=True, exist_ok=True)
        row_file.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
        print(f"{source}: pseudo-mask mIoU {100 * row['pseudo_miou']['mean']:.1f}, segmenter test mIoU "
              f"{100 * row['segmenter_miou']['mean']:.1f} ({time.perf_counter() - began:.0f} s)", flush=True)
    (args.out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "sources": rows}, indent=2) + "\n")
    text = table(rows)
    (args.out / "table.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
