#!/usr/bin/env python
"""Train the small image classifiers (ViT, DeiT, and ViM when implicit_attention.models.vim exists)
on the Fashion-MNIST composites (implicit_attention.vision.composites).

Each model trains on a stream of fresh train composites (item i of the train split at step s is
s * batch + i: no image is seen twice), then is tested on the first --limit test composites.
It is written to OUT/<model>/ as float16 safetensors (at most 3 MB) with config.json and
train.json (settings, test accuracy with its 95% Wilson interval, loss history, time, hardware).
A run is resumable: OUT/<model>/state.pt (model, optimiser, step) is saved every --save-every
steps and picked up by the same command; a finished model (train.json) is skipped unless --force.

Examples::

    python scripts/train_vision.py --models vit --steps 20 --batch-size 16 --limit 64      # a CPU try
    python scripts/train_vision.py --device cuda --models vit,deit,vim --steps 8000        # the real run

Needs the Debian package dataset-fashion-mnist (or FASHION_MNIST_DIR).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

import torch  # noqa: E402

from implicit_attention.benchmark.stats import wilson_interval  # noqa: E402
from implicit_attention.vision.classifiers import KINDS, build_classifier, parameter_count, vim_available  # noqa: E402
from implicit_attention.vision.composites import MEAN, STD, FashionComposites, normalize  # noqa: E402

MAX_BYTES = 3_000_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit,deit,vim",
                        help="comma-separated kinds among vit, deit, vim (vim is skipped, with a message, when "
                             "implicit_attention.models.vim is not importable); default %(default)s")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "vision-models")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    parser.add_argument("--limit", type=int, default=10000, help="test composites to measure accuracy on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes (default: CPUs - 1, max 12)")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST *-ubyte.gz files")
    parser.add_argument("--force", action="store_true", help="retrain models that are already finished")
    parser.add_argument("--vim-scan", choices=("auto", "sequential", "mambapy"), default="auto",
                        help="how the ViM's scans run while training: token by token, mambapy's parallel scan, "
                             "or auto: the faster of the two on this device, timed on a few steps (same numbers; "
                             "the saved model runs token by token unless its config says otherwise)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast on CUDA (default: on)")
    return parser.parse_args(argv)


def hardware(device: torch.device) -> dict:
    info = {"device": str(device), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    import transformers
    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _ignore_interrupts(_worker: int) -> None:
    # the data workers keep running on Ctrl-C / timeout --signal=INT: the main process stops them after saving
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader(dataset, batch_size: int, workers: int, shuffle: bool = False):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       persistent_workers=False, drop_last=False,
                                       worker_init_fn=_ignore_interrupts if workers else None)


@torch.no_grad()
def test_accuracy(model, args, device, workers: int) -> dict:
    model.eval()
    data = FashionComposites("test", length=args.limit, seed=args.seed, root=args.data_dir)
    correct = 0
    for pixels, labels, _ in loader(data, args.batch_size, workers):
        logits = model(pixel_values=normalize(pixels).to(device)).logits
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    interval = wilson_interval(correct, len(data))
    return {"correct": correct, "n": len(data), **{k: interval.to_dict()[k] for k in ("mean", "low", "high")}}


def train_one(kind: str, args, device: torch.device, workers: int) -> dict | None:
    out = args.out / kind
    if (out / "train.json").is_file() and not args.force:
        print(f"{kind}: done already ({out / 'train.json'}); --force retrains")
        return json.loads((out / "train.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    model = build_classifier(kind, seed=args.seed).to(device)
    if kind == "vim":
        set_vim_scan(model, choose_vim_scan(model, args, device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    step, history, elapsed = 0, [], 0.0
    state_path = out / "state.pt"
    if state_path.is_file() and not args.force:
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["settings"] == settings_of(args):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, history, elapsed = state["step"], state["history"], state["elapsed"]
            print(f"{kind}: resuming at step {step}")
        else:
            print(f"{kind}: {state_path} has other settings; starting over")
    train = FashionComposites("train", length=args.steps * args.batch_size, seed=args.seed, root=args.data_dir)
    remaining = torch.utils.data.Subset(train, range(step * args.batch_size, len(train)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")
    start, running, seen = time.time(), 0.0, 0
    model.train()

    def save_state():
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "history": history,
                    "elapsed": elapsed + time.time() - start, "settings": settings_of(args)}, state_path)

    try:
        for pixels, labels, _ in loader(remaining, args.batch_size, workers):
            if step >= args.steps:
                break
            with autocast:
                logits = model(pixel_values=normalize(pixels).to(device, non_blocking=True)).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            running, seen = running + loss.item(), seen + 1
            if step % args.log_every == 0 or step == args.steps:
                history.append({"step": step, "loss": running / seen, "lr": scheduler.get_last_lr()[0]})
                print(f"{kind}: step {step}/{args.steps} loss {running / seen:.4f} "
                      f"({elapsed + time.time() - start:.0f} s)", flush=True)
                running, seen = 0.0, 0
            if step % args.save_every == 0 and step < args.steps:
                save_state()
    except KeyboardInterrupt:                      # Ctrl-C, or timeout --signal=INT: keep the work done
        save_state()
        print(f"{kind}: interrupted at step {step}; state saved to {state_path}: run again to resume", flush=True)
        raise SystemExit(130) from None
    train_seconds = elapsed + time.time() - start
    tested = time.time()
    accuracy = test_accuracy(model, args, device, workers)
    model = model.to("cpu", torch.float16).eval()
    if kind == "vim":  # the saved model runs as its config says (token by token by default)
        set_vim_scan(model, bool(getattr(model.config, "use_mambapy", False)))
    model.save_pretrained(out, safe_serialization=True)
    # how explain-image (and transformers' image processors) turn an image into this model's input
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 64, "width": 64},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [MEAN],
        "image_std": [STD]}, indent=2) + "\n")
    size = (out / "model.safetensors").stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{kind}: the float16 checkpoint is {size / 1e6:.2f} MB, above {MAX_BYTES / 1e6:.0f} MB")
    record = {"model": kind, "class": type(model).__name__, "parameters": parameter_count(model),
              "checkpoint_bytes": size, "settings": settings_of(args), "steps_done": step,
              "test_accuracy": accuracy, "history": history, "train_seconds": round(train_seconds, 1),
              "test_seconds": round(time.time() - tested, 1), "hardware": hardware(device),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    state_path.unlink(missing_ok=True)
    print(f"{kind}: test accuracy {100 * accuracy['mean']:.2f}% [{100 * accuracy['low']:.2f}, "
          f"{100 * accuracy['high']:.2f}] on {accuracy['n']} test composites; {size / 1e6:.2f} MB; "
          f"{train_seconds:.0f} s training")
    return record


def set_vim_scan(model, parallel: bool) -> None:
    """Run every ViM mixer's scans with mambapy's parallel scan (``parallel``) or token by token."""
    for module in model.modules():
        if hasattr(module, "use_mambapy"):
            module.use_mambapy = parallel


def choose_vim_scan(model, args, device: torch.device) -> bool:
    """Whether the ViM trains with mambapy's parallel scan: ``--vim-scan``, or for ``auto`` the faster of
    the two on a few forward and backward passes of a training-sized batch (the numbers are the same)."""
    from implicit_attention.models.vim.modeling_vim import _mambapy_scan

    if args.vim_scan != "auto":
        return args.vim_scan == "mambapy"
    if _mambapy_scan() is None:
        print("vim: mambapy is not installed; the scans run token by token")
        return False
    pixels = torch.randn(args.batch_size, 1, 64, 64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")
    seconds = {}
    for parallel in (False, True):
        set_vim_scan(model, parallel)
        for repeat in range(4):  # the first pass warms up
            if repeat == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                tick = time.perf_counter()
            with autocast:
                model(pixel_values=pixels).logits.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[parallel] = (time.perf_counter() - tick) / 3
    model.zero_grad(set_to_none=True)
    parallel = seconds[True] < seconds[False]
    print(f"vim: one training step's forward and backward takes {seconds[False]:.3f} s token by token, "
          f"{seconds[True]:.3f} s with mambapy: training with {'mambapy' if parallel else 'the token loop'}",
          flush=True)
    return parallel


def settings_of(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "warmup": args.warmup, "limit": args.limit, "seed": args.seed, "amp": args.amp}


def main(argv=None) -> int:
    args = parse_args(argv)
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {', '.join(KINDS)}")
    if "vim" in kinds and not vim_available():
        print("vim: skipped (implicit_attention.models.vim is not importable in this checkout)")
        kinds.remove("vim")
    device = torch.device(args.device)
    workers = args.workers if args.workers is not None else min(12, max(0, (os.cpu_count() or 1) - 1))
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    torch.manual_seed(args.seed)
    for kind in kinds:
        train_one(kind, args, device, workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
