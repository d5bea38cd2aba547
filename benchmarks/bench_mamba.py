"""Benchmark: fast Mamba implicit-attention maps against the references, measured in the same run.

Model: a randomly initialised Mamba shaped like Mamba-130M (24 layers, width 768, inner 1536,
state 16, conv 4). For each length L it times, per run:

- ``maps``: the signed channel-mean map of every layer with the factorised fast path, from the
  layers' inputs (factor recomputation included, the model's own forward not included); on CUDA
  with Triton this is the fused kernels of ``mamba/triton.py``;
- ``eager``: the same maps with the eager PyTorch hierarchy of ``mamba/fast.py`` (CUDA only, where
  the fused kernels are the default; ``--eager-max-length``);
- ``direct``: the same maps from materialised per-channel blocks computed entry by entry (``N``
  exponentials per entry, ``operator.s6_matrices_direct``; no ``[C, L, L, N]`` tensor), timed on
  ``--reference-layers`` layers and scaled to all layers;
- ``materialised``: the published approach, vectorised over channels: an ``[c, L, L, N]`` tensor of
  discretised state products per channel block, summed over the state, timed likewise;
- ``naive``: the slow reference of the tests (Python loops from the equations,
  ``architectures/mamba/naive.py``), timed on ``--naive-channels`` channels of one layer and
  scaled to all channels and layers (``--naive-max-length``);
- ``rows``: one target row per layer (what ``raw`` and ``paper`` explanations need);
- ``fwd+bwd`` and ``attribution``: one forward and backward pass of the model for a token logit,
  and a full attribution explanation (for L up to ``--explain-max-length``: the stock
  ``transformers`` Mamba forward without its CUDA kernels loops over tokens in Python).

Ratios are printed against the references, so the numbers compare within one run on one machine.
Usage: ``python benchmarks/bench_mamba.py --device cuda --lengths 256,512,1024,2048,4096,8192,16384``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import replace

import torch

import implicit_attention as ia
from implicit_attention.architectures.mamba import MambaLayerDecomposition, mamba_factors, operator
from implicit_attention.architectures.mamba import triton as triton_mean
from implicit_attention.architectures.mamba.fast import exact_channel_mean, signed_mean
from implicit_attention.architectures.mamba.naive import naive_mamba


@contextlib.contextmanager
def entry_by_entry_blocks():
    """Compute per-channel blocks the direct way (the reference) while inside the context."""
    tiled = operator.s6_matrices
    operator.s6_matrices = lambda dt, B, C, A: operator.s6_matrices_direct(dt, B, C, A)
    try:
        yield
    finally:
        operator.s6_matrices = tiled


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs (after one warm-up when repeating) and the last result."""
    if repeat > 1:
        fn()
    best, result = math.inf, None
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_memory(device: torch.device, fn) -> tuple[float, int | None]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds, _ = timed(fn, device)
        return seconds, torch.cuda.max_memory_allocated(device) - base
    seconds, _ = timed(fn, device)
    return seconds, None


def materialised_mean(f, channel_chunk: int) -> torch.Tensor:
    """The published approach, vectorised: ``[c, L, L, N]`` per channel block, then the gates and conv."""
    batch, length, channels = f.x.shape
    out = torch.zeros(batch, length, length, dtype=f.x.dtype, device=f.x.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=f.x.device).tril()
    for c0 in range(0, channels, channel_chunk):
        ch = slice(c0, min(c0 + channel_chunk, channels))
        cums = f.dt[..., ch].cumsum(dim=1).transpose(1, 2)                          # [B, c, L]
        gap = (cums[..., :, None] - cums[..., None, :]).masked_fill(~causal, 0)     # [B, c, L, L]
        decay = torch.exp(gap[..., None] * f.A[ch][None, :, None, None, :])          # [B, c, L, L, N]
        hidden = decay * f.B[:, None, None, :, :] * f.dt[..., ch].transpose(1, 2)[:, :, None, :, None]
        S = (hidden * f.C[:, None, :, None, :]).sum(-1).masked_fill(~causal, 0)      # [B, c, L, L]
        S.diagonal(dim1=-2, dim2=-1).add_(f.D[ch][None, :, None])
        S = S * f.act_gate[..., ch].transpose(1, 2)[:, :, None, :]
        width = f.conv_weight.shape[1]
        A = S * f.conv_weight[ch, width - 1][None, :, None, None]
        for shift in range(1, width):
            A[..., :, : length - shift] += S[..., :, shift:] * f.conv_weight[ch, width - 1 - shift][None, :, None, None]
        out += (A * f.out_gate[..., ch].transpose(1, 2)[..., None]).sum(1)
    return out / channels


