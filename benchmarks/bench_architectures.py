"""Benchmark: every supported architecture, one randomly initialised model each, measured in one run.

Each model is built from its config (never ``from_pretrained``) at a moderate size (default width
256, 4 layers; state sizes and heads as each config needs), then lightly randomised so that the
decays, gates and biases are non-trivial. For each model and each length L (batch 1) it times:

1. ``fwd+bwd``: one forward pass of the model and the backward pass of one logit (last token, its
   largest logit), with gradients flowing into the input embeddings, the scans run as ``explain``
   runs them (mambapy's parallel scan for Mamba mixers);
2. ``decompose``: ``implicit_attention.decompose(model, ids)``, which includes the model's forward
   with capture hooks, building every layer and the exactness check (``measure_error``);
3. ``maps fast``: the signed-mean maps of all layers, ``[layer.aggregate("mean") for layer in
   result.layers]`` (each architecture's fast path where it overrides ``aggregate``);
4. ``maps generic``: the generic per-channel reference ``layer.aggregate_by_blocks("mean")``
   (materialised channel blocks, summed) on the layers of a second, fresh decomposition, so that
   nothing is cached; ``speed-up`` is generic / fast and ``max diff`` the largest relative
   difference ``max|fast - generic| / max|generic|`` over the layers;
5. ``attribution``: ``implicit_attention.explain(model, ids, method="attribution")``, and its ratio
   to (1);
6. ``max error``: the largest relative reconstruction error over the layers (from (2)).

Timings are wall-clock runs, fwd+bwd and attribution the best of ``--repeat`` (default 3), after a short
warm-up at L = 16.
Torch runs single-threaded by default (``--threads``) since the cores may be shared.
Usage: ``python benchmarks/bench_architectures.py --lengths 256 --only Mamba,GPT2 --out rows.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback

import torch
import transformers as tf

import implicit_attention as ia
import implicit_attention.models  # noqa: F401  (registers our architectures with transformers)
from implicit_attention.architectures.base import LayerDecomposition
from implicit_attention.models.gla import GLAConfig, GLAForCausalLM
from implicit_attention.models.hgrn import HGRNConfig, HGRNForCausalLM
from implicit_attention.models.retnet import RetNetConfig, RetNetForCausalLM
from implicit_attention.models.rwkv6 import Rwkv6Config, Rwkv6ForCausalLM
from implicit_attention.models.rwkv7 import Rwkv7Config, Rwkv7ForCausalLM

tf.logging.set_verbosity_error()


# ---------------------------------------------------------------------------- configurations
def configs(h: int, n: int, vocab: int) -> dict[str, tuple]:
    """``name -> (config class, model class, settings)`` at width ``h`` with ``n`` layers."""
    heads = max(1, h // 64)
    return {
        "Mamba": (tf.MambaConfig, tf.MambaForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, state_size=16, num_hidden_layers=n, expand=2, conv_kernel=4,
            time_step_rank=max(1, h // 16), use_bias=False, use_conv_bias=True)),
        "Mamba2": (tf.Mamba2Config, tf.Mamba2ForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, num_heads=2 * h // 64, head_dim=64, state_size=64, n_groups=1,
            num_hidden_layers=n, expand=2, conv_kernel=4, chunk_size=64)),
        "RWKV-4": (tf.RwkvConfig, tf.RwkvForCausalLM, dict(
            vocab_size=vocab, context_length=4096, hidden_size=h, num_hidden_layers=n, attention_hidden_size=h,
            intermediate_size=4 * h, rescale_every=0)),
        "RecurrentGemma": (tf.RecurrentGemmaConfig, tf.RecurrentGemmaForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=n,
            num_attention_heads=heads, num_key_value_heads=1, lru_width=h, attention_window_size=128,
            conv1d_width=4, attn_implementation="sdpa")),
        "xLSTM": (tf.xLSTMConfig, tf.xLSTMForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_heads=heads, use_bias=True,
            ffn_round_up_to_multiple_of=64, chunk_size=64)),
        "Jamba": (tf.JambaConfig, tf.JambaForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n,
            num_attention_heads=heads, num_key_value_heads=1, attn_layer_period=min(n, 4),
            attn_layer_offset=min(n, 4) // 2, num_experts=1, mamba_d_state=16, mamba_dt_rank=max(1, h // 16),
            mamba_d_conv=4, attn_implementation="sdpa")),
        "GPT2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(
            vocab_size=vocab, n_layer=n, n_head=heads, n_embd=h, n_positions=4096, attn_implementation="sdpa")),
        "Llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), attn_implementation="sdpa")),
        "RetNet": (RetNetConfig, RetNetForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, num_heads=heads, num_hidden_layers=n, value_factor=2,
            intermediate_size=2 * h)),
        "HGRN": (HGRNConfig, HGRNForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, intermediate_size=2 * h)),
        "GLA": (GLAConfig, GLAForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, num_heads=heads, num_hidden_layers=n, expand_k=0.5, expand_v=1.0,
            intermediate_size=2 * h)),
        "RWKV-6": (Rwkv6Config, Rwkv6ForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, head_size=64, intermediate_size=2 * h)),
        "RWKV-7": (Rwkv7Config, Rwkv7ForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, head_size=64, intermediate_size=2 * h)),
        # short gated convolutions with one (gated, for LFM3) softmax attention layer in four
        "LFM2": (tf.Lfm2Config, tf.Lfm2ForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), conv_L_cache=3, attn_implementation="sdpa",
            layer_types=["full_attention" if i % 4 == 2 else "conv" for i in range(n)])),
        "LFM3": (tf.Lfm3Config, tf.Lfm3ForCausalLM, dict(
            vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=h,
            intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            head_dim=64, conv_L_cache=3, attn_implementation="sdpa",
            layer_types=["full_attention" if i % 4 == 2 else "conv" for i in range(n)])),
        # lightning attention (fixed per-head decay) with one softmax attention layer in four
        "MiniMax": (tf.MiniMaxConfig, tf.MiniMaxForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), head_dim=64, num_local_experts=2, num_experts_per_tok=1,
            block_size=64, attn_implementation="sdpa",
            layer_types=["full_attention" if i % 4 == 2 else "linear_attention" for i in range(n)])),
        # delta-rule mixers (Gated DeltaNet, Kimi Delta Attention) with one softmax attention layer in four
        "Qwen3-Next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), head_dim=64, num_experts=0, linear_num_key_heads=heads,
            linear_num_value_heads=2 * heads, linear_key_head_dim=64, linear_value_head_dim=64,
            attn_implementation="sdpa",
            layer_types=["full_attention" if i % 4 == 2 else "linear_attention" for i in range(n)])),
        "Qwen3.5": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM, dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), head_dim=64, linear_num_key_heads=heads,
            linear_num_value_heads=2 * heads, linear_key_head_dim=64, linear_value_head_dim=64,
            attn_implementation="sdpa",
            layer_types=["full_attention" if i % 4 == 2 else "linear_attention" for i in range(n)])),
        "OLMo-Hybrid": (tf.OlmoHybridConfig, tf.OlmoHybridForCausalLM, dict(
            vocab_size=vocab, pad_token_id=0, eos_token_id=2, hidden_size=h, intermediate_size=2 * h,
            num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            linear_num_key_heads=heads, linear_num_value_heads=heads, linear_key_head_dim=64,
            linear_value_head_dim=64, attn_implementation="sdpa",
            layer_types=["full_attention" if i % 4 == 2 else "linear_attention" for i in range(n)])),
        "Kimi-Linear": (tf.KimiLinearConfig, tf.KimiLinearForCausalLM, dict(
            vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=h,
            intermediate_size=2 * h, moe_intermediate_size=h, num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=heads, kv_lora_rank=64, qk_rope_head_dim=32, v_head_dim=64, qk_nope_head_dim=32,
            num_local_experts=2, num_experts_per_tok=1, attn_implementation="sdpa",
            linear_attn_config=dict(head_dim=64, num_heads=heads, short_conv_kernel_size=4),
            layer_types=["full_attention" if i % 4 == 2 else "linear_attention" for i in range(n)])),
        "Bailing-Hybrid": (tf.BailingHybridConfig, tf.BailingHybridForCausalLM, dict(
            vocab_size=vocab, pad_token_id=0, eos_token_id=2, hidden_size=h, intermediate_size=2 * h,
            moe_intermediate_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=heads,
            head_dim=64, short_conv_kernel_size=4, kv_lora_rank=64, qk_rope_head_dim=32, v_head_dim=64,
            qk_nope_head_dim=32, num_local_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
            first_k_dense_replace=n, attn_implementation="sdpa",
            layer_types=["full_attention" if i % 4 == 2 else "linear_attention" for i in range(n)])),
    }


def randomise(model: torch.nn.Module) -> None:
    """Make the constants non-trivial (as the tests do): A_log in (-1, 1), dt biases ~ N(0, 1), and
    biases, D and constant-initialised parameters perturbed, so that decays and gates matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            elif name.endswith("dt_bias") or ("dt_proj" in name and name.endswith("bias")):
                param.copy_(torch.randn_like(param))
            elif name.endswith(("bias", ".D")) or bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.3)


