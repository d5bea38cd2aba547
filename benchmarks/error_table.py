"""The README's table of reconstruction errors, measured: ``python benchmarks/error_table.py``.

For each row of the table (an architecture, or one kind of layer inside hybrid models) it builds
the tiny, randomly initialised stock models the tests use (the factories in ``tests/``, imported
from there), in float32 and in float64, for seeds ``0 .. --seeds - 1``. Each seed picks the model's
random weights, its random input and one of the configurations the row's tests cover (conv widths,
biases, heads, kernels, lengths; listed in ``ROWS``), for every model class of the row. The input
is a batch of 3 random sequences left-padded by 0, 1, 2 tokens (``tests/conftest.py::left_padded``;
encoders such as BERT pad on the right, image models get random pixels); a model whose real tokens
read the padding (``implicit_attention.architectures.registry.padding_leaks``: RWKV-4, xLSTM,
Griffin, a Mamba in-projection bias) gets the same batch without padding.

Each case runs ``implicit_attention.decompose(model, x, mask)`` with the default, exact variant
(``check=False``, so that a miss is printed instead of raised) and keeps ``layer.error``, the
relative error ``||A v + offset - out|| / ||out||`` of every layer of the row's kind against the
module's own output. A row's number is the maximum over its layers, classes and seeds.

Prints the markdown table, in the README's format, on stdout and progress on stderr.
Usage: ``python benchmarks/error_table.py [--only mamba,gla] [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import find_layers
from implicit_attention.architectures.registry import padding_leaks

TESTS = Path(__file__).resolve().parents[1] / "tests"
HEADER = ("| architecture | classes | variants (first = exact default) | float32 | float64 |\n"
          "|---|---|---|---|---|")
DTYPES = (torch.float32, torch.float64)
BATCH, LENGTH, VOCAB = 3, 7, 40


def tests_module(name: str):
    """A module of ``tests/`` (``conftest``, ``test_mamba2``, ...), imported with the tests folder on the path."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)


@dataclass(frozen=True)
class Case:
    """One model to decompose: ``build(dtype, seed)`` returns it; ``inputs(seed)`` its ``(x, mask)``."""

    label: str
    build: Callable[[torch.dtype, int], torch.nn.Module]
    inputs: Callable[[int], tuple] | None = None
    length: int = LENGTH
    #: drop the mask in float64 (the stock eager softmax runs in float32, where a float64 model's
    #: ``finfo.min`` mask is ``-inf``: the module itself returns NaN rows); as the tests do
    unmasked_in_float64: bool = False


@dataclass(frozen=True)
class Row:
    """One row of the table: ``cases(seed)`` lists the models of that seed; ``kinds`` the registry names of
    the layers the row measures (``None``: every token-mixing layer of the models)."""

    key: str
    architecture: str
    classes: str
    variants: str
    cases: Callable[[int], list[Case]]
    kinds: frozenset[str] | None = None


def pick(configs: Sequence[dict], seed: int) -> dict:
    """The configuration of ``seed`` among a row's ``configs`` (cycled)."""
    return configs[seed % len(configs)]


# ------------------------------------------------------------------------------------ the rows
def mamba_cases(classes: Sequence[str]) -> Callable[[int], list[Case]]:
    configs = [dict(conv_kernel=4, use_conv_bias=True, use_bias=False),
               dict(conv_kernel=2, use_conv_bias=False, use_bias=True),
               dict(conv_kernel=3, use_conv_bias=True, use_bias=True),
               dict(conv_kernel=5, use_conv_bias=False, use_bias=False)]

    def cases(seed: int) -> list[Case]:
        tiny_mamba = tests_module("conftest").tiny_mamba
        config = pick(configs, seed)
        return [Case(f"{name} {config}", lambda dtype, seed, name=name: tiny_mamba(name, dtype=dtype, seed=seed,
                                                                                    **config))
                for name in classes]
    return cases