def build_model(args, device, dtype):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inner,
                         state_size=args.state, num_hidden_layers=args.layers, conv_kernel=4)
    return MambaForCausalLM(config).to(device=device, dtype=dtype).eval()


def layer_inputs(model, length: int, device, dtype, seed: int = 0) -> torch.Tensor:
    """Random normalised hidden states ``[1, L, H]``: the layers' inputs for the map timings."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(1, length, model.config.hidden_size, generator=generator)
    return h.to(device=device, dtype=dtype)


def bench_length(model, length: int, args, device, dtype) -> dict:
    mixers = [block.mixer for block in model.backbone.layers]
    hidden = layer_inputs(model, length, device, dtype)
    channels = model.config.intermediate_size
    zeros = torch.zeros(1, length, channels, device=device, dtype=dtype)
    row = {"L": length}

    def layer_of(mixer, index):
        f = mamba_factors(mixer, hidden, None, dtype)
        return MambaLayerDecomposition(f, variant="unified", index=index, name=f"layer{index}", output=zeros)

    def all_maps():
        return [layer_of(m, i).aggregate("mean") for i, m in enumerate(mixers)]

    def all_rows():
        return [layer_of(m, i).aggregate_rows([length - 1], "mean") for i, m in enumerate(mixers)]

    with torch.no_grad():
        row["maps_s"], row["maps_peak_bytes"] = peak_memory(device, all_maps)
        row["maps_s"], maps = timed(all_maps, device, repeat=args.repeat)
        row["rows_s"], _ = timed(all_rows, device, repeat=args.repeat)
        row["fused"] = triton_mean.available(hidden) and device.type == "cuda"
        if row["fused"] and length <= args.eager_max_length:
            row["eager_s"], eager = timed(lambda: [signed_mean(layer_of(m, i).factors, "unified", fused=False)
                                                   for i, m in enumerate(mixers)], device)
            row["fused_vs_eager_rel_error"] = max(float((e - m).norm() / e.norm()) for e, m in zip(eager, maps))
            del eager
        ref_layers = mixers[: args.reference_layers]
        if length <= args.direct_max_length:
            with entry_by_entry_blocks():
                seconds, direct = timed(lambda: [exact_channel_mean(layer_of(m, i).factors, "unified")
                                                 for i, m in enumerate(ref_layers)], device)
            row["direct_s"] = seconds * len(mixers) / len(ref_layers)
            err = max(float((d - m).norm() / d.norm()) for d, m in zip(direct, maps))
            row["fast_vs_direct_rel_error"] = err
        if length <= args.materialised_max_length:
            chunk = max(1, int(args.materialised_bytes // (length * length * args.state * dtype.itemsize * 3)))
            seconds, _ = timed(lambda: [materialised_mean(layer_of(m, i).factors, chunk)
                                        for i, m in enumerate(ref_layers)], device)
            row["materialised_s"] = seconds * len(mixers) / len(ref_layers)
        if length <= args.naive_max_length and args.naive_channels > 0:
            f = layer_of(mixers[0], 0).factors
            few = replace(f, x=f.x[..., : args.naive_channels], z=f.z[..., : args.naive_channels],
                          conv_out=f.conv_out[..., : args.naive_channels], dt=f.dt[..., : args.naive_channels],
                          conv_weight=f.conv_weight[: args.naive_channels], A=f.A[: args.naive_channels],
                          D=f.D[: args.naive_channels],
                          conv_bias=None if f.conv_bias is None else f.conv_bias[: args.naive_channels])
            few = replace(few, **{k: getattr(few, k).cpu() for k in ("x", "z", "conv_out", "mask", "conv_weight",
                                                                      "dt", "B", "C", "A", "D")},
                          conv_bias=None if few.conv_bias is None else few.conv_bias.cpu())
            seconds, _ = timed(lambda: naive_mamba(few, "unified"), torch.device("cpu"))
            row["naive_s"] = seconds * channels / args.naive_channels * len(mixers)

    if length <= args.explain_max_length:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)

        def forward_backward():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            logits[0, -1].max().backward()

        row["fwd_bwd_s"], _ = timed(forward_backward, device)
        row["attribution_s"], _ = timed(lambda: ia.explain(model, ids, method="attribution"), device)
        row["raw_s"], _ = timed(lambda: ia.explain(model, ids, method="raw", aggregate="mean"), device)
    return row


def markdown(rows: list[dict]) -> str:
    def fmt(value, unit="s"):
        if value is None:
            return "-"
        if unit == "s":
            return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
        return f"{value / 2**20:.0f} MiB"

    lines = ["| L | maps, all layers (fast) | eager | speed-up | direct | speed-up | materialised | speed-up | "
             "naive loops | speed-up | one row per layer | peak memory (maps) | fwd+bwd | attribution | "
             "attribution / fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = lambda ref: f"{r[ref] / r['maps_s']:.0f}x" if ref in r else "-"  # noqa: E731
        ratio = f"{r['attribution_s'] / r['fwd_bwd_s']:.2f}" if "attribution_s" in r else "-"
        lines.append(f"| {r['L']} | {fmt(r['maps_s'])} | {fmt(r.get('eager_s'))} | {speed('eager_s')} | "
                     f"{fmt(r.get('direct_s'))} | {speed('direct_s')} | "
                     f"{fmt(r.get('materialised_s'))} | {speed('materialised_s')} | {fmt(r.get('naive_s'))} | "
                     f"{speed('naive_s')} | {fmt(r['rows_s'])} | "
                     f"{fmt(r.get('maps_peak_bytes'), 'b')} | {fmt(r.get('fwd_bwd_s'))} | "
                     f"{fmt(r.get('attribution_s'))} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", default="256,512", help="comma-separated sequence lengths")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--inner", type=int, default=1536)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats of the fast paths (best of)")
    parser.add_argument("--reference-layers", type=int, default=1, help="layers the references are timed on")
    parser.add_argument("--direct-max-length", type=int, default=4096)
    parser.add_argument("--materialised-max-length", type=int, default=1024)
    parser.add_argument("--materialised-bytes", type=float, default=2**30, help="bytes per [c, L, L, N] block")
    parser.add_argument("--naive-max-length", type=int, default=512)
    parser.add_argument("--naive-channels", type=int, default=1, help="channels the loop reference is timed on")
    parser.add_argument("--explain-max-length", type=int, default=1024)
    parser.add_argument("--eager-max-length", type=int, default=8192, help="time the eager maps up to here (CUDA)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False      # float32 means float32 here
    model = build_model(args, device, dtype)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# Mamba-130M-shaped random model ({args.layers} layers, width {args.hidden}, inner {args.inner}, "
          f"state {args.state}), {args.dtype}, {machine}, torch {torch.__version__}", flush=True)
    bench_length(model, 64, args, device, dtype)          # warm-up: kernels, allocator, cuBLAS
    rows = []
    for length in [int(v) for v in args.lengths.split(",")]:
        rows.append(bench_length(model, length, args, device, dtype))
        print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
