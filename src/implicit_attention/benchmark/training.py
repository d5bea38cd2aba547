"""Training the zoo: one shared tokenizer, language-model pre-training, then prompted classification.

Every model of :data:`~implicit_attention.benchmark.zoo.ZOO` goes through the same stages, each
written to its own directory under a work directory and skipped when already there, so that an
interrupted run resumes where it stopped:

1. ``tokenizer/``: a lower-cased byte-level BPE tokenizer (``tokenizers``) trained once on the
   English corpus, the Rotten Tomatoes training sentences and the ground-truth training texts,
   shared by every model;
2. ``<model>/pretrained/``: next-token language modelling on the English corpus, packed into
   ``seq_len``-token rows;
3. ``<model>/<task>/``: from the pre-trained weights, a prompted classification (``"{text} sentiment:"``
   -> ``" positive"`` | ``" negative"``), cross-entropy of the label word plus a small
   next-token loss over the prompt; the checkpoint with the best validation accuracy is kept, then
   saved, re-loaded in float16 (as shipped) and scored on the test split.

A task is a :class:`PromptTask`: its template, label words and splits of ``(text, label)`` pairs.
The saved directories load with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and carry a
``task.json`` (see :mod:`implicit_attention.loading`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .zoo import ZOO_LAYERS, ZOO_WIDTH, build_model, parameter_count

__all__ = [
    "PretrainSettings",
    "PromptTask",
    "SPECIAL_TOKENS",
    "TaskSettings",
    "calibrate_task_model",
    "calibration_error",
    "evaluate_task",
    "fit_temperature",
    "label_scores",
    "pretrain",
    "train_task",
    "train_tokenizer",
]

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


@dataclass(frozen=True)
class PromptTask:
    """A classification posed as the next token after a prompt.

    Attributes:
        name: directory name of the trained models (``"sentiment"``).
        template: the prompt with one ``{text}`` placeholder.
        label_names: label index -> name (``("negative", "positive")``).
        label_words: label index -> its word (``(" negative", " positive")``), one token each.
        splits: ``{"train" | "validation" | "test": [(text, label), ...]}``.
        description: one sentence for ``task.json``.
        extra: more ``task.json`` entries (data set, split rule, ...).
    """

    name: str
    template: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    splits: dict[str, list[tuple[str, int]]] = field(repr=False)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def prompt_lines(self) -> list[str]:
        """The template followed by each label word: tokenizer training includes these so each
        label word is one token."""
        return [self.template.format(text="") + word for word in self.label_words]


@dataclass(frozen=True)
class PretrainSettings:
    """Language-model pre-training: ``steps`` AdamW steps of ``batch_size`` rows of ``seq_len`` tokens."""

    steps: int = 700
    # 128 rows: 11.5 M tokens in 700 steps, 4.5 passes over the corpus (32 rows: 1.1 passes, which
    # left GPT-2 and RetNet near 71% on the sentiment test); a small model's step costs about the same
    batch_size: int = 128
    seq_len: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0


@dataclass(frozen=True)
class TaskSettings:
    """Prompted classification fine-tuning (validation ``evals_per_epoch`` times per epoch)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    lm_weight: float = 0.1
    max_tokens: int = 64
    evals_per_epoch: int = 2
    seed: int = 0
    #: knowledge distillation from a teacher's label probabilities (:func:`read_teacher_labels`): the label
    #: loss is ``(1 - w) * CE(true label) + w * T^2 * KL(teacher_T || student_T)`` (0: the true labels alone)
    distill_weight: float = 0.0
    distill_temperature: float = 2.0


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, extra_lines: Sequence[str] = ()):
    """A lower-cased byte-level BPE tokenizer (NFKC, curly quotes folded) with ``<pad> <s> </s> <unk>``
    as ids 0-3 and ``<s>`` prepended to every encoded text.

    Returns:
        a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Replace(Regex("[\u2018\u2019\u201b`]"), "'"),
        normalizers.Replace(Regex("[\u201c\u201d\u201f]"), '"'),
        normalizers.Lowercase(),
    ])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the prompt pieces are repeated so that the template and label words become whole tokens
    # even in a small vocabulary (label_token_ids checks it)
    tok.train_from_iterator(list(texts) + list(extra_lines) * 2000, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=SPECIAL_TOKENS["eos"],
                                   unk_token=SPECIAL_TOKENS["unk"], pad_token=SPECIAL_TOKENS["pad"],
                                   padding_side="right", model_max_length=1024)


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``save_pretrained`` plus a ``tokenizer_config.json`` that ``AutoTokenizer`` loads as-is."""
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["padding_side"] = "right"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def special_token_ids(tokenizer) -> dict[str, int]:
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def label_token_ids(tokenizer, task: PromptTask) -> list[int]:
    """The token id of each label word; raises if a word is not one token after the prompt."""
    ids = []
    prompt = tokenizer(task.template.format(text="a fine day"))["input_ids"]
    for word in task.label_words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        full = tokenizer(task.template.format(text="a fine day") + word)["input_ids"]
        if len(pieces) != 1 or full != prompt + pieces:
            raise ValueError(f"label word {word!r} of task {task.name!r} is not one token after the prompt")
        ids.append(pieces[0])
    return ids