def factory_cases(module: str, factory: str, classes: Sequence[str], configs: Sequence[dict] = ({},),
                  length: int = LENGTH, attns: Sequence[str] = ()) -> Callable[[int], list[Case]]:
    """Cases of ``tests/<module>.py::<factory>(class_name, dtype=, seed=, **config)`` for each class, and for
    each attention implementation in ``attns`` (``attn=``; an eager one unmasked in float64)."""
    def cases(seed: int) -> list[Case]:
        make = getattr(tests_module(module), factory)
        config = pick(configs, seed)
        return [Case(" ".join(filter(None, [name, str(config) if config else "", attn])),
                     lambda dtype, seed, name=name, attn=attn: make(name, dtype=dtype, seed=seed, **config,
                                                                   **({"attn": attn} if attn else {})),
                     length=length, unmasked_in_float64=attn == "eager")
                for name in classes for attn in (attns or [None])]
    return cases


def model_class_cases(module: str, factory: str, classes: Sequence[str], configs: Sequence[dict] = ({},),
                      keyword: str = "model_cls", attns: Sequence[str] = ()) -> Callable[[int], list[Case]]:
    """Cases of ``tests/<module>.py::<factory>(dtype=, seed=, <keyword>=class, **config)`` for each class and
    attention implementation in ``attns``; a configuration's ``length`` is the input length."""
    def cases(seed: int) -> list[Case]:
        test = tests_module(module)
        make = getattr(test, factory)
        config = dict(pick(configs, seed))
        length = config.pop("length", LENGTH)
        out = []
        for name in classes:
            for attn in attns or [None]:
                extra = {keyword: getattr(test, name), **({"attn": attn} if attn else {})}
                build = (lambda dtype, seed, extra=extra: make(dtype=dtype, seed=seed, **extra, **config))
                out.append(Case(" ".join(filter(None, [name, str(config) if config else "", attn])), build,
                                length=length, unmasked_in_float64=attn == "eager"))
        return out
    return cases


def attention_cases(seed: int) -> list[Case]:
    """Every Transformer class of ``tests/test_attention.py``, with sdpa and with eager attention; the
    stock eager Llama, whose float32 softmax turns a float64 padding mask into NaN rows, runs unpadded
    in float64, as in the tests."""
    test = tests_module("test_attention")
    return [Case(f"{name} {attn}", lambda dtype, seed, name=name, attn=attn: test.tiny(name, dtype=dtype, seed=seed,
                                                                                        attn=attn),
                 inputs=lambda seed, name=name: test.inputs_for(name, batch=BATCH, length=LENGTH, seed=seed),
                 unmasked_in_float64=attn == "eager" and name == "LlamaForCausalLM")
            for name in test.CONFIGS for attn in ("sdpa", "eager")]


MAMBA2_HYBRIDS = ["BambaForCausalLM", "Zamba2ForCausalLM", "NemotronHForCausalLM", "GraniteMoeHybridForCausalLM",
                  "FalconH1ForCausalLM"]
ATTENTION_HYBRIDS = ["JambaForCausalLM", "ZambaForCausalLM", "Zamba2ForCausalLM", "BambaForCausalLM",
                     "NemotronHForCausalLM", "GraniteMoeHybridForCausalLM", "FalconH1ForCausalLM"]
ATTENTION_KINDS = frozenset({"attention", "attention_gpt2", "attention_bert"})