def build(name: str, args) -> torch.nn.Module:
    config_cls, model_cls, settings = configs(args.hidden, args.layers, args.vocab)[name]
    torch.manual_seed(args.seed)
    if name == "xLSTM":
        # HF's initialisation fails for the fused weight mode (bias shapes): build uninitialised, then fill
        from transformers.initialization import no_init_weights
        with no_init_weights():
            model = model_cls(config_cls(**settings))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "norm" in pname and pname.endswith("weight"):
                    param.copy_(1 + torch.randn_like(param) * 0.1)
                elif pname.endswith("bias"):
                    param.copy_(torch.randn_like(param) * 0.5)
                else:
                    param.copy_(torch.randn_like(param) / max(1, param.shape[-1]) ** 0.5)
    else:
        model = model_cls(config_cls(**settings))
        randomise(model)
    return model.to(getattr(torch, args.dtype)).eval()


# ---------------------------------------------------------------------------- timing
def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def forward_backward(model, ids):
    """One forward and backward pass, with the model's scans as ``explain`` runs them (mambapy's
    parallel scan for ``transformers``' Mamba mixers: :func:`implicit_attention.scans.parallel_scans`),
    so that the ratio compares like with like."""
    from implicit_attention.scans import parallel_scans

    with parallel_scans(model):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        logits[0, -1].max().backward()
    model.zero_grad(set_to_none=True)