# --------------------------------------------------------------------------- speed-ups for training


def parallel_rwkv4_wkv(time_decay, time_first, key, value, state=None, return_state=False):
    """RWKV-4's WKV in parallel form, for training: per channel it is a causal softmax attention,
    ``out_t = sum_i softmax_i(S[t, i]) v_i`` with ``S[t, i] = (t - 1 - i) w + k_i`` for ``i < t``,
    ``S[t, t] = u + k_t`` and ``w = -exp(time_decay)``, ``u = time_first``: the same numbers as
    ``transformers``' token loop (checked by ``tests/test_zoo.py``) with one kernel instead of ``L``.

    Memory is ``[B, L, L, C]``, which is small at the zoo's lengths. Falls back to the stock loop
    when a state is passed or asked for (generation).
    """
    from transformers.models.rwkv import modeling_rwkv

    if state is not None or return_state:
        return modeling_rwkv.rwkv_linear_attention_cpu(time_decay, time_first, key, value, state, return_state)
    length = key.shape[1]
    steps = torch.arange(length, device=key.device)
    distance = (steps[:, None] - 1 - steps[None, :]).float()                     # [t, i]: t - 1 - i
    decay = -torch.exp(time_decay.float())                                       # [C]
    scores = distance[None, :, :, None] * decay + key.float()[:, None, :, :]     # [B, t, i, C]
    diagonal = time_first.float() + key.float()                                  # [B, L, C]
    eye = torch.eye(length, dtype=torch.bool, device=key.device)[None, :, :, None]
    scores = torch.where(eye, diagonal[:, :, None, :], scores)
    scores = scores.masked_fill((steps[None, :] > steps[:, None])[None, :, :, None], float("-inf"))
    weights = scores.softmax(dim=2)
    output = torch.einsum("btic,bic->btc", weights, value.float())
    return output.to(key.dtype), None


def enable_fast_training(model: torch.nn.Module) -> list[str]:
    """Switch on parallel forms for training: mambapy's scan for Mamba mixers (``transformers``
    supports it; when the package is installed) and :func:`parallel_rwkv4_wkv` for RWKV-4.
    Returns what was switched on. Saved configs keep the defaults; :func:`disable_fast_training`
    restores the stock code before the shipped copy is evaluated."""
    import importlib.util

    switched = []
    if importlib.util.find_spec("mambapy") is not None:
        for name, module in model.named_modules():
            if hasattr(module, "use_mambapy"):
                module.use_mambapy = True
                switched.append(name)
    if getattr(model.config, "model_type", None) == "rwkv":
        from transformers.models.rwkv import modeling_rwkv

        if modeling_rwkv.rwkv_linear_attention is not parallel_rwkv4_wkv:
            _STOCK["rwkv4"] = modeling_rwkv.rwkv_linear_attention
        modeling_rwkv.rwkv_linear_attention = parallel_rwkv4_wkv
        switched.append("rwkv4 parallel wkv")
    return switched


def disable_fast_training(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "use_mambapy"):
            module.use_mambapy = False
    if getattr(model.config, "model_type", None) == "rwkv" and "rwkv4" in _STOCK:
        from transformers.models.rwkv import modeling_rwkv

        modeling_rwkv.rwkv_linear_attention = _STOCK["rwkv4"]