#: The rows, in the README's order; the text columns are the README's.
ROWS = [
    Row("mamba", "Mamba", "`MambaForCausalLM`, `MambaModel`",
        "`unified`, `no_conv` (exact); `s6`, `no_gate`, `no_act`",
        mamba_cases(["MambaForCausalLM", "MambaModel"])),
    Row("falcon_mamba", "FalconMamba", "`FalconMambaForCausalLM` (weightless norms on dt, B, C)", "as Mamba",
        mamba_cases(["FalconMambaForCausalLM"])),
    Row("mamba2", "Mamba-2", "`Mamba2ForCausalLM`", "`unified`, `no_conv`; `ssd`, `no_gate`, `no_act`",
        factory_cases("test_mamba2", "tiny", ["Mamba2ForCausalLM"], [
            {}, dict(conv_kernel=2, use_conv_bias=False, use_bias=False, n_groups=1),
            dict(conv_kernel=3, use_conv_bias=True, use_bias=False, n_groups=4),
            dict(conv_kernel=5, use_conv_bias=True, use_bias=True, n_groups=1)], length=9)),
    Row("mamba2_hybrids", "Mamba-2 mixers in hybrids", ", ".join(f"`{c}`" for c in MAMBA2_HYBRIDS), "as Mamba-2",
        factory_cases("test_mamba2", "tiny", MAMBA2_HYBRIDS), frozenset({"mamba2"})),
    Row("mamba_hybrids", "Mamba mixers in hybrids", "`JambaForCausalLM` (normed dt/B/C), `ZambaForCausalLM` (heads)",
        "as Mamba",
        factory_cases("test_hybrid_mamba", "tiny", ["JambaForCausalLM", "ZambaForCausalLM"], [
            dict(mamba_d_conv=4, mamba_conv_bias=True, mamba_proj_bias=True),
            dict(mamba_d_conv=2, mamba_conv_bias=False, mamba_proj_bias=False),
            dict(mamba_d_conv=3, mamba_conv_bias=True, mamba_proj_bias=False)]),
        frozenset({"jamba_mamba", "zamba_mamba"})),
    Row("rwkv4", "RWKV-4", "`RwkvForCausalLM`, `RwkvModel`",
        "`unified` (the value-path token shift inside the operator: two value streams folded into each channel), "
        "`no_shift`; `wkv`",
        model_class_cases("test_rwkv4", "tiny_rwkv", ["RwkvForCausalLM", "RwkvModel"], [
            dict(attention_hidden_size=10), dict(attention_hidden_size=12), dict(attention_hidden_size=7)])),
    Row("griffin", "Griffin", "`RecurrentGemmaForCausalLM` (recurrent blocks; local attention as its probabilities)",
        "`unified`, `no_conv`; `rglru`, `no_gate`",
        model_class_cases("test_griffin", "tiny_griffin", ["RecurrentGemmaForCausalLM"], [
            dict(conv1d_width=3), dict(conv1d_width=2), dict(conv1d_width=4)], attns=("sdpa", "eager"))),
    Row("xlstm", "xLSTM (mLSTM)", "`xLSTMForCausalLM`, `xLSTMModel`", "`unified`; `mlstm`, `no_gate`",
        model_class_cases("test_xlstm", "tiny_xlstm", ["xLSTMForCausalLM", "xLSTMModel"], [
            dict(chunk_size=64, length=9), dict(chunk_size=4, use_bias=False, length=9),
            dict(mode="train", chunk_size=3, length=9)])),
    Row("retnet", "RetNet (ours)", "`RetNetForCausalLM`, `RetNetModel`", "`unified`; `recurrence`",
        model_class_cases("test_retnet", "tiny_retnet", ["RetNetForCausalLM", "RetNetModel"], [
            dict(num_heads=2, value_factor=2), dict(num_heads=4, value_factor=1, attention_bias=False),
            dict(num_heads=1, value_factor=2)])),
    Row("hgrn", "HGRN (ours)", "`HGRNForCausalLM`, `HGRNModel`", "`unified`; `recurrence`",
        model_class_cases("test_hgrn", "tiny_hgrn", ["HGRNForCausalLM", "HGRNModel"], [
            dict(conv_size=2, expand_ratio=2), dict(conv_size=3, conv_bias=False, attention_bias=False, expand_ratio=2),
            dict(conv_size=4, use_lower_bound=False, expand_ratio=2), dict(use_short_conv=False, expand_ratio=2)])),
    Row("gla", "GLA (ours)", "`GLAForCausalLM`, `GLAModel`", "`unified`; `recurrence`",
        model_class_cases("test_gla", "tiny_gla", ["GLAForCausalLM", "GLAModel"], [
            dict(num_heads=2), dict(num_heads=4, expand_k=0.5, attention_bias=False),
            dict(num_heads=1, expand_k=0.5)])),
    Row("rwkv6", "RWKV-6 (ours)", "`Rwkv6ForCausalLM`, `Rwkv6Model`", "`unified`; `wkv`",
        model_class_cases("test_rwkv6", "tiny_rwkv6", ["Rwkv6ForCausalLM", "Rwkv6Model"], [
            dict(length=7), dict(length=9), dict(length=5)], keyword="cls")),
    Row("rwkv7", "RWKV-7 (ours)", "`Rwkv7ForCausalLM`, `Rwkv7Model`", "`unified`; `wkv`",
        model_class_cases("test_rwkv7", "tiny_rwkv7", ["Rwkv7ForCausalLM", "Rwkv7Model"], [
            dict(length=7), dict(length=9, num_hidden_layers=3), dict(length=5, num_hidden_layers=1)], keyword="cls")),
    Row("transformers", "Transformers", "`GPT2LMHeadModel`, `LlamaForCausalLM`, `BertModel`, "
        "`BertForSequenceClassification` (also the pretrained all-MiniLM-L6-v2), `ViTModel`, "
        "`ViTForImageClassification`, `DeiTForImageClassification`", "`unified` (= the attention probabilities)",
        attention_cases),
    Row("attention_hybrids", "attention layers of hybrids",
        "Jamba, Zamba, Zamba2, Bamba, NemotronH, GraniteMoeHybrid, FalconH1", "`unified`",
        factory_cases("test_hybrid_models", "tiny", ATTENTION_HYBRIDS, attns=("sdpa", "eager")), ATTENTION_KINDS),
]