def bench(model, name: str, length: int, args) -> dict:
    torch.manual_seed(args.seed + length)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    row = {"architecture": name, "class": type(model).__name__, "L": length,
           "params": sum(p.numel() for p in model.parameters())}
    row["fwd_bwd_s"], _ = timed(lambda: forward_backward(model, ids), args.repeat)
    row["decompose_s"], result = timed(lambda: ia.decompose(model, ids), 1)
    row["layers"] = len(result.layers)
    row["layer_types"] = sorted({type(layer).__name__ for layer in result.layers})
    # layer classes whose aggregate() is the generic one (their "fast" maps are the reference itself)
    row["no_fast_path"] = sorted({type(layer).__name__ for layer in result.layers
                                  if type(layer)._fast_aggregate is LayerDecomposition._fast_aggregate})
    row["max_error"] = max(result.errors)
    with torch.no_grad():
        row["maps_fast_s"], fast = timed(lambda: [layer.aggregate("mean") for layer in result.layers], 1)
        fresh = ia.decompose(model, ids)  # nothing cached on these layers
        row["maps_generic_s"], generic = timed(
            lambda: [layer.aggregate_by_blocks("mean") for layer in fresh.layers], 1)
    diffs = [float((f - g).abs().max() / g.abs().max().clamp_min(1e-30)) for f, g in zip(fast, generic)]
    row["max_diff"] = max(diffs)
    row["speed_up"] = row["maps_generic_s"] / row["maps_fast_s"]
    result = fresh = fast = generic = None  # free the layers before the attribution run
    # best of --repeat, as the fwd+bwd it is divided by: on a shared machine single runs vary by 30% or more
    row["attribution_s"], _ = timed(lambda: ia.explain(model, ids, method="attribution"), args.repeat)
    row["attribution_ratio"] = row["attribution_s"] / row["fwd_bwd_s"]
    return row


# ---------------------------------------------------------------------------- output
def fmt_s(value) -> str:
    if value is None:
        return "-"
    if value < 0.1:
        return f"{value * 1000:.1f} ms"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | L | params | fwd+bwd | decompose | maps fast | maps generic | speed-up | max diff | "
             "attribution | attribution/fwd+bwd | max error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['architecture']} | {r.get('L', '-')} | - | failed: {r['error']} "
                         "| | | | | | | | |")
            continue
        lines.append(
            f"| {r['architecture']} | {r['L']} | {r['params'] / 1e6:.2f} M | {fmt_s(r['fwd_bwd_s'])} | "
            f"{fmt_s(r['decompose_s'])} | {fmt_s(r['maps_fast_s'])} | {fmt_s(r['maps_generic_s'])} | "
            f"{r['speed_up']:.1f}x | {r['max_diff']:.1e} | {fmt_s(r['attribution_s'])} | "
            f"{r['attribution_ratio']:.1f} | {r['max_error']:.1e} |")
    plain = [f"{r['architecture']} ({', '.join(r['no_fast_path'])})" for r in rows if r.get("no_fast_path")]
    if plain:
        lines.append("")
        lines.append("Layers without an aggregate() override (fast = generic code): " + "; ".join(plain))
    return "\n".join(lines)


def main(argv=None) -> int:
    names = list(configs(256, 4, 256))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "Help", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    parser.add_argument("--lengths", default="256", help="comma-separated sequence lengths")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="number of layers")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--only", default="all", help=f"comma list of architectures, or all, among: {', '.join(names)}")
    parser.add_argument("--length-for", default="", help="per-architecture lengths overriding --lengths, "
                        "e.g. 'xLSTM=128,RWKV-4=128' (for slow ones)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="dtype of the random models")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeat", type=int, default=3,
                        help="repeats of fwd+bwd and of the attribution run (best of each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = names if args.only in (None, "", "all") else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose among {names}")
    lengths = [int(v) for v in args.lengths.split(",")]
    overrides = {k.strip(): [int(x) for x in v.split("/")]
                 for k, v in (item.split("=") for item in args.length_for.split(",") if item.strip())}
    machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# random models: width {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, batch 1; "
          f"{machine}, torch {torch.__version__}, transformers {tf.__version__}", flush=True)
    rows = []
    for name in chosen:
        try:
            model = build(name, args)
            bench(model, name, 16, args)  # warm-up
        except Exception as exc:  # report and go on with the next architecture
            traceback.print_exc()
            rows.append({"architecture": name, "error": f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        for length in overrides.get(name, lengths):
            try:
                rows.append(bench(model, name, length, args))
            except Exception as exc:
                traceback.print_exc()
                rows.append({"architecture": name, "L": length,
                             "error": f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]})
            print(json.dumps(rows[-1]), flush=True)
        del model
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "transformers": tf.__version__,
                       "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
