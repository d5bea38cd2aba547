"""Check: a model split over two GPUs (``device_map``) explains exactly as the same model on one GPU.

On a machine with at least two CUDA GPUs this script

1. builds small random models -- a Mamba (4 layers) and a Jamba hybrid (Mamba and attention
   layers), and optionally a Zamba2 (``--zamba2``: shared attention blocks reused by several
   layers) -- saves each, and loads it twice: on ``cuda:0`` alone, and with
   ``from_pretrained(device_map=...)`` putting the embeddings and the first half of the layers on
   ``cuda:0`` and the rest on ``cuda:1`` (``accelerate`` dispatch, as ``device_map="auto"`` does for
   a large model);
2. runs ``explain()`` with ``raw``, ``rollout`` (``abs`` and the fast ``mean`` aggregates),
   ``attribution`` and ``paper`` and ``decompose()`` on a left-padded batch, and checks that the split model's relevance and every layer's signed-mean
   map equal the single-GPU ones (relative difference <= ``--tolerance``, default 1e-5), that each
   layer was decomposed on the GPU that holds it, and that the relevance comes back on the inputs'
   device;
3. runs ``implicit-attention explain-dataset`` on a few sentences with the bundled model, once with
   ``--device-map MAP.json`` (its two layers on the two GPUs) and once with ``--device cuda:0``, for
   ``rollout`` and ``attribution``, and compares the results files.

It prints a JSON summary (one line per check: the largest relative difference and whether it
passed) and exits with status 1 if a required check failed. Without two GPUs it says so and runs
the same checks on the CPU, with ``accelerate``'s hooks forced onto every block of a one-device
map (the code path of a split model, minus the copies between devices).

Usage (from the repository root, no network needed)::

    PYTHONPATH=src python benchmarks/multi_gpu_check.py            # add --zamba2 for the optional hybrid

Needs torch, transformers >= 5 and accelerate. Takes well under two minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    import implicit_attention  # noqa: F401
except ImportError:  # a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from torch import nn  # noqa: E402

import implicit_attention as ia  # noqa: E402
from implicit_attention import cli  # noqa: E402
from implicit_attention.bundled import bundled_model_path  # noqa: E402
from implicit_attention.devices import execution_device  # noqa: E402
from implicit_attention.hooks import select_layers  # noqa: E402

tf.logging.set_verbosity_error()
#: (method, channel aggregation): rollout with "mean" takes the fast (on CUDA: fused) aggregates
METHODS = (("raw", "abs"), ("rollout", "abs"), ("rollout", "mean"), ("attribution", "abs"), ("paper", "abs"))
VOCAB = 100
SENTENCES = ["an utterly charming and moving film", "a dull, lifeless mess", "great acting and a witty script",
             "the plot is boring and the jokes fall flat", "it is not a good movie"]


# ----------------------------------------------------------------------------------- models
def random_model(name: str) -> nn.Module:
    """A small random model of family ``name``, float32, with non-trivial decays, gates and biases."""
    torch.manual_seed(0)
    if name == "mamba":
        model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=16,
                                                   num_hidden_layers=4, expand=2, conv_kernel=4, time_step_rank=8,
                                                   use_conv_bias=True))
    elif name == "jamba":
        model = tf.JambaForCausalLM(tf.JambaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=8,
            mamba_dt_rank=4, mamba_d_conv=4, mamba_proj_bias=True, mamba_conv_bias=True))
    elif name == "zamba2":
        model = tf.Zamba2ForCausalLM(tf.Zamba2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba",
                                                                                      "hybrid"],
            mamba_d_state=8, n_mamba_heads=4, mamba_ngroups=1, mamba_headdim=16, chunk_size=8,
            num_attention_heads=2, intermediate_size=64, use_mem_rope=True))
    else:
        raise ValueError(name)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("A_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            elif param_name.endswith(("bias", ".D")):
                param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


def split_map(model: nn.Module, first, second) -> dict[str, object]:
    """``device_map``: the layer list's first half and everything before it on ``first``, the rest on
    ``second``; the output head stays with the embeddings when their weights are tied."""
    layers_name, layers = max(((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)),
                              key=lambda item: len(item[1]))
    parent_name = layers_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    placement, seen_layers = {}, False
    for child, _ in parent.named_children():
        full = f"{parent_name}.{child}" if parent_name else child
        if full == layers_name:
            seen_layers = True
            for i in range(len(layers)):
                placement[f"{layers_name}.{i}"] = first if i < len(layers) // 2 else second
        else:
            placement[full] = second if seen_layers else first
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for child, _ in model.named_children():
        if child != parent_name.split(".")[0]:
            placement[child] = first if tied else second
    return placement


def load_both(model: nn.Module, directory: Path, single, first, second, gpus: bool):
    """``(reference on single, split over first/second, the device map)`` from a saved copy of ``model``."""
    model.save_pretrained(directory)
    cls = type(model)
    options = {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}
    reference = cls.from_pretrained(directory, **options).to(single).eval()
    placement = split_map(model, first, second)
    if gpus:
        split = cls.from_pretrained(directory, device_map=placement, **options).eval()
    else:  # one device: force accelerate's hooks onto every block, as on a real split
        import accelerate
        split = accelerate.dispatch_model(cls.from_pretrained(directory, **options).eval(),
                                          device_map=placement, main_device="cpu", force_hooks=True)
    return reference, split, placement


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------------- checks
def check_model(name: str, workdir: Path, single, first, second, gpus: bool, tolerance: float) -> list[dict]:
    """explain() with every matrix method and decompose() on the split model against the reference."""
    reference, split, placement = load_both(random_model(name), workdir / name, single, first, second, gpus)
    devices = sorted({str(execution_device(m)) for _, m, _ in select_layers(split, None)})
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    checks = []
    for method, aggregate in METHODS:
        expected = ia.explain(reference, ids, mask, method=method, aggregate=aggregate)
        actual = ia.explain(split, ids, mask, method=method, aggregate=aggregate)
        diff = relative(actual, expected)
        on_inputs = actual.device == execution_device(split.get_input_embeddings())
        label = f"{method}/{aggregate}" if method in ("raw", "rollout") else method
        checks.append({"check": f"{name} explain {label}", "max_rel_diff": diff, "layer_devices": devices,
                       "ok": diff <= tolerance and on_inputs and bool(torch.isfinite(actual).all())})
    expected = ia.decompose(reference, ids, mask)
    actual = ia.decompose(split, ids, mask)
    maps = actual.aggregate("mean")      # every layer's map, gathered on the inputs' device
    reference_maps = expected.aggregate("mean")
    diffs = [relative(a, e) for a, e in zip(maps, reference_maps)]
    where = [str(layer.device) for layer in actual.layers]
    wanted = [str(execution_device(split.get_submodule(layer.name.split("#")[0]))) for layer in actual.layers]
    checks.append({"check": f"{name} decompose (every layer's mean map)", "max_rel_diff": max(diffs),
                   "layers_decomposed_on": where, "max_error": max(actual.errors),
                   "ok": max(diffs) <= tolerance and where == wanted and len(set(where)) == (2 if gpus else 1)})
    checks[0]["device_map"] = {k: str(v) for k, v in placement.items()}
    return checks


def check_dataset(workdir: Path, single, first, second, gpus: bool, tolerance: float) -> list[dict]:
    """explain-dataset with --device-map MAP.json against --device single, rollout and attribution."""
    data = workdir / "sentences.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    placement = {"backbone.embeddings": first, "backbone.layers.0": first, "backbone.layers.1": second,
                 "backbone.norm_f": second, "lm_head": first}
    (workdir / "map.json").write_text(json.dumps(placement))
    checks = []
    for method in ("rollout", "attribution"):
        outs = {}
        for label, extra in (("single", ["--device", str(single)]), ("split", ["--device-map", str(workdir / "map.json")])):
            out = workdir / f"dataset-{method}-{label}"
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON summary only
                code = cli.main(["explain-dataset", str(data), "--out", str(out), "--method", method,
                                 "--batch-size", "2", "--no-progress", "--force", *extra])
            if code != 0:
                raise RuntimeError(f"explain-dataset ({label}, {method}) exited with {code}")
            rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
            outs[label] = (rows, json.loads((out / "summary.json").read_text()))
        diffs = [relative(torch.tensor(a["relevance"]), torch.tensor(b["relevance"]))
                 for a, b in zip(outs["split"][0], outs["single"][0])]
        same = [a["prediction"] for a in outs["split"][0]] == [b["prediction"] for b in outs["single"][0]]
        layer_devices = outs["split"][1].get("layer_devices")
        checks.append({"check": f"explain-dataset {method} (--device-map vs --device)", "max_rel_diff": max(diffs),
                       "texts": len(diffs), "layer_devices": layer_devices,
                       "ok": same and len(diffs) == len(SENTENCES) and max(diffs) <= tolerance
                       and len(layer_devices) == (2 if gpus else 1)})
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative difference allowed")
    parser.add_argument("--zamba2", action="store_true", help="also check a Zamba2 (optional: not counted in the status)")
    parser.add_argument("--keep", metavar="DIR", default=None, help="work in DIR (kept) instead of a temporary directory")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    if gpus:
        single, first, second = torch.device("cuda", 0), 0, 1
        mode = f"multi-gpu: layers split over cuda:0 and cuda:1 ({torch.cuda.get_device_name(0)})"
    else:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"multi-GPU part skipped: {count} CUDA device(s) visible, two are needed. Running the same checks on "
              "the CPU with accelerate's hooks on every block of a one-device map.", file=sys.stderr)
        single, first, second = torch.device("cpu"), "cpu", "cpu"
        mode = "cpu (multi-GPU part skipped)"
        torch.set_num_threads(1)  # steadier on a shared machine
    import accelerate
    summary = {"mode": mode, "torch": torch.__version__, "transformers": tf.__version__,
               "accelerate": accelerate.__version__, "python": platform.python_version(),
               "tolerance": args.tolerance, "checks": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        jobs = [("mamba", True), ("jamba", True)] + ([("zamba2", False)] if args.zamba2 else [])
        for name, required in jobs:
            begun = time.perf_counter()
            try:
                checks = check_model(name, workdir, single, first, second, gpus, args.tolerance)
            except Exception as exc:  # noqa: BLE001 - reported in the summary
                traceback.print_exc()
                checks = [{"check": f"{name}", "ok": False, "error": f"{type(exc).__name__}: {exc}"}]
            for check in checks:
                check["required"] = required
            checks[0]["seconds"] = round(time.perf_counter() - begun, 1)
            summary["checks"] += checks
        if (bundled_model_path() / "model.safetensors").is_file():
            begun = time.perf_counter()
            try:
                checks = check_dataset(workdir, single, first, second, gpus, args.tolerance)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                checks = [{"check": "explain-dataset", "ok": False, "error": f"{type(exc).__name__}: {exc}"}]
            checks[0]["seconds"] = round(time.perf_counter() - begun, 1)
            summary["checks"] += [dict(c, required=True) for c in checks]
        else:
            summary["checks"].append({"check": "explain-dataset", "ok": None, "required": False,
                                      "skipped": "bundled model not present"})
    summary["ok"] = all(c["ok"] for c in summary["checks"] if c.get("required"))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