def minimax_cases(seed: int) -> list[Case]:
    """``tests/test_lightning.py::tiny``: lightning, softmax (GQA), lightning layers."""
    return [Case("MiniMaxForCausalLM", lambda dtype, seed: tests_module("test_lightning").tiny(dtype=dtype, seed=seed))]


def combined(*parts: Callable[[int], list[Case]]) -> Callable[[int], list[Case]]:
    """The cases of several factories, one after the other."""
    return lambda seed: [case for part in parts for case in part(seed)]


GATED_DELTANET = ["Qwen3NextForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "OlmoHybridForCausalLM",
                  "LaraMiniForCausalLM", "Qwen4ExpForCausalLM"]
KDA = ["KimiLinearForCausalLM", "BailingHybridForCausalLM", "Glm5NextForConditionalGeneration"]
SHORT_CONV = ["Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Lfm3ForCausalLM"]
NEW_HYBRID_ATTENTION = ["Qwen3NextForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen4ExpForCausalLM",
                        "OlmoHybridForCausalLM", "LaraMiniForCausalLM", "KimiLinearForCausalLM",
                        "BailingHybridForCausalLM", "Glm5NextTextModel"]
NEW_ATTENTION_KINDS = frozenset({"attention_gated", "attention_qwen4", "attention_latent", "attention_bailing",
                                 "attention_glm5", "attention_lfm2", "attention_minimax"})
ROWS += [
    Row("gated_deltanet", "Gated DeltaNet", ", ".join(f"`{c}`" for c in GATED_DELTANET)
        + " (their delta-rule mixers; float64: the modules' own float32 kernels)",
        "`unified`, `no_conv`; `delta`, `no_gate`, `no_act`",
        factory_cases("test_gated_deltanet", "tiny", GATED_DELTANET), frozenset({"gated_deltanet", "olmo_gated_deltanet"})),
    Row("kda", "Kimi Delta Attention", ", ".join(f"`{c}`" for c in KDA) + " (per-channel decay; float64 as above)",
        "as Gated DeltaNet", factory_cases("test_kda", "tiny", KDA), frozenset({"kda"})),
    Row("shortconv", "short gated convolutions", ", ".join(f"`{c}`" for c in SHORT_CONV), "`unified`; `no_gate`",
        factory_cases("test_shortconv", "tiny", SHORT_CONV), frozenset({"shortconv"})),
    Row("lightning", "lightning attention", "`MiniMaxForCausalLM` (float64: its float32 decays and norm)",
        "`unified`; `recurrence`, `no_gate`", minimax_cases, frozenset({"lightning"})),
    Row("attention_new_hybrids", "attention layers of the new hybrids",
        "LFM2, LFM2-MoE, LFM3, MiniMax, Qwen3-Next, Qwen3.5, Qwen3.5-MoE, Qwen4-Exp, OLMo-Hybrid, LaraMini, "
        "Kimi Linear, Bailing, GLM-5 Next (output gates, q/k norms, latent and sparse attention)",
        "`unified` (and `no_gate` where the layer has an output gate: an ablation)",
        combined(factory_cases("test_hybrid_attention", "tiny", NEW_HYBRID_ATTENTION, attns=("sdpa", "eager")),
                 factory_cases("test_shortconv", "tiny", SHORT_CONV, attns=("sdpa", "eager")), minimax_cases),
        NEW_ATTENTION_KINDS),
]
VIM_CONFIGS = [dict(), dict(cls_position=0, conv_kernel=4, use_bias=True),
               dict(cls_position=5, use_conv_bias=False, divide_out=False, rms_norm=False, conv_kernel=2)]


