"""The ``implicit-attention`` command line (also ``python -m implicit_attention``).

Subcommands:

- ``explain TEXT...``: predict, explain the prediction with relevance per token, and optionally
  write an HTML/JSON report with the per-layer implicit attention matrices (``--out DIR``).
- ``info``: the model's class, its decomposable layers and the formulations offered.
- ``explain-dataset FILE --out DIR``: explain every text of a text/CSV/JSONL file into
  ``DIR/results.jsonl`` and ``DIR/summary.json``; resumable, data-parallel under ``torchrun``
  (see :mod:`implicit_attention.dataset`).
- ``explain-image IMAGE_OR_FOLDER --model DIR``: explain an image classifier's prediction on image
  files (the same report as ``explain``, with the patch relevance drawn over each image; see
  :mod:`implicit_attention.vision.images`).
- ``amplify``: AMPLIFY in-context rationales: a proxy model's explanations of the demonstrations it picks go
  into the few-shot prompt of a target causal LM; prints the prompt and the target's accuracy (see
  :mod:`implicit_attention.applications.amplify`).

Run ``implicit-attention explain --help`` for every option.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence

from . import __version__
from .catalog import (
    AGGREGATES,
    COMPUTE_DTYPES,
    METHOD_OPTIONS,
    METHODS,
    MODEL_DTYPES,
    SCORES,
    VARIANTS,
    check_method_options,
)
from .errors import ImplicitAttentionError, ReconstructionError

PROG = "implicit-attention"


EXPLAIN_EPILOG = """\
examples:
  # the bundled sentiment model, the default method (attribution)
  implicit-attention explain "an utterly charming film"

  # several texts are explained in one batch (left padding)
  implicit-attention explain "a gorgeous, witty film" "a dull, lifeless mess"

  # explain a given label (not the prediction), with attention rollout on the last two layers
  implicit-attention explain "not bad at all" --target positive --method rollout --layers=-2,-1

  # write report.html + explanation.json + matrix images; float64 for much smaller errors
  implicit-attention explain "an utterly charming film" --out report/ --dtype float64

  # another model: a local directory saved with save_pretrained(), or a Hub id (needs network)
  implicit-attention explain "The capital of France is" --model state-spaces/mamba-130m-hf --target " Paris"

exit status: 0 on success, 2 on a usage error or an error reported by the library
(an empty text, an unsupported model, a reconstruction above tolerance, ...).
"""

DATASET_EPILOG = """\
input formats (by extension, or --format):
  .txt   one text per line
  .csv   a header row; the text in --text-column (default: text), the gold label in --label-column
  .tsv   the same with tabs
  .jsonl one JSON object per line; the text in --text-field (default: text), the label in --label-field
  Each input keeps its 0-based index in the file (line, or data row of a CSV); empty texts are skipped
  and counted in the summary.

gold labels are mapped to the task's label names: a label name (positive), its label word, or a key of
the task's "labels" entry (1 -> positive, 0 -> negative for the bundled model) are understood as they
are; map other values with --label-map, e.g. --label-map fresh=positive,rotten=negative.

output (DIR):
  results.jsonl  one JSON object per explained input, sorted by index: index, text, tokens, relevance,
                 prediction, probability, probabilities, gold, gold_raw, correct, target,
                 batch_max_error (largest reconstruction error of the batch it ran in)
  summary.json   counts, accuracy, mean/max reconstruction error, settings, time, examples per second,
                 number of processes (written at the end)
  run.json       the settings of the run

resume: results are written in completed batches; run the same command again after an interruption
(Ctrl-C, kill, crash) and it continues where it stopped. Other settings (model, method, variant, layers,
aggregate, dtype, target, --no-check, input file contents, columns, label map) are refused unless --force,
which starts over. --batch-size, --length-window, --device, --limit and the number of processes may change.

examples:
  implicit-attention explain-dataset reviews.txt --out runs/reviews
  implicit-attention explain-dataset reviews.csv --label-column label --out runs/rt --limit 200
  implicit-attention explain-dataset rt.jsonl --label-field category \\
      --label-map fresh=positive,rotten=negative --out runs/rt --method rollout

  # data-parallel: one process per GPU (each on cuda:LOCAL_RANK), or CPU processes with gloo
  torchrun --standalone --nproc_per_node 2 -m implicit_attention explain-dataset reviews.csv \\
      --out runs/rt --device cuda --batch-size 32

  # a model too large for one GPU (needs accelerate): spread over all visible GPUs, one process
  implicit-attention explain-dataset data.txt --model ./big-mamba --device-map auto --out runs/big
"""

INFO_EPILOG = """\
examples:
  implicit-attention info
  implicit-attention info --model ./my-mamba-model
  implicit-attention info --architectures