_STOCK: dict[str, Callable] = {}  # the stock functions replaced while training


# --------------------------------------------------------------------------- schedules and batches


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 5% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases, decays or conv taps)."""
    decay, other = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "conv" not in name else other).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def pack_tokens(tokenizer, passages: Sequence[str], seq_len: int) -> torch.Tensor:
    """Every passage as ``<s> tokens``, concatenated and cut into rows: ``[rows, seq_len]``."""
    stream: list[int] = []
    for start in range(0, len(passages), 1000):
        for ids in tokenizer(list(passages[start:start + 1000]))["input_ids"]:
            stream.extend(ids)
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


Example = tuple[list[int], int]


def encode_task(tokenizer, task: PromptTask, split: str, max_tokens: int) -> list[Example]:
    """``<s> text[:max_tokens] suffix`` token ids and the label, for every example of a split."""
    prefix, suffix = task.template.split("{text}")
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    texts = [text for text, _ in task.splits[split]]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [([tokenizer.bos_token_id, *prefix_ids, *ids[:max_tokens], *suffix_ids], label)
            for ids, (_, label) in zip(encoded, task.splits[split])]


def make_batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, L]`` ids, the last prompt position ``[B]`` and the labels ``[B]``."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    last = torch.tensor([len(ids) - 1 for ids, _ in examples])
    labels = torch.tensor([label for _, label in examples])
    return input_ids, last, labels


def length_bucketed_batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffle, sort chunks of 50 batches by length (less padding), cut into batches, shuffle them."""
    order = list(examples)
    rng.shuffle(order)
    chunk = batch_size * 50
    batches: list[list[Example]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda ex: len(ex[0]))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------- distillation


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)``, averaged over the batch (Hinton et al. 2015): ``student_logits``
    ``[B, labels]``, ``teacher_probs`` ``[B, labels]``; both softened by the temperature ``T`` (the teacher's
    as ``softmax(log p / T)``). ``T^2`` keeps the gradients' scale comparable across temperatures."""
    teacher = F.softmax(teacher_probs.clamp_min(1e-12).log() / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(student, teacher, reduction="batchmean")


def split_digest(task: PromptTask, split: str) -> str:
    """SHA-256 of a split's texts and labels, in order: a teacher's labels belong to exactly these examples."""
    joined = "\n".join(f"{label}\t{text}" for text, label in task.splits[split])
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def read_teacher_labels(path: str | Path, task: PromptTask, split: str = "train") -> torch.Tensor:
    """``[N, labels]`` a teacher's label probabilities for every example of ``split`` (the JSON file of
    :func:`~.reference.write_teacher_labels`), in the split's order.

    Raises:
        ValueError: the file is for another task, split, label order or other examples.
    """
    record = json.loads(Path(path).read_text())
    expected = {"task": task.name, "split": split, "labels": list(task.label_names),
                "examples_sha256": split_digest(task, split)}
    wrong = [key for key, value in expected.items() if record.get(key) != value]
    if wrong:
        raise ValueError(f"{path}: the teacher's labels do not belong to this {split} split "
                         f"(different {', '.join(wrong)}): write them again for it")
    probs = torch.tensor(record["probabilities"], dtype=torch.float32)
    if probs.shape != (len(task.splits[split]), len(task.label_names)):
        raise ValueError(f"{path}: {tuple(probs.shape)} probabilities for {len(task.splits[split])} examples")
    return probs


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
@torch.no_grad()
def label_scores(model, examples: Sequence[Example], label_ids: Sequence[int], pad_id: int,
                 batch_size: int = 128) -> torch.Tensor:
    """The label words' logits at the last prompt position: ``[N, labels]`` (input order)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out = torch.empty(len(examples), len(label_ids))
    pair = torch.tensor(list(label_ids), device=device)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        input_ids, last, _ = make_batch([examples[i] for i in index], pad_id)
        logits = model(input_ids.to(device), use_cache=False).logits.float()
        out[index] = logits[torch.arange(len(index), device=device), last.to(device)][:, pair].cpu()
    return out


def label_probabilities(model, examples: Sequence[Example], label_ids: Sequence[int], pad_id: int,
                        batch_size: int = 128) -> torch.Tensor:
    """Softmax over the label words' logits at the last prompt position: ``[N, labels]`` (input order)."""
    return label_scores(model, examples, label_ids, pad_id, batch_size).softmax(-1)


def fit_temperature(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` minimising the mean negative log-likelihood of ``softmax(scores / T)``
    (temperature scaling, Guo et al. 2017): a golden-section search over ``log T`` in ``[-5, 5]``
    (the NLL is convex in ``1 / T``, so the search finds its minimum)."""
    scores, labels = scores.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(scores / math.exp(log_t), labels))

    low, high = -5.0, 5.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    while high - low > 1e-9:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


def calibrate_task_model(model_dir: str | Path, task: PromptTask, *, device: str = "cpu") -> dict[str, Any]:
    """Fit the temperature of a trained task model on its task's validation split and record it in its
    ``task.json`` (``temperature``, and ``calibration``: the test ECE and NLL before and after);
    :func:`implicit_attention.text.predict_label` divides the label logits by it. The prediction
    (the argmax) and every explanation are unchanged: only the probabilities shown are calibrated."""
    from ..loading import load_model

    loaded = load_model(model_dir, device=device)
    task_file = Path(model_dir) / "task.json"
    record = json.loads(task_file.read_text())
    max_tokens = int(record.get("max_sentence_tokens", TaskSettings.max_tokens))
    label_ids = [loaded.label_ids[name] for name in loaded.labels]
    scores = {split: label_scores(loaded.model, encode_task(loaded.tokenizer, task, split, max_tokens), label_ids,
                                  loaded.pad_token_id) for split in ("validation", "test")}
    labels = {split: torch.tensor([label for _, label in task.splits[split]]) for split in scores}
    temperature = fit_temperature(scores["validation"], labels["validation"])

    def figures(split: str, t: float) -> dict[str, float]:
        probs = (scores[split].double() / t).softmax(-1).float()
        nll = float(F.cross_entropy(scores[split].double() / t, labels[split]))
        return {"ece": round(calibration_error(probs, labels[split]), 4), "nll": round(nll, 4)}

    record["temperature"] = round(temperature, 6)
    record["calibration"] = {
        "method": "temperature scaling of the label words' logits, fitted on the validation split (NLL)",
        "test_before": figures("test", 1.0), "test_after": figures("test", temperature),
        "validation_before": figures("validation", 1.0), "validation_after": figures("validation", temperature)}
    task_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of the top label: ``sum_b |B|/N * |accuracy_b - confidence_b|``
    over ``bins`` equal-width confidence bins."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.float().mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return total


def evaluate_task(model, examples: Sequence[Example], label_ids: Sequence[int], pad_id: int) -> dict[str, float]:
    """Accuracy, expected calibration error and the mean negative log-likelihood of the true label."""
    probs = label_probabilities(model, examples, label_ids, pad_id)
    labels = torch.tensor([label for _, label in examples])
    accuracy = (probs.argmax(-1) == labels).float().mean().item()
    nll = -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean().item()
    return {"accuracy": accuracy, "ece": calibration_error(probs, labels), "nll": nll, "n": len(labels)}


# --------------------------------------------------------------------------- stages


def machine_description(device: str) -> str:
    """E.g. ``"NVIDIA H200 GPU + 16-core CPU (x86_64), torch 2.11.0, transformers 5.24.0"``."""
    import transformers

    where = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    if str(device).startswith("cuda"):
        where = f"{torch.cuda.get_device_name(device)} GPU + {where}"
    return f"{where}, torch {torch.__version__}, transformers {transformers.__version__}"


def pretrain(name: str, tokenizer, rows: torch.Tensor, out: Path, settings: PretrainSettings, *,
             device: str = "cpu", width: int = ZOO_WIDTH, layers: int = ZOO_LAYERS,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pre-train zoo model ``name`` on packed rows ``[rows, seq_len]``; save to ``out``; return a summary.

    The last 2% of the rows (at least one) are held out for the reported validation loss.
    """
    torch.manual_seed(settings.seed)
    model = build_model(name, len(tokenizer), width=width, layers=layers,
                        special_tokens=special_token_ids(tokenizer), seed=settings.seed).to(device)
    fast = enable_fast_training(model)
    held = max(1, len(rows) // 50)
    train_rows, val_rows = rows[:-held], rows[-held:]
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    start, running = time.perf_counter(), None
    model.train()
    for step in range(settings.steps):
        batch = train_rows[torch.randint(len(train_rows), (settings.batch_size,), generator=generator)].to(device)
        loss = F.cross_entropy(model(batch, use_cache=False).logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.steps, settings.lr, settings.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % max(1, settings.steps // 10) == 0 or step + 1 == settings.steps:
            log(f"{name} pretrain step {step + 1}/{settings.steps} loss {running:.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    seconds = time.perf_counter() - start
    val_loss = lm_loss(model, val_rows, device)
    disable_fast_training(model)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    summary = {"model": name, "steps": settings.steps, "rows": len(train_rows), "seq_len": settings.seq_len,
               "train_loss": running, "validation_loss": val_loss, "seconds": round(seconds, 1),
               "parameters": parameter_count(model), "parallel_scan": fast, "machine": machine_description(device),
               "settings": vars(settings)}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def lm_loss(model, rows: torch.Tensor, device: str, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over ``rows`` ``[n, seq_len]``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / max(1, count)


def train_task(name: str, task: PromptTask, pretrained: Path, out: Path, settings: TaskSettings, *,
               device: str = "cpu", teacher: torch.Tensor | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the pre-trained model in ``pretrained`` on ``task``; save the best (by validation
    accuracy) to ``out`` in float16 with ``task.json``; the test figures come from that saved copy.

    ``teacher`` ``[N, labels]``: a teacher's label probabilities on the training examples
    (:func:`read_teacher_labels`), distilled with ``settings.distill_weight``.
    """
    if settings.distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight > 0 needs the teacher's label probabilities")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    label_ids = label_token_ids(tokenizer, task)
    pad_id = tokenizer.pad_token_id
    train_ex = encode_task(tokenizer, task, "train", settings.max_tokens)
    val_ex = encode_task(tokenizer, task, "validation", settings.max_tokens)
    # batches carry each example's index, for its true label and its teacher's probabilities
    true_labels = torch.tensor([label for _, label in train_ex], device=device)
    indexed = [(ids, k) for k, (ids, _) in enumerate(train_ex)]
    if teacher is not None:
        if teacher.shape[0] != len(train_ex):
            raise ValueError(f"teacher labels for {teacher.shape[0]} examples, {len(train_ex)} to train on")
        teacher = teacher.to(device)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).to(device)
    enable_fast_training(model)
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    rng = random.Random(settings.seed)
    steps_per_epoch = math.ceil(len(train_ex) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    eval_every = max(1, steps_per_epoch // max(1, settings.evals_per_epoch))
    targets_of = torch.tensor(label_ids, device=device)
    best: dict[str, Any] = {"accuracy": -1.0}
    history: list[dict[str, float]] = []
    step, start = 0, time.perf_counter()
    for epoch in range(settings.epochs):
        for i, batch in enumerate(length_bucketed_batches(indexed, settings.batch_size, rng)):
            model.train()
            input_ids, last, index = (t.to(device) for t in make_batch(batch, pad_id))
            logits = model(input_ids, use_cache=False).logits.float()
            rows = torch.arange(len(batch), device=device)
            loss = F.cross_entropy(logits[rows, last], targets_of[true_labels[index]])
            if settings.distill_weight > 0:
                label_logits = logits[rows, last][:, targets_of]                 # [B, labels]
                loss = (1 - settings.distill_weight) * loss + settings.distill_weight * distillation_loss(
                    label_logits, teacher[index], settings.distill_temperature)
            if settings.lm_weight > 0:
                lm_targets = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == pad_id, -100)
                loss = loss + settings.lm_weight * F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), lm_targets.flatten(), ignore_index=-100)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, settings.lr, settings.warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % eval_every == 0 or step == total:
                disable_fast_training(model)
                scores = evaluate_task(model, val_ex, label_ids, pad_id)
                enable_fast_training(model)
                history.append({"epoch": round(step / steps_per_epoch, 2), "step": step,
                                "val_accuracy": round(scores["accuracy"], 4), "val_ece": round(scores["ece"], 4),
                                "seconds": round(time.perf_counter() - start, 1)})
                if scores["accuracy"] > best["accuracy"]:
                    best = {"accuracy": scores["accuracy"], "epoch": history[-1]["epoch"],
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                log(f"{name} {task.name} epoch {history[-1]['epoch']:.2f}: val acc {scores['accuracy']:.4f}")
    seconds = time.perf_counter() - start
    model.load_state_dict(best["state"])
    disable_fast_training(model)
    return save_task_model(name, task, model, tokenizer, out, settings, best_epoch=best["epoch"], seconds=seconds,
                           history=history, device=device, log=log)


def save_task_model(name: str, task: PromptTask, model, tokenizer, out: Path, settings: TaskSettings, *,
                    best_epoch: float | None, seconds: float, history: list[dict[str, float]], device: str = "cpu",
                    log: Callable[[str], None] = print, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save a fine-tuned ``model`` to ``out`` in float16 with ``task.json``, whose figures (validation and test
    accuracy, calibration) come from that saved copy loaded as a user would (float32)."""
    from transformers import AutoModelForCausalLM

    label_ids = label_token_ids(tokenizer, task)
    pad_id = tokenizer.pad_token_id
    model.to("cpu").half().save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    figures = {split: evaluate_task(shipped, encode_task(tokenizer, task, split, settings.max_tokens),
                                    label_ids, pad_id) for split in ("validation", "test")}
    labels = [label for _, label in task.splits["test"]]
    majority = max(set(labels), key=labels.count)
    task_json = {
        "name": f"{task.name}-{name}",
        "description": task.description,
        "template": task.template,
        "add_bos_token": True,
        "label_words": dict(zip(task.label_names, task.label_words)),
        "label_token_ids": dict(zip(task.label_names, label_ids)),
        "labels": {str(i): label for i, label in enumerate(task.label_names)},
        "prediction_rule": "argmax over the logits of the label tokens at the last prompt position",
        "max_sentence_tokens": settings.max_tokens,
        "test_accuracy": round(figures["test"]["accuracy"], 4),
        "test_ece": round(figures["test"]["ece"], 4),
        "validation_accuracy": round(figures["validation"]["accuracy"], 4),
        "majority_baseline_test": round(labels.count(majority) / len(labels), 4),
        "num_examples": {split: len(rows) for split, rows in task.splits.items()},
        "num_parameters": parameter_count(shipped),
        "best_epoch": best_epoch,
        "training_time_seconds": round(seconds, 1),
        "machine": machine_description(device),
        "settings": vars(settings),
        "history": history,
        **task.extra,
        **(extra or {}),
    }
    (out / "task.json").write_text(json.dumps(task_json, indent=2) + "\n")
    log(f"{name} {task.name}: test accuracy {figures['test']['accuracy']:.4f} "
        f"(ECE {figures['test']['ece']:.3f}) in {seconds:.0f}s")
    return task_json


def soup_task_models(name: str, task: PromptTask, runs: Sequence[Path], out: Path, settings: TaskSettings, *,
                     device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """A uniform "model soup" (Wortsman et al. 2022): the parameters of fine-tuned ``runs`` of one pre-trained
    model averaged in float32, saved to ``out`` like :func:`train_task`'s models (task.json records the runs).

    Floating-point tensors are averaged; any other state (integer buffers) is the first run's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if len(runs) < 2:
        raise ValueError(f"a soup needs at least two fine-tuned runs, got {len(runs)}")
    models = [AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32) for run in runs]
    states = [m.state_dict() for m in models]
    soup = {key: (torch.stack([state[key] for state in states]).mean(0) if value.is_floating_point() else value)
            for key, value in states[0].items()}
    models[0].load_state_dict(soup)
    seconds = sum(json.loads((Path(run) / "task.json").read_text())["training_time_seconds"] for run in runs)
    tokenizer = AutoTokenizer.from_pretrained(runs[0])
    return save_task_model(name, task, models[0], tokenizer, out, settings, best_epoch=None, seconds=seconds,
                           history=[], device=device, log=log, extra={"soup_of": [str(run) for run in runs]})