def vim_cases(seed: int) -> list[Case]:
    """``tests/test_vim.py::tiny_vim`` (both classes; class token in the middle, first or at index 5 of 7) on a
    batch of random pixels (images carry no padding)."""
    test = tests_module("test_vim")
    config = pick(VIM_CONFIGS, seed)
    return [Case(f"{name} {config}", lambda dtype, seed, name=name: test.tiny_vim(name, dtype=dtype, seed=seed, **config),
                 inputs=lambda seed: (test.pixels(batch=BATCH, seed=seed), None))
            for name in ("VimForImageClassification", "VimModel")]


ROWS += [
    Row("vim", "Vision Mamba (ours)", "`VimForImageClassification`, `VimModel` (bidirectional: `(A_f + J A_b J) / 2`)",
        "as Mamba", vim_cases, frozenset({"vim"})),
]
KEYS = [row.key for row in ROWS]


# ---------------------------------------------------------------------------------- measuring
def case_inputs(case: Case, model: torch.nn.Module, seed: int, dtype: torch.dtype) -> tuple:
    """The case's input: a left-padded batch, or the same tokens unpadded when ``model`` reads padding
    (or its eager attention cannot take a float64 mask)."""
    if case.inputs is not None:
        x, mask = case.inputs(seed)
    else:
        x, mask = tests_module("conftest").left_padded(BATCH, case.length, VOCAB, seed)
    if mask is not None and (padding_leaks(model) or case.unmasked_in_float64 and dtype == torch.float64):
        x, mask = x.clamp(min=1), None
    return x, mask


def case_errors(row: Row, case: Case, dtype: torch.dtype, seed: int) -> list[float]:
    """The reconstruction error of each of the row's layers in one decomposition."""
    model = case.build(dtype, seed)
    x, mask = case_inputs(case, model, seed, dtype)
    indices = [i for i, (_, _, arch) in enumerate(find_layers(model)) if row.kinds is None or arch.name in row.kinds]
    if not indices:
        raise RuntimeError(f"{row.key}: {case.label} has no layer of kind {sorted(row.kinds or ())}")
    result = ia.decompose(model, x, mask, layers=indices, check=False)
    assert all(layer.exact and layer.error_channels == layer.channels for layer in result.layers), case.label
    return list(result.errors)


def measure(row: Row, seeds: int, log=None) -> dict[torch.dtype, float]:
    """``{dtype: the largest error}`` of ``row`` over its classes and ``seeds`` seeds."""
    worst = {dtype: 0.0 for dtype in DTYPES}
    for seed in range(seeds):
        for case in row.cases(seed):
            for dtype in DTYPES:
                errors = case_errors(row, case, dtype, seed)
                worst[dtype] = max(worst[dtype], *errors)
                if log:
                    log(f"  seed {seed} {case.label} {str(dtype).removeprefix('torch.')}: "
                        f"max error {max(errors):.2e} over {len(errors)} layer{'s' if len(errors) != 1 else ''}")
    return worst


def format_error(value: float) -> str:
    """``1.7e-7``: two significant digits, no exponent padding."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def table_row(row: Row, worst: dict[torch.dtype, float]) -> str:
    return (f"| {row.architecture} | {row.classes} | {row.variants} | "
            f"{format_error(worst[torch.float32])} | {format_error(worst[torch.float64])} |")


def main(argv: Sequence[str] | None = None) -> str:
    """Measure the selected rows; print the table on stdout (returned too) and progress on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help=f"comma-separated rows, of: {', '.join(KEYS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row and class (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="one progress line per decomposition")
    args = parser.parse_args(argv)
    keys = KEYS if args.only is None else [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = [key for key in keys if key not in KEYS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(KEYS)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    tf.logging.set_verbosity_error()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    lines, start = [HEADER], time.perf_counter()
    for row in (row for row in ROWS if row.key in keys):
        began = time.perf_counter()
        worst = measure(row, args.seeds, log if args.verbose else None)
        lines.append(table_row(row, worst))
        log(f"{row.key}: float32 {format_error(worst[torch.float32])}, float64 {format_error(worst[torch.float64])} "
            f"({time.perf_counter() - began:.1f} s)")
    log(f"done in {time.perf_counter() - start:.1f} s")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