"""


#: A prompt longer than this many tokens gets a progress bar (``explain --progress``'s default).
LONG_INPUT_TOKENS = 256
#: The longest text ``explain`` echoes in full; longer ones are cut, with their length.
ECHO_CHARACTERS = 200


#: Why ``no_gate`` changes nothing under ``attribution`` (``info`` on a model with Mamba layers, ``--variant``'s help).
GATE_CANCELS = ("under --method attribution an output-side factor such as the gate cancels (no_gate attribution equals "
                "unified by construction: the gradient at the matrix output carries the gate back), so the ablations "
                "that change attribution are the value-side ones")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _negative_number_lists(parser: argparse.ArgumentParser) -> None:
    """Let option values such as ``-1,0`` (layer lists) be read as values, not as options."""
    if hasattr(parser, "_negative_number_matcher"):
        parser._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$|^-\d*\.\d+$")


def parse_layers(value: str) -> list[int]:
    """``"0,1,-1"`` -> ``[0, 1, -1]``."""
    try:
        layers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of layer indices such as 0,1,-1, got {value!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer index")
    return layers


def parse_method_option(value: str) -> tuple[str, object]:
    """``"steps=64"`` -> ``("steps", 64)``: integers, then floats, then true/yes/false/no, else the text
    (the method's own checks then say what a value must be)."""
    name, sep, text = value.partition("=")
    if not sep or not name.strip() or not text.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE such as steps=64, got {value!r}")
    text = text.strip()
    for convert in (int, float):
        try:
            return name.strip(), convert(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "yes", "false", "no"):
        return name.strip(), lowered in ("true", "yes")
    return name.strip(), text


def _method_options_help() -> str:
    taking = "; ".join(f"{method}: {', '.join(names)}" for method, names in METHOD_OPTIONS.items() if names)
    return ("an option of the method, NAME=VALUE (repeatable): " + taking + ". E.g. --option steps=64 --option "
            "baseline=0 (a token id: integrated gradients from the pad token's embedding), --option window=3, "
            "--option noise=0.2")


def _method_options(args: argparse.Namespace) -> dict:
    options = dict(args.options or [])
    check_method_options(args.method, options)
    return options


def _add_method_options(parser: argparse.ArgumentParser, methods) -> None:
    """--method, --option, --variant, --layers and --aggregate, as explain-image and explain-dataset take them."""
    parser.add_argument("--method", choices=methods, default="attribution",
                        help="how relevance is computed, as for explain (default: %(default)s)")
    parser.add_argument("--option", dest="options", action="append", type=parse_method_option, metavar="NAME=VALUE",
                        help=_method_options_help())
    parser.add_argument("--variant", choices=VARIANTS, default="unified",
                        help="implicit attention formulation, as for explain (default: %(default)s)")
    parser.add_argument("--layers", type=parse_layers, default=None, metavar="I,J,...",
                        help="token-mixing layers to use, e.g. 0,1,-1 or --layers=-1 (default: all)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="abs",
                        help="channel aggregation of raw and rollout (default: %(default)s)")


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="NAME_OR_DIR", default=None,
        help="a local model directory (written by save_pretrained) or a Hugging Face Hub id such as "
             "state-spaces/mamba-130m-hf (needs network access or the local HF cache); default: the bundled "
             "sentiment model rt-sentiment-mamba. A task.json in the directory (prompt template and label "
             "words) turns predictions into labels.")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default="float32",
                        help="dtype the model is loaded and run in, and the decomposition computed in "
                             "(default: %(default)s; float64 gives much smaller reconstruction errors and "
                             "checks them against 1e-6 instead of 1e-4; float16 and bfloat16 models are "
                             "decomposed in float32 and checked against 1e-2 and 5e-2, the precision of their "
                             "own outputs)")
    parser.add_argument("--device", default=None,
                        help="device for the model, e.g. cpu or cuda:0 (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``implicit-attention`` command (built without importing torch)."""
    parser = _Parser(
        prog=PROG,
        description="Explain the predictions of gated-linear RNNs, state-space models (Mamba, Mamba-2, RWKV, "
                    "Griffin, xLSTM, RetNet, HGRN, GLA, hybrids) and Transformers with the exact implicit "
                    "attention matrices of their token-mixing layers.",
        epilog=f"Run '{PROG} explain --help', '{PROG} explain-dataset --help', '{PROG} explain-image --help', "
               f"'{PROG} amplify --help' or '{PROG} info --help' for the options of each command.\n\n"
               + EXPLAIN_EPILOG.split("\n\n")[0] + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    explain = sub.add_parser(
        "explain", help="predict and explain texts (relevance per token; optional HTML report)",
        description="Predict the next token (a label for the bundled task model) for each TEXT and show "
                    "which input tokens drove the prediction: tokens are coloured red for positive and blue "
                    "for negative relevance. The token-mixing layers are rewritten as exact implicit attention "
                    "matrices; the largest relative reconstruction error is printed as a check.",
        epilog=EXPLAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _negative_number_lists(explain)
    explain.add_argument("texts", nargs="+", metavar="TEXT",
                         help="text(s) to explain; several texts run as one left-padded batch. For a task model "
                              "the text is put into the task's prompt template. Use -- before a text that "
                              "starts with '-'.")
    _add_model_option(explain)
    explain.add_argument(
        "--method", choices=METHODS, default="attribution",
        help="how relevance is computed (default: %(default)s). From the implicit attention: raw (row of the "
             "layer-mean map), rollout (attention rollout), attribution (gradient-weighted attention rollout, "
             "Chefer et al.), signed_attribution (the same keeping negative evidence), paper (the paper's "
             "recipe: rollout over the layers from start_layer, by default the second half of them). Baselines without matrices: random, grad_x_input, integrated_gradients, occlusion, "
             "smoothgrad, lrp (MambaLRP / AttnLRP rules: Mamba, FalconMamba, GPT-2, Llama, BERT). Method options: "
             "--option.")
    explain.add_argument("--option", dest="options", action="append", type=parse_method_option,
                         metavar="NAME=VALUE", help=_method_options_help())
    explain.add_argument("--all-tokens", action="store_true",
                         help="normalise relevance over the whole prompt; by default over the text's own tokens, "
                              "with the task's prompt template (and BOS) greyed")
    explain.add_argument("--words", action="store_true",
                         help="also print the text's relevance merged into words (whitespace-separated, "
                              "punctuation kept; sub-word tokens summed, on the tokens' scale, so a word can pass "
                              "+-1)")
    explain.add_argument(
        "--variant", choices=VARIANTS, default="unified",
        help="implicit attention formulation (default: %(default)s, the exact one). For Mamba, s6 is the earlier "
             "S6-only hidden attention; no_conv puts the convolution's output in the values (still exact); no_gate "
             "and no_act leave out the gate or the activation (ablations: their reconstruction error shows what "
             "they miss). Other architectures offer their own (ssd for Mamba-2, wkv for RWKV, rglru for Griffin, "
             "recurrence for RetNet/HGRN/GLA, ...; 'implicit-attention info' lists a model's, exact ones marked). "
             f"Note: {GATE_CANCELS}. Baselines do not use it (refused without --out, where it picks the report's "
             "matrices).")
    explain.add_argument(
        "--layers", type=parse_layers, default=None, metavar="I,J,...",
        help="token-mixing layers to use, as comma-separated indices; negatives count from the end "
             "(e.g. 0,1,-1 or --layers=-1). Default: all layers.")
    explain.add_argument(
        "--aggregate", choices=AGGREGATES, default="abs",
        help="how the per-channel matrices are averaged for the raw and rollout methods: abs = mean of |A|, "
             "pos = mean of max(A, 0), mean = signed mean (default: %(default)s)")
    explain.add_argument(
        "--target", default=None,
        help="what to explain. Task models: a label (e.g. positive, negative); otherwise (or also) a token id "
             "or a string that is exactly one token (e.g. ' Paris'). Default: the predicted label / token.")
    explain.add_argument("--score", choices=SCORES, default=None, help="which score of the target is explained: contrast (its logit minus the other labels' mean logit, "
             "e.g. logit(positive) - logit(negative): the default for models with a task.json), logit (the "
             "default otherwise; what the Python explain() explains), or log_prob (its log-probability, over the "
             "label words for task models)")
    explain.add_argument(
        "--position", type=int, default=-1,
        help="output position whose prediction is explained; negatives count from the end (default: -1, the "
             "end of the text or prompt)")
    explain.add_argument(
        "--out", metavar="DIR", default=None,
        help="write DIR/report.html (one self-contained interactive page: tokens as a heat map, prediction, "
             "per-layer errors, the aggregated matrices drawn in the page with a layer slider), DIR/explanation.json "
             "and the matrices as PNG files. The files are written to a temporary directory first and moved into "
             "place when complete; DIR must not exist or be empty unless --force is given")
    explain.add_argument(
        "--force", action="store_true",
        help="with --out: if DIR holds files, replace the report files in it (other files are kept)")
    explain.add_argument(
        "--compare", type=parse_comparisons, default=[], metavar="METHOD[:VARIANT],...",
        help="also explain the same target with these methods (and variants), e.g. rollout,attribution:s6: each "
             "is printed, and the report's switcher recolours the tokens with it (their default options)")
    explain.add_argument(
        "--channels", type=parse_layers, default=None, metavar="C,D,...",
        help="with --out: also draw these channels' own matrices (heads of an attention layer) of one layer, "
             "--channel-layer, in the report's viewer")
    explain.add_argument(
        "--channel-layer", type=int, default=-1, metavar="I",
        help="the decomposed layer whose --channels are drawn (an index among them; default: -1, the last)")
    explain.add_argument(
        "--no-check", dest="check", action="store_false",
        help="do not fail when an exact decomposition misses its layer's output by more than the tolerance "
             "(1e-4 for float32, 1e-6 for float64); the error is still printed")
    explain.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="a progress bar over the layers being decomposed, on stderr (default: when a prompt is longer than "
             f"{LONG_INPUT_TOKENS} tokens)")
    explain.add_argument(
        "--color", action=argparse.BooleanOptionalAction, default=None,
        help="colour the tokens with 24-bit ANSI backgrounds (default: when stdout is a terminal and NO_COLOR "
             "is not set); without colour each token is followed by its normalised relevance in brackets")
    explain.set_defaults(handler=cmd_explain)

    info = sub.add_parser("info", help="show the model's decomposable layers and the variants",
                          description="Print the model class, its decomposable token-mixing layers (index, "
                                      "module path, architecture, channels), the task if any, and the "
                                      "variants and methods offered.",
                          epilog=INFO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_option(info)
    info.add_argument("--architectures", action="store_true",
                      help="list every supported architecture (its model classes and variants) instead of a "
                           "model's layers; nothing is loaded")
    info.set_defaults(handler=cmd_info)

    _add_dataset_parser(sub, METHODS)
    _add_image_parser(sub, METHODS)
    _add_amplify_parser(sub)
    return parser


IMAGE_EPILOG = """\
examples:
  implicit-attention explain-image data/fashion-composites/test/00000.png
  implicit-attention explain-image data/fashion-composites/test --limit 20 --out rep/
  implicit-attention explain-image data/fashion-composites/test/00000.png --variant s6
  implicit-attention explain-image data/fashion-composites/test/00000.png --model fashion-deit
  implicit-attention explain-image shoe.jpg --model ./my-vit --method rollout --target 7

Without --model the bundled fashion-vim explains: a Vision Mamba trained on the Fashion-MNIST composites
(64 x 64 grey images of one garment among clutter; 86.1% test accuracy); --model fashion-deit picks the
bundled DeiT of the same size trained the same way (85.4%).
Any image Pillow reads is converted to the model's channels (grey or RGB) and resized to its image size
(config.json); a preprocessor_config.json beside the model (image_mean, image_std) normalises the pixels.

exit status: 0 on success, 2 on a usage error or an error reported by the library.
"""


def _add_image_parser(sub, methods: Sequence[str]) -> None:
    """The ``explain-image`` subcommand."""
    im = sub.add_parser(
        "explain-image", help="explain an image classifier on image files (relevance of each patch; report)",
        description="Predict the class of each image (a file, or every image of a folder) and show which "
                    "patches drove the prediction; --out writes report.html, explanation.json and, per image, "
                    "the patch relevance upsampled to the pixels over the original (overlay_*.png).",
        epilog=IMAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _negative_number_lists(im)
    im.add_argument("images", metavar="IMAGE_OR_FOLDER", help="an image file, or a folder of them (not recursive)")
    im.add_argument("--model", metavar="DIR_OR_NAME", default=None,
                    help="an image classifier saved with save_pretrained (ViT, DeiT, our ViM, ...), a Hub id, or a "
                         "bundled one by name: fashion-vim (the default, a Vision Mamba) or fashion-deit (Fashion-MNIST "
                         "composites)")
    im.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                    help="dtype the model is loaded and run in (default: %(default)s)")
    im.add_argument("--device", default=None, help="device for the model, e.g. cpu or cuda:0 (default: cpu)")
    _add_method_options(im, methods)
    im.add_argument("--target", default=None,
                    help="explain this class (an index or a label name) for every image (default: the prediction)")
    im.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images of a folder")
    im.add_argument("--out", metavar="DIR", default=None,
                    help="write DIR/report.html, DIR/explanation.json and the images (atomically, as explain)")
    im.add_argument("--force", action="store_true", help="with --out: replace the report files in a non-empty DIR")
    im.add_argument("--matrices", action=argparse.BooleanOptionalAction, default=None,
                    help="with --out: draw each layer's aggregated maps per image (default: for at most 8 images)")
    im.add_argument("--no-check", dest="check", action="store_false",
                    help="do not fail when an exact decomposition misses its layer's output by more than the "
                         "tolerance; the error is still printed")
    im.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: for a folder)")
    im.set_defaults(handler=cmd_explain_image)


def _add_dataset_parser(sub, methods: Sequence[str]) -> None:
    """The ``explain-dataset`` subcommand."""
    ds = sub.add_parser(
        "explain-dataset", help="explain every text of a text/CSV/JSONL file (resumable, data-parallel)",
        description="Predict and explain every text of FILE, writing DIR/results.jsonl (one JSON object per "
                    "input) and DIR/summary.json (counts, accuracy against gold labels, reconstruction errors, "
                    "speed). An interrupted run resumes when run again with the same arguments. Under torchrun "
                    "each process explains its share (indices i with i % WORLD_SIZE == RANK) and rank 0 merges.",
        epilog=DATASET_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _negative_number_lists(ds)
    ds.add_argument("file", metavar="FILE", help="the data set: .txt (one text per line), .csv/.tsv or .jsonl")
    ds.add_argument("--out", metavar="DIR", required=True,
                    help="output directory (created if missing; an earlier run in it is resumed)")
    ds.add_argument("--format", choices=("text", "csv", "tsv", "jsonl"), default=None,
                    help="input format (default: from the file's extension)")
    ds.add_argument("--text-column", default="text", metavar="NAME",
                    help="CSV/TSV column holding the text (default: %(default)s)")
    ds.add_argument("--label-column", default=None, metavar="NAME",
                    help="CSV/TSV column holding the gold label (default: none; no accuracy)")
    ds.add_argument("--text-field", default="text", metavar="NAME",
                    help="JSONL field holding the text (default: %(default)s)")
    ds.add_argument("--label-field", default=None, metavar="NAME",
                    help="JSONL field holding the gold label (default: none; no accuracy)")
    ds.add_argument("--label-map", action="append", default=None, metavar="GOLD=LABEL,...",
                    help="map gold label values to the task's label names, e.g. fresh=positive,rotten=negative "
                         "(repeatable; label names, label words and the task's 'labels' keys such as 1/0 are "
                         "understood without it)")
    ds.add_argument("--keep-columns", type=lambda v: [k.strip() for k in v.split(",") if k.strip()], default=[],
                    metavar="A,B,...",
                    help="CSV/TSV columns or JSONL fields copied into each input's result in results.jsonl "
                         "(an 'id' column or field is always copied)")
    _add_model_option(ds)
    ds.add_argument("--device-map", default=None, metavar="auto|balanced|sequential|MAP.json",
                    help="load the model through accelerate (must be installed) spread over the visible GPUs, "
                         "instead of --device: a device_map strategy, or a JSON file mapping module names to "
                         'devices ({"backbone.layers.0": "cuda:0", ...}). Every method works: each layer is '
                         "decomposed on its GPU and the maps are combined on the inputs' GPU. For one process only")
    _add_method_options(ds, methods)
    ds.add_argument("--target", default=None,
                    help="explain this label / token for every text (default: each text's prediction)")
    ds.add_argument("--score", choices=SCORES, default=None, help="which score of the target is explained: contrast (its logit minus the other labels' mean logit, "
             "e.g. logit(positive) - logit(negative): the default for models with a task.json), logit (the "
             "default otherwise; what the Python explain() explains), or log_prob (its log-probability, over the "
             "label words for task models)")
    ds.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help="texts per batch (left-padded together); results are written after each batch; a batch "
                         "that does not fit in memory is halved (and so are the later ones). Default: "
                         "1 on the CPU (larger batches were slower per text there: padding, memory traffic), "
                         "16 on a GPU (64 was 2x faster on short texts on an H200)")
    ds.add_argument("--length-window", type=int, default=8, metavar="N",
                    help="batch texts of similar length together: sort them by token count within windows of N "
                         "batches, so that padding wastes little of a batch (default: %(default)s; 1: the file's "
                         "order; no effect with --batch-size 1)")
    ds.add_argument("--limit", type=int, default=None, metavar="N",
                    help="only the first N inputs of the file (empty ones included); a later run with a larger "
                         "N or none continues")
    ds.add_argument("--reports", type=int, default=10, metavar="N",
                    help="write the full report (report.html with the per-layer matrices, as explain --out) of the "
                         "first N explained inputs into DIR/reports/<index>/, linked from DIR/index.html "
                         "(default: %(default)s; 0: none)")
    ds.add_argument("--no-check", dest="check", action="store_false",
                    help="do not fail when an exact decomposition misses its layer's output by more than the "
                         "tolerance; the errors are still recorded")
    ds.add_argument("--force", action="store_true",
                    help="delete an earlier run's files in DIR (results, shards, summary, run.json) and start over")
    ds.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="show a progress bar on stderr (default: on; rank 0 only under torchrun)")
    ds.set_defaults(handler=cmd_explain_dataset)


def version_string() -> str:
    """``implicit-attention X (torch Y, transformers Z)``, read from the installed packages' metadata."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"{PROG} {__version__} (torch {installed('torch')}, transformers {installed('transformers')})"


# ------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' and huggingface_hub's info/warning logs and progress bars during a command.

    Library errors still surface as exceptions; only chatter (kernel fallbacks, download retries,
    weight-loading bars) is hidden. The previous settings are restored afterwards.
    """
    import logging

    restore = []
    try:
        from transformers.utils import logging as hf_logging
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        restore.append(lambda: hf_logging.set_verbosity(verbosity))
        if bars:
            restore.append(hf_logging.enable_progress_bar)
    except ImportError:  # pragma: no cover
        pass
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    restore.append(lambda: hub_logger.setLevel(hub_level))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


@contextlib.contextmanager
def _one_line_warnings():
    """Print each warning as one ``warning: ...`` line on stderr (not Python's file, line and source line)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _check_out_writable(path: str) -> None:
    """Refuse an ``--out`` directory that cannot be created or written in, before any work is done."""
    import tempfile

    target = os.path.abspath(os.path.expanduser(path))
    existing = target
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {path!r} cannot be created: {existing!r} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(f"--out {path!r} is not writable: cannot write in {existing!r} "
                         f"({exc.strerror or exc})") from None


def _refuse_unused_matrix_options(args: argparse.Namespace, report: bool | None) -> None:
    """Baselines decompose no layer: refuse ``--layers`` / ``--variant`` instead of printing and ignoring them.
    ``report``: whether ``--out`` is given, where they pick the layers drawn in the report and are used
    (``None``: the command draws no matrices)."""
    from .catalog import BASELINE_METHODS

    if args.method not in BASELINE_METHODS or report:
        return
    given = [option for option, value in (("--layers", args.layers is not None),
                                          ("--variant", args.variant != "unified")) if value]
    if given:
        where = "" if report is None else " without --out (with it they pick the report's matrices)"
        raise ValueError(f"{' and '.join(given)} {'do' if len(given) > 1 else 'does'} not apply to the {args.method} "
                         f"baseline{where}: it decomposes no layer; leave {'them' if len(given) > 1 else 'it'} out")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"invalid --device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")


def _use_color(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR"):
        return False
    return sys.stdout.isatty()


def _prediction_line(pred) -> str:
    if pred.is_label:
        others = ", ".join(f"{k} {v:.4f}" for k, v in pred.probabilities.items())
        return f"prediction: {pred.label} (p={pred.probability:.4f}; {others})"
    return f"next token: {pred.label!r} (id {pred.token_id}, p={pred.probability:.4f})"


# -------------------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    from .catalog import MATRIX_METHODS
    from .explanations.texts import explain_texts
    from .loading import load_model
    from .render import color_tokens
    from .text import encode_text

    _check_device(args.device)
    if args.force and args.out is None:
        raise ValueError("--force only applies together with --out DIR")
    _refuse_unused_matrix_options(args, report=args.out is not None)
    _check_report_dir(args)

    method_options = _method_options(args)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    progress = args.progress
    if progress is None:                  # a long input: show that work goes on
        lengths = [len(encode_text(loaded, text).ids) for text in args.texts if text.strip()]
        progress = bool(lengths) and max(lengths) > LONG_INPUT_TOKENS
    if progress and args.method in MATRIX_METHODS:
        method_options["progress"] = True
    result = explain_texts(loaded, args.texts, method=args.method, variant=args.variant, layers=args.layers,
                           target=args.target, score=args.score, position=args.position, aggregate=args.aggregate,
                           check=args.check, **method_options)
    if args.channels is not None and args.out is None:
        raise ValueError("--channels draws channels in the report: add --out DIR")
    compared = {method + (f":{variant}" if variant else ""): explain_texts(
        loaded, args.texts, method=method, variant=variant or "unified", layers=args.layers, target=args.target,
        score=args.score,
        position=args.position, check=args.check, **({"aggregate": args.aggregate} if method in ("raw", "rollout")
                                                     else {}))
        for method, variant in args.compare}
    # the decomposed layers of each run (a baseline decomposes them only for the report)
    if args.out is not None:
        from .reports import decompositions_for_report

        decompositions = decompositions_for_report(loaded, result, variant=args.variant, layers=args.layers,
                                                   check=args.check)
    else:
        decompositions = {id(run): run.explanation.decomposition for run in result.runs}

    color = _use_color(args.color)
    print(f"model: {loaded.name} ({type(loaded.model).__name__}, {args.dtype})")
    print(_method_line(args))
    for number, example in enumerate(result, 1):
        tgt = example.target
        print()
        print(f"[{number}] {_echo(example.text)}" if len(result) > 1 else f"text: {_echo(example.text)}")
        print(f"  {_prediction_line(example.prediction)}")
        where = (f"after token {tgt.position} ({example.tokens[tgt.position]!r})" if tgt.position is not None
                 else f"at padded position {tgt.batch_position} (inside the left padding of this text)")
        print(f"  explaining: {tgt.score} (token id {tgt.id}) {where}")
        span = None if args.all_tokens else example.in_span
        tokens, values, span = _characters(example.tokens, example.relevance.tolist(), span)
        inside = [abs(v) for v, keep in zip(values, span or [True] * len(values)) if keep]
        scale = max(inside) if inside else 0.0
        template = ("" if span is None or all(span) else "; the prompt template greyed" if color
                    else "; the prompt template's values in parentheses")
        print(f"  relevance (red +, blue -; normalised by max |r| = {scale:.3g} over the "
              f"{'text' if span is not None else 'prompt'}{template}):")
        print("  " + color_tokens(tokens, values, color=color, span=span))
        if args.words:
            # a word's value is the sum of its tokens' on the tokens' scale: beyond +-1 where several add up
            words = "  ".join(f"{word}[{value / scale if scale else 0.0:+.2f}]" for word, value in example.words())
            print(f"  words (whitespace-separated, their tokens summed, same scale): {words}")
        for key, value in example.diagnostics.items():
            print(f"  {DIAGNOSTICS.get(key, key)}: {value:.3g}")
        for name, other in compared.items():
            alt_tokens, alt_values, alt_span = _characters(example.tokens, other[number - 1].relevance.tolist(), span)
            print(f"  {name}: " + color_tokens(alt_tokens, alt_values, color=color, span=alt_span))

    print()
    runs = [d for d in decompositions.values() if d is not None]
    layers = [layer for d in runs for layer in d.layers]
    if layers:
        print(_error_line(layers, args.variant, runs=len(runs)))
    else:
        print(f"max reconstruction error: n/a (the {args.method} baseline does not decompose the layers)")

    if args.out is not None:
        report = _write_report(args, loaded, result, decompositions, compared)
        print(f"report: {report}")
    return 0


def _method_line(args: argparse.Namespace) -> str:
    """``method: ...   variant: ...   layers: ...`` as printed: a baseline uses no variant (with ``--out`` the
    variant only picks the report's matrices)."""
    from .catalog import BASELINE_METHODS

    line = f"method: {args.method}"
    if args.method not in BASELINE_METHODS:
        line += f"   variant: {args.variant}"
    elif args.out is not None:
        line += f"   variant of the report's matrices: {args.variant}"
    return line + (f"   layers: {','.join(map(str, args.layers))}" if args.layers else "")


def parse_comparisons(text: str) -> list[tuple[str, str | None]]:
    """``"rollout,attribution:s6,grad_x_input"`` -> ``[("rollout", "unified"), ("attribution", "s6"),
    ("grad_x_input", None)]`` (a baseline has no variant)."""
    from .catalog import BASELINE_METHODS

    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        method, _, variant = item.partition(":")
        if method not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {method!r} in --compare; choose from "
                                             f"{', '.join(METHODS)}")
        if method in BASELINE_METHODS and variant:
            raise argparse.ArgumentTypeError(f"{item!r} in --compare: the {method} baseline has no variant")
        out.append((method, None if method in BASELINE_METHODS else variant or "unified"))
    if not out:
        raise argparse.ArgumentTypeError("--compare needs at least one METHOD[:VARIANT]")
    return out


def _echo(text: str) -> str:
    """The text as echoed: quoted, cut after :data:`ECHO_CHARACTERS` characters with its length."""
    if len(text) <= ECHO_CHARACTERS:
        return repr(text)
    return f"{text[:ECHO_CHARACTERS]!r}... ({len(text):,} characters)"


def _characters(tokens: list[str], values: list[float], span: list[bool] | None):
    """Tokens, relevance and span as shown: a token that only continues the previous token's character (its
    display string is empty, see :func:`implicit_attention.text.display_strings`) is shown with that token,
    their relevance summed (relevance adds up over tokens)."""
    shown, summed, keep = [], [], []
    flags = [True] * len(tokens) if span is None else list(span)
    for token, value, flag in zip(tokens, values, flags):
        if token == "" and shown:
            summed[-1] += value
            continue
        shown.append(token)
        summed.append(value)
        keep.append(flag)
    return shown, summed, None if span is None else keep


#: What each method's diagnostics mean, as printed.
DIAGNOSTICS = {
    "convergence_delta": "convergence delta (relevance sum minus the score difference to the baseline)",
    "conservation_delta": "conservation delta (the score minus the relevance sum; biases absorb it)",
}


def _error_line(layers, variant: str, runs: int = 1) -> str:
    """The reconstruction check of the decomposed ``layers`` in one line, saying when a variant is an
    ablation or channels were sampled; ``runs`` > 1 when the texts ran one at a time (a model that
    reads padding), each decomposing the same layers."""
    worst = max(layers, key=lambda layer: layer.error)
    count = len({layer.index for layer in layers})
    which = (f"worst of {count} decomposed layer{'s' if count != 1 else ''}: layer {worst.index}" if worst.error > 0
             else f"all {count} decomposed layer{'s' if count != 1 else ''}")
    line = (f"max reconstruction error: {worst.error:.2e} ({which}; variant {variant}"
            + (f"; over {runs} runs, one a text: this model reads padding" if runs > 1 else "") + ")")
    if not all(layer.exact for layer in layers):
        line += f"; {variant} is an ablation, not an exact identity: the error measures what it leaves out"
    if any(layer.error_channels < layer.channels for layer in layers):
        line += "; long input: a sample of channels was checked"
    elif any(getattr(layer, "error_rows", None) is not None for layer in layers):
        line += "; long input: a sample of rows (every channel) was checked"
    return line


def _write_report(args: argparse.Namespace, loaded, result, decompositions: dict, compared: dict) -> str:
    """``report.html`` and ``explanation.json`` of an ``explain`` run (:func:`~.reports.write_text_report`)."""
    from .reports import write_text_report

    settings = {"layers": ",".join(map(str, args.layers)) if args.layers else "all",
                "aggregate": args.aggregate if args.method in ("raw", "rollout") else None,
                "position": args.position, "target": args.target, "score": result[0].target.score,
                "dtype": args.dtype,
                "check": args.check, "device": str(loaded.device)}
    return str(write_text_report(args.out, loaded, result, decompositions, method=args.method, variant=args.variant,
                                 settings=settings, compared=compared, channels=args.channels,
                                 channel_layer=args.channel_layer, overwrite=args.force))


def _layers_of(model):
    from .architectures import find_layers
    return find_layers(model)


# ----------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from .architectures import skipped_architectures
    from .catalog import BASELINE_METHODS, MATRIX_METHODS
    from .loading import load_model

    if args.architectures:
        return print_architectures()
    _check_device(args.device)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model = loaded.model
    found = _layers_of(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {loaded.name}")
    print(f"class: {type(model).__name__} ({params:,} parameters, {args.dtype}, {loaded.device})")
    if loaded.task is not None:
        words = ", ".join(f"{label} = {loaded.task['label_words'][label]!r} (token {tid})"
                          for label, tid in loaded.label_ids.items())
        print(f"task: prompt {loaded.task['template']!r}; labels: {words}")
        for key in ("test_accuracy", "validation_accuracy"):
            if key in loaded.task:
                print(f"  {key.replace('_', ' ')}: {loaded.task[key]}")
    print(f"decomposable token-mixing layers: {len(found)}")
    rows = [("index", "module", "architecture", "channels")]
    for i, (name, module, arch) in enumerate(found):
        out_module = getattr(module, arch.output_module, None)
        channels = getattr(out_module, "in_features", None)
        rows.append((str(i), name, arch.name, str(channels) if channels is not None else "?"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  " + "  ".join(cell.rjust(w) if c in (0, 3) else cell.ljust(w)
                               for c, (cell, w) in enumerate(zip(r, widths))).rstrip())
    seen = []
    for _, _, arch in found:
        if arch not in seen:
            seen.append(arch)
    for arch in seen:
        variants = ", ".join(v + (" (default, exact)" if i == 0 else " (exact)" if arch.is_exact(v) else "")
                             for i, v in enumerate(arch.variants))
        print(f"variants ({arch.name}): {variants}")
    if any("mamba" in arch.name and "no_gate" in arch.variants for arch in seen):
        print(f"note: {GATE_CANCELS}")
    print(f"methods: {', '.join(MATRIX_METHODS)} (implicit attention); {', '.join(BASELINE_METHODS)} (baselines)")
    for package, reason in skipped_architectures().items():
        print(f"not available: the {package} architectures ({reason})")
    return 0


def print_architectures() -> int:
    """Every registered architecture: its name, the model classes that contain it, its variants."""
    from .architectures import architectures, skipped_architectures

    for arch in architectures():
        variants = ", ".join(v + (" (default, exact)" if i == 0 else " (exact)" if arch.is_exact(v) else "")
                             for i, v in enumerate(arch.variants))
        print(f"{arch.name}: {', '.join(arch.model_classes) or '(layers inside the models listed above)'}")
        print(f"  variants: {variants}")
    for package, reason in skipped_architectures().items():
        print(f"not available: the {package} architectures ({reason})")
    return 0


def _check_report_dir(args: argparse.Namespace) -> None:
    """Before any work: ``--out`` is a directory that is empty (unless ``--force``) and writable."""
    if args.out is None:
        return
    out = os.path.expanduser(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    if not args.force and os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--out directory {args.out!r} is not empty; choose a new directory or pass --force "
                         "to replace the report files in it (other files are kept)")
    _check_out_writable(args.out)


# --------------------------------------------------------------------------------- explain-image
def cmd_explain_image(args: argparse.Namespace) -> int:
    from .bundled import BUNDLED_IMAGE_MODEL, BUNDLED_IMAGE_MODELS, bundled_image_model_path
    from .vision.images import image_files

    model_name = args.model
    # no --model: the bundled ViM; a bundled model's name (not a folder here): that model
    bundled = BUNDLED_IMAGE_MODEL if args.model is None else args.model
    if bundled in BUNDLED_IMAGE_MODELS and (args.model is None or not os.path.isdir(args.model)):
        args.model = str(bundled_image_model_path(bundled))
        model_name = f"{bundled} (bundled)"
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise ValueError(f"the bundled image model {bundled!r} is missing: expected its files in "
                             f"{args.model}; reinstall the package or pass --model DIR")
    elif not os.path.isdir(os.path.expanduser(args.model)) and (
            args.model.count("/") != 1 or args.model.startswith((".", "/", "~"))):
        raise ValueError(f"--model {args.model!r}: no such directory and not a bundled image model (those are "
                         f"{', '.join(BUNDLED_IMAGE_MODELS)}); a Hub id looks like 'owner/name'")
    _check_device(args.device)
    if args.force and args.out is None:
        raise ValueError("--force only applies together with --out DIR")
    _check_report_dir(args)
    _refuse_unused_matrix_options(args, report=args.out is not None)
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    files = image_files(args.images, args.limit)
    method_options = _method_options(args)

    from tqdm.auto import tqdm

    from .loading import DTYPES
    from .vision.classifiers import load_classifier
    from .vision.evaluation import patch_grid
    from .vision.images import Preprocessing, explain_image, label_of, resolve_class

    model = load_classifier(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if getattr(model, "main_input_name", None) != "pixel_values":
        raise ValueError(f"{args.model}: {type(model).__name__} is not an image model (it reads "
                         f"{getattr(model, 'main_input_name', '?')}); explain texts with 'explain'")
    preprocessing = Preprocessing.for_model(model, args.model if os.path.isdir(args.model) else None)
    target = resolve_class(model, args.target)
    matrices = args.out is not None and (args.matrices if args.matrices is not None else len(files) <= 8)
    options = dict(variant=args.variant, layers=args.layers, check=args.check, **method_options)
    if args.method in ("raw", "rollout"):
        options["aggregate"] = args.aggregate
    grid = patch_grid(model)
    print(f"model: {model_name} ({type(model).__name__}, {args.dtype}; {preprocessing.channels} channel(s), "
          f"{preprocessing.size[0]} x {preprocessing.size[1]} pixels, {grid[0]} x {grid[1]} patches)")
    print(_method_line(args))
    progress = args.progress if args.progress is not None else len(files) > 1
    explained = []
    for path in tqdm(files, unit="image", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        item = explain_image(model, path, preprocessing, method=args.method, target=target,
                             decompose_for_report=args.out is not None, **options)
        explained.append(item)
        top = next(iter(item.probabilities))
        label = int(item.explanation.target.ids[0])
        cells = ", ".join(f"({r},{c})" for r, c in item.top_patches(3, grid))
        message = (f"{path}: {top} (p={item.probabilities[top]:.4f}); explaining {label_of(model, label)!r} "
                   f"(class {label}); most relevant patches (row, column): {cells}")
        tqdm.write(message, file=sys.stdout) if progress else print(message)
    layers = [layer for item in explained for d in (item.decomposition or item.explanation.decomposition,)
              if d is not None for layer in d.layers]
    print(_error_line(layers, args.variant) if layers else
          f"max reconstruction error: n/a (the {args.method} baseline does not decompose the layers)")
    if args.out is not None:
        print(f"report: {_write_image_report(args, model, explained, matrices, model_name)}")
    return 0


def _write_image_report(args: argparse.Namespace, model, explained, matrices: bool, model_name: str) -> str:
    from .render import ReportLayer, write_report
    from .render import sampled_rows as _sampled_rows
    from .vision.images import report_example

    names = {name: arch.name for name, _, arch in _layers_of(model)}
    runs = [item.decomposition for item in explained]
    layers = [ReportLayer(index=layer.index, name=layer.name, error=max(float(d.layers[i].error) for d in runs),
                          architecture=names.get(layer.name, ""), exact=bool(layer.exact), channels=layer.channels,
                          error_channels=min(d.layers[i].error_channels for d in runs),
                          error_rows=_sampled_rows(d.layers[i] for d in runs))
              for i, layer in enumerate(runs[0].layers)] if runs and runs[0] is not None else []
    examples = [report_example(model, item, number, matrices=matrices) for number, item in enumerate(explained)]
    settings = {"layers": ",".join(map(str, args.layers)) if args.layers else "all",
                "aggregate": args.aggregate if args.method in ("raw", "rollout") else None,
                "target": args.target, "dtype": args.dtype, "check": args.check, "device": args.device or "cpu",
                "images": args.images}
    return str(write_report(args.out, examples=examples, layers=layers, method=args.method, variant=args.variant,
                            model=model_name, settings=settings, overwrite=args.force))


# ------------------------------------------------------------------------------- explain-dataset
def cmd_explain_dataset(args: argparse.Namespace) -> int:
    from .dataset import DatasetOptions, parse_label_map, run_dataset

    _check_device(args.device)
    _refuse_unused_matrix_options(args, report=None)
    _check_out_writable(args.out)
    if args.reports < 0:
        raise ValueError(f"--reports must be 0 or more, got {args.reports}")
    # --text-column / --text-field (and the label ones) name the same key of a CSV row or JSON object
    texts = {args.text_column, args.text_field} - {"text"}
    labels = {args.label_column, args.label_field} - {None}
    if len(texts) > 1 or len(labels) > 1:
        raise ValueError("--text-column/--text-field (and --label-column/--label-field) give two different names")
    options = DatasetOptions(
        path=args.file, out=os.path.expanduser(args.out), format=args.format,
        text_key=texts.pop() if texts else "text", label_key=labels.pop() if labels else None,
        label_map=parse_label_map(args.label_map), model=args.model, dtype=args.dtype, device=args.device,
        keep_columns=args.keep_columns,
        device_map=args.device_map, method=args.method, variant=args.variant, layers=args.layers,
        aggregate=args.aggregate, check=args.check, method_options=_method_options(args), target=args.target,
        score=args.score, batch_size=args.batch_size, length_window=args.length_window,
        limit=args.limit, force=args.force, progress=args.progress, reports=args.reports)
    summary = run_dataset(options)
    if summary is None:  # not rank 0 of a torchrun run
        return 0
    counts = summary["counts"]
    speed = summary["examples_per_second"]
    print(f"model: {summary['model']}   method: {summary['method']}   variant: {summary['variant']}")
    print(f"explained: {counts['explained']} of {counts['inputs']} inputs ({counts['explained_this_run']} in this run, "
          f"{counts['empty_skipped']} empty skipped) with {summary['processes']} process(es) in "
          f"{summary['elapsed_seconds']:.1f} s" + (f" ({speed:.2f} texts/s explaining)" if speed else ""))
    if summary["accuracy"] is not None:
        print(f"accuracy: {summary['accuracy']:.4f} ({counts['correct']}/{counts['labelled']} labelled)")
    if summary["reconstruction_error"] is not None:
        err = summary["reconstruction_error"]
        print(f"reconstruction error: max {err['max']:.2e}, mean {err['mean']:.2e}")
    print(f"results: {os.path.join(options.out, 'results.jsonl')}")
    print(f"summary: {os.path.join(options.out, 'summary.json')}")
    print(f"page: {os.path.join(options.out, 'index.html')} (the examples, sortable, tokens coloured by relevance)")
    return 0


# --------------------------------------------------------------------------------------- amplify
AMPLIFY_EPILOG = """\
what it does (Krishna et al. 2023, AMPLIFY):
  1. the proxy scores every pool example by its misclassification confidence (the largest probability of
     a wrong label minus the gold label's) and --selection picks --shots demonstrations;
  2. the proxy's explanation (--rationale, --variant) of each demonstration's gold label gives its --k
     most relevant words, written as "The key words: w1, w2 and w3 are important clues to predict
     'positive' as the correct answer.";
  3. each query gets the prompt
       Input: <demonstration>\\nRationale: <rationale>\\nLabel: <label word>\\n\\n ... Input: <query>\\nLabel:
     and the target predicts the label whose word's first token has the largest next-token logit.

data: --pool and --queries take a Rotten Tomatoes split name (train, validation, test; the defaults are
train and test) or a .csv/.tsv/.jsonl file with a text and a label column (--text-column,
--label-column); labels are read as by explain-dataset (1/0, positive/negative, or --label-map).

examples:
  # the bundled sentiment Mamba as proxy and target, 8 demonstrations, 5 words each, 200 test queries
  implicit-attention amplify --limit 200 --out amplify.json

  # the no-rationale baseline and the random-words control, on the same demonstrations
  implicit-attention amplify --rationale none --limit 200
  implicit-attention amplify --rationale random --limit 200

  # another explanation source, a real LLM as the target (on a GPU), labelled files
  implicit-attention amplify --rationale attribution --variant s6 --target meta-llama/Llama-3.2-1B \\
      --pool pool.csv --queries test.csv --label-column sentiment --device cuda

exit status: 0 on success, 2 on a usage error or an error reported by the library.
"""


def _add_amplify_parser(sub) -> None:
    """The ``amplify`` subcommand."""
    from .catalog import METHODS as methods

    am = sub.add_parser(
        "amplify", help="AMPLIFY: explanations as in-context rationales for a target LM (prompt, accuracy)",
        description="Select few-shot demonstrations from a labelled pool with a proxy model (the ones it "
                    "misclassifies most confidently), turn the proxy's explanation of each into a rationale "
                    "naming its top-k words, and measure a target causal LM's accuracy on the queries with "
                    "that prompt. Prints the prompt of the first query and the accuracy with its bootstrap 95% "
                    "interval.",
        epilog=AMPLIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    am.add_argument("--proxy", metavar="NAME_OR_DIR", default=None,
                    help="the explained model that selects and explains the demonstrations: a task model (with a "
                         "task.json) or a classifier; default: the bundled sentiment model rt-sentiment-mamba")
    am.add_argument("--target", metavar="NAME_OR_DIR", default=None,
                    help="the causal LM that reads the prompts (a directory or a Hub id; any AutoModelForCausalLM); "
                         "default: the proxy")
    am.add_argument("--dtype", choices=MODEL_DTYPES, default="float32",
                    help="dtype of both models (default: %(default)s)")
    am.add_argument("--device", default=None, help="device for both models, e.g. cpu or cuda:0 (default: cpu)")
    am.add_argument("--pool", default="train", metavar="SPLIT_OR_FILE",
                    help="the labelled candidates for the demonstrations: a Rotten Tomatoes split or a "
                         ".csv/.tsv/.jsonl file (default: %(default)s)")
    am.add_argument("--queries", default="test", metavar="SPLIT_OR_FILE",
                    help="the labelled queries the target predicts, as --pool (default: %(default)s)")
    am.add_argument("--text-column", default="text", metavar="NAME",
                    help="CSV column / JSONL field of the text in --pool and --queries files (default: %(default)s)")
    am.add_argument("--label-column", default="label", metavar="NAME",
                    help="CSV column / JSONL field of the gold label (default: %(default)s)")
    am.add_argument("--label-map", action="append", default=None, metavar="GOLD=LABEL,...",
                    help="map gold values to the proxy's label names, e.g. fresh=positive,rotten=negative")
    am.add_argument("--label-words", default=None, metavar="LABEL=WORD,...",
                    help="the word the prompt writes for each label, e.g. positive=great,negative=terrible "
                         "(default: the label names); the target scores each word's first token after 'Label:'")
    am.add_argument("--shots", type=int, default=8, metavar="N", help="demonstrations in the prompt (default: %(default)s)")
    am.add_argument("--k", type=int, default=5, metavar="K", help="words per rationale (default: %(default)s)")
    am.add_argument("--selection", choices=("mcs", "balanced", "random"), default="mcs",
                    help="mcs: the highest misclassification confidence first (AMPLIFY); balanced: the same with "
                         "equal counts per label; random: a seeded sample (default: %(default)s)")
    am.add_argument("--rationale", choices=(*methods, "none"), default="attribution",
                    help="the explanation method that writes the rationales, or none (no rationale: the plain "
                         "few-shot baseline); random here is k random words of the text (a control), not the "
                         "random-relevance baseline (default: %(default)s)")
    am.add_argument("--variant", choices=VARIANTS, default="unified",
                    help="implicit attention formulation of the rationale's method (default: %(default)s; s6 is "
                         "the S6-only hidden attention)")
    am.add_argument("--option", dest="options", action="append", type=parse_method_option, metavar="NAME=VALUE",
                    help=_method_options_help())
    am.add_argument("--pool-limit", type=int, default=None, metavar="N",
                    help="only the first N pool examples (the proxy scores every one; default: all)")
    am.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N queries (default: all)")
    am.add_argument("--seed", type=int, default=0,
                    help="seed of the random selection, the random words and the bootstrap (default: %(default)s)")
    am.add_argument("--max-tokens", type=int, default=None, metavar="N",
                    help="cut longer prompts on the left, with a warning (default: the target's context length)")
    am.add_argument("--out", metavar="FILE", default=None,
                    help="write the results as JSON: accuracy, interval, settings, the demonstrations with their "
                         "rationales, the first prompt and every query's prediction (refused if FILE exists, "
                         "unless --force)")
    am.add_argument("--force", action="store_true", help="with --out: replace an existing FILE")
    am.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="a progress bar over the queries on stderr (default: on)")
    am.set_defaults(handler=cmd_amplify)


def _amplify_examples(source: str, args: argparse.Namespace, limit: int | None, what: str) -> list[tuple[str, str]]:
    """``(text, gold)`` pairs of ``--pool`` / ``--queries``: a Rotten Tomatoes split or a labelled file."""
    from .data import ROTTEN_TOMATOES_SPLITS, load_rotten_tomatoes

    if limit is not None and limit < 1:
        raise ValueError(f"--{'pool-limit' if what == 'pool' else 'limit'} must be at least 1, got {limit}")
    if source in ROTTEN_TOMATOES_SPLITS and not os.path.isfile(source):
        return [(text, str(label)) for text, label in load_rotten_tomatoes(source)[:limit]]
    from .dataset.formats import detect_format, read_inputs

    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise ValueError(f"--{what} {source!r}: no such file and not a Rotten Tomatoes split "
                         f"({', '.join(ROTTEN_TOMATOES_SPLITS)})")
    if detect_format(path) == "text":
        raise ValueError(f"--{what} {source!r}: a text file has no labels; use a .csv, .tsv or .jsonl file with a "
                         f"{args.label_column!r} column")
    records = [r for r in read_inputs(path, text_key=args.text_column, label_key=args.label_column, limit=limit)
               if not r.empty]
    unlabelled = next((r.index for r in records if r.gold is None), None)
    if unlabelled is not None:
        raise ValueError(f"--{what} {source!r}: input {unlabelled} has no {args.label_column!r} label")
    return [(r.text, r.gold) for r in records]


def cmd_amplify(args: argparse.Namespace) -> int:
    import json

    from .dataset import parse_label_map

    _check_device(args.device)
    for name in ("shots", "k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.rationale in ("none", "random") and (args.variant != "unified" or args.options):
        raise ValueError(f"--variant and --option apply to an explanation method, not to --rationale {args.rationale}")
    options = dict(args.options or [])
    if args.rationale not in ("none", "random"):
        check_method_options(args.rationale, options)
        from .catalog import BASELINE_METHODS

        if args.rationale in BASELINE_METHODS and args.variant != "unified":
            raise ValueError(f"--variant does not apply to the {args.rationale} baseline: it decomposes no layer")
    if args.force and args.out is None:
        raise ValueError("--force only applies together with --out FILE")
    if args.out is not None:
        out = os.path.expanduser(args.out)
        if os.path.isdir(out):
            raise ValueError(f"--out {args.out!r} is a directory; give a file name such as amplify.json")
        if os.path.exists(out) and not args.force:
            raise ValueError(f"--out {args.out!r} exists; choose another file or pass --force to replace it")
        _check_out_writable(os.path.dirname(os.path.abspath(out)))
    label_words = None
    if args.label_words:
        label_words = {}
        for part in (p for p in args.label_words.split(",") if p.strip()):
            name, sep, word = part.partition("=")
            if not sep or not name.strip() or not word.strip():
                raise ValueError(f"--label-words entries look like LABEL=WORD (e.g. positive=great), got {part!r}")
            label_words[name.strip()] = word.strip()
    pool = _amplify_examples(args.pool, args, args.pool_limit, "pool")
    queries = _amplify_examples(args.queries, args, args.limit, "queries")
    if args.shots > len(pool):  # refused before any model is loaded
        raise ValueError(f"shots must be between 1 and the pool size {len(pool)}, got {args.shots}")

    from .applications.amplify import amplify, load_target
    from .loading import load_model

    proxy = load_model(args.proxy, dtype=args.dtype, device=args.device)
    target = None if args.target is None else load_target(args.target, dtype=args.dtype, device=args.device)
    target_name = proxy.name if target is None else getattr(target, "name", None) or args.target
    print(f"proxy: {proxy.name}   target: {target_name}{' (the proxy)' if target is None else ''}")
    variant = f" ({args.variant})" if args.rationale not in ("none", "random", *_baselines()) else ""
    print(f"pool: {args.pool} ({len(pool)} examples)   queries: {args.queries} ({len(queries)})   "
          f"selection: {args.selection}   shots: {args.shots}   rationale: {args.rationale}{variant}   k: {args.k}")
    result = amplify(proxy, pool, queries, target=target, shots=args.shots, k=args.k, selection=args.selection,
                     rationale=args.rationale, variant=args.variant, label_words=label_words,
                     label_map=parse_label_map(args.label_map), seed=args.seed, max_tokens=args.max_tokens,
                     method_options=options, progress=args.progress)
    result.settings.update(proxy=proxy.name, target=target_name, pool=args.pool, queries_from=args.queries,
                           dtype=args.dtype, device=args.device or "cpu")
    print()
    print("prompt of the first query:")
    print(result.first_prompt)
    print()
    interval = result.accuracy
    correct = sum(result.correct)
    print(f"target accuracy: {interval.mean:.4f} [{interval.low:.4f}, {interval.high:.4f}] "
          f"({int(interval.confidence * 100)}% bootstrap interval; {correct}/{interval.n} queries correct)")
    if args.out is not None:
        with open(os.path.expanduser(args.out), "w", encoding="utf-8") as handle:
            json.dump(result.to_dict(), handle, indent=2)
            handle.write("\n")
        print(f"results: {args.out}")
    return 0


def _baselines() -> tuple[str, ...]:
    from .catalog import BASELINE_METHODS

    return BASELINE_METHODS


# ----------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 usage or library error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with _quiet_transformers(), _one_line_warnings():
            status = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at the interpreter's exit
        return status
    except BrokenPipeError:  # e.g. `implicit-attention explain ... | head`: the reader has gone; exit quietly
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ReconstructionError as exc:
        print(f"error: {exc} (on the command line: --no-check)", file=sys.stderr)
        return 2
    except (ImplicitAttentionError, ValueError, IndexError, OSError, NotImplementedError) as exc:
        message = str(exc).strip() or type(exc).__name__
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
