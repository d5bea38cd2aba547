"""Loading a model to explain: the bundled sentiment model, a local directory or a Hub id.

The package ships one small model, :data:`BUNDLED_MODEL` (``rt-sentiment-mamba``): a stock
``MambaForCausalLM`` trained on Rotten Tomatoes review sentences as a prompted next-token task
(``"<s>{text} sentiment:"`` -> ``" positive"`` | ``" negative"``). Its directory holds the usual
``config.json``, ``model.safetensors``, ``tokenizer.json`` and a ``task.json`` describing the
prompt and the label words.

Any model directory may carry such a ``task.json``; the keys read here are

- ``template`` (required): the prompt, with one ``{text}`` placeholder;
- ``label_words`` (required): ``{label name: label word}``, each label word a single token;
- ``label_token_ids`` (optional): ``{label name: token id}``, checked against the tokenizer;
- ``add_bos_token`` (optional, default true): start the prompt with the tokenizer's BOS token.

Other keys (accuracy, data set, training details) are kept in :attr:`LoadedModel.task` as-is.

Example::

    from implicit_attention.bundled import encode, load_model, predict
    loaded = load_model()                      # the bundled model
    ids, mask = encode(loaded, ["an utterly charming film"])
    logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    print(predict(loaded, logits)[0])          # Prediction(label='positive', probability=0.9..., ...)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import find_layers, supported_model_classes
from .errors import EmptyInputError, ImplicitAttentionError, UnsupportedModelError

#: Name of the model shipped with the package.
BUNDLED_MODEL = "rt-sentiment-mamba"

#: dtype names accepted by :func:`load_model` (and the CLI's ``--dtype``).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
}

__all__ = [
    "BUNDLED_MODEL", "DTYPES", "LoadedModel", "ModelLoadError", "Prediction", "TaskError", "bundled_model_path",
    "encode", "load_model", "predict", "predict_label", "predict_next_token", "resolve_target", "token_strings",
]


class ModelLoadError(ImplicitAttentionError, OSError):
    """A model or tokenizer could not be loaded from the given directory or Hub id."""


class TaskError(ImplicitAttentionError, ValueError):
    """A ``task.json`` is malformed or does not fit the tokenizer (e.g. a label word of several tokens)."""


def bundled_model_path() -> Path:
    """Directory of the bundled model (``implicit_attention/bundled/rt-sentiment-mamba``).

    The path is returned whether or not the directory exists; :func:`load_model` says so
    clearly when it is missing.
    """
    try:
        root = resources.files("implicit_attention")
        path = Path(str(root)) / "bundled" / BUNDLED_MODEL
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - e.g. a zipped, not extracted, package
        path = Path(__file__).resolve().parent / "bundled" / BUNDLED_MODEL
    return path


@dataclass
class LoadedModel:
    """A model ready to explain.

    Attributes:
        model: the model, in eval mode, on the requested device and dtype.
        tokenizer: its tokenizer.
        task: the parsed ``task.json`` of the model directory, or ``None``.
        name: what was loaded, for display (``"rt-sentiment-mamba (bundled)"``, a path or a Hub id).
        source: the directory or Hub id passed to ``from_pretrained``.
        label_ids: ``{label name: token id}`` of the task's label words (empty without a task).
    """

    model: nn.Module
    tokenizer: Any
    task: dict | None = None
    name: str = ""
    source: str = ""
    label_ids: dict[str, int] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """The task's label names, in ``task.json`` order (empty without a task)."""
        return list(self.label_ids)

    @property
    def pad_token_id(self) -> int:
        """The id used for left padding: the tokenizer's pad token, else EOS, else 0."""
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if isinstance(value, int):
                return value
        return 0

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------- loading
def _parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _looks_like_path(name: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else with slashes is meant as a path."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what}: it contains no token-mixing layer implicit_attention can decompose. "
        f"Supported model classes: {', '.join(supported_model_classes())}.")


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype=None, device=None) -> LoadedModel:
    """Load a supported causal LM and its tokenizer (and ``task.json`` if the directory has one).

    Args:
        name_or_path: a local model directory, a Hugging Face Hub id (``"state-spaces/mamba-130m-hf"``;
            needs network access or a copy in the local Hugging Face cache), or ``None`` /
            ``"rt-sentiment-mamba"`` for the bundled model.
        dtype: ``torch.float32`` (default), ``torch.float64`` (much smaller reconstruction errors), ... or their
            names (``"float64"``).
        device: where to put the model (``"cpu"``, ``"cuda"``, ...); default CPU.

    Raises:
        ModelLoadError: the directory / id could not be loaded (the message says what was tried).
        UnsupportedModelError: the model has no layer this library can decompose.
        TaskError: the directory's ``task.json`` is malformed or does not fit the tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import models  # noqa: F401  registers our RetNet/HGRN/GLA/RWKV-6/RWKV-7 with the Auto classes

    torch_dtype = _parse_dtype(dtype)
    if name_or_path is None or str(name_or_path) == BUNDLED_MODEL:
        path = bundled_model_path()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the bundled model {BUNDLED_MODEL!r} is missing: expected its files in {path}. "
                "Reinstall implicit-attention, or pass a model directory or Hub id (--model).")
        source, name, local = str(path), f"{BUNDLED_MODEL} (bundled)", True
    else:
        raw = os.fspath(name_or_path)
        expanded = os.path.expanduser(raw)
        if os.path.isdir(expanded):
            source, name, local = expanded, raw, True
            if not os.path.isfile(os.path.join(expanded, "config.json")):
                raise ModelLoadError(f"could not load model from directory {raw!r}: it has no config.json "
                                     "(a directory written by save_pretrained() is expected)")
        elif os.path.exists(expanded):
            raise ModelLoadError(f"could not load model {raw!r}: it is a file, not a model directory")
        elif _looks_like_path(raw):
            raise ModelLoadError(f"could not load model {raw!r}: no such directory (a Hub id looks like "
                                 "'owner/name')")
        else:
            source, name, local = raw, raw, False

    where = f"directory {source!r}" if local else f"Hugging Face Hub id {source!r}"
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "does not recognize this architecture" in str(exc):
            raise _unsupported(f"the model in {where} is not a causal LM transformers can load") from exc
        raise ModelLoadError(f"could not load the model from {where}: {_describe(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError, ...: all mean "cannot load this"
        hint = "" if local else (" (no such local directory either; loading a Hub id needs network access "
                                 "or a copy in the local Hugging Face cache)")
        raise ModelLoadError(f"could not load the model from {where}{hint}: {_describe(exc)}") from exc
    if not find_layers(model):
        raise _unsupported(f"{type(model).__name__} (from {where})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load the tokenizer from {where}: {_describe(exc)}") from exc
    if not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer from the config when the files are missing
        raise ModelLoadError(f"the tokenizer loaded from {where} is empty: the tokenizer files (tokenizer.json, "
                             "tokenizer_config.json, or a vocabulary) are missing")
    model.eval()
    if device is not None:
        model.to(device)

    task = _read_task(Path(source)) if local else None
    loaded = LoadedModel(model=model, tokenizer=tokenizer, task=task, name=name, source=source)
    if task is not None:
        loaded.label_ids = _label_ids(tokenizer, task, where)
    return loaded


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, (OSError, ValueError)) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _read_task(directory: Path) -> dict | None:
    path = directory / "task.json"
    if not path.is_file():
        return None
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TaskError(f"could not read {path}: {exc}") from exc
    if not isinstance(task, dict):
        raise TaskError(f"{path} must hold a JSON object")
    template = task.get("template")
    if not isinstance(template, str) or template.count("{text}") != 1:
        raise TaskError(f"{path}: 'template' must be a string with exactly one {{text}} placeholder, got {template!r}")
    words = task.get("label_words")
    if not isinstance(words, dict) or not words or not all(isinstance(w, str) and w for w in words.values()):
        raise TaskError(f"{path}: 'label_words' must map each label name to a non-empty label word")
    return task


def _label_ids(tokenizer, task: dict, where: str) -> dict[str, int]:
    ids = {}
    given = task.get("label_token_ids") or {}
    for label, word in task["label_words"].items():
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise TaskError(f"task.json of {where}: label word {word!r} of label {label!r} is {len(pieces)} tokens "
                            f"({pieces}), it must be exactly one")
        if label in given and int(given[label]) != pieces[0]:
            raise TaskError(f"task.json of {where}: label_token_ids[{label!r}] = {given[label]} but the tokenizer "
                            f"encodes {word!r} as {pieces[0]}")
        ids[str(label)] = int(pieces[0])
    if len(set(ids.values())) != len(ids):
        raise TaskError(f"task.json of {where}: two labels share a token: {ids}")
    return ids


# -------------------------------------------------------------------------------------- encoding
def prompt_for(loaded: LoadedModel, text: str) -> str:
    """The string the model reads for ``text``: the task's template filled in, else ``text`` itself.

    For task models runs of whitespace are collapsed and the text stripped, as in training.
    """
    if loaded.task is None:
        return text
    return loaded.task["template"].replace("{text}", " ".join(text.split()))


def _encode_one(loaded: LoadedModel, text: str) -> list[int]:
    tok = loaded.tokenizer
    ids = list(tok(prompt_for(loaded, text))["input_ids"])
    if loaded.task is not None and loaded.task.get("add_bos_token", True):
        bos = getattr(tok, "bos_token_id", None)
        if isinstance(bos, int) and (not ids or ids[0] != bos):
            ids.insert(0, bos)
    return ids


def encode(loaded: LoadedModel, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, L]`` and attention mask ``[B, L]`` of ``texts``, padded on the LEFT.

    With a task, each text is put into the task's prompt template (and BOS prepended when the
    task asks for it). Texts are not truncated. The tensors are on the model's device.

    Raises:
        EmptyInputError: a text is empty or whitespace only (or encodes to no token).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise EmptyInputError("no text given: there is nothing to explain")
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        label = f"text {i + 1}" if len(texts) > 1 else "the text"
        if not text.strip():
            raise EmptyInputError(f"{label} is empty (or only whitespace): there is nothing to explain")
        ids = _encode_one(loaded, text)
        if not ids:
            raise EmptyInputError(f"{label} encodes to no token: there is nothing to explain")
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), loaded.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    return input_ids.to(loaded.device), mask.to(loaded.device)


def token_strings(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
    """Display strings of one row's real tokens (padding dropped); special tokens kept (``"<s>"``).

    Each token is decoded on its own, so a word-initial token keeps its leading space and
    ``"".join(tokens)`` reads as the prompt.
    """
    ids = input_ids.reshape(-1).tolist()
    keep = attention_mask.reshape(-1).tolist() if attention_mask is not None else [1] * len(ids)
    return [loaded.tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for i, k in zip(ids, keep) if k]


# ------------------------------------------------------------------------------------ prediction
@dataclass
class Prediction:
    """What the model predicts for one example.

    Attributes:
        label: the label name (task models) or the predicted token's string.
        token_id: the predicted token id.
        probability: its probability (over the label words for task models, else over the vocabulary).
        probabilities: ``{label: probability}`` over the label words (task models) or the top five
            next tokens (``{token string: probability}``).
        is_label: whether ``label`` is a task label (else a next token).
    """

    label: str
    token_id: int
    probability: float
    probabilities: dict[str, float]
    is_label: bool

    def to_dict(self) -> dict:
        return {"label": self.label, "token_id": self.token_id, "probability": _finite(self.probability),
                "probabilities": {k: _finite(v) for k, v in self.probabilities.items()},
                "kind": "label" if self.is_label else "next_token"}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _last(logits: torch.Tensor, position: int) -> torch.Tensor:
    if logits.dim() == 3:
        return logits[:, position]
    if logits.dim() == 2:
        return logits
    raise ValueError(f"logits must be [B, L, V] or [B, V], got shape {tuple(logits.shape)}")


def predict_label(loaded: LoadedModel, logits: torch.Tensor, position: int = -1) -> list[Prediction]:
    """The task prediction of each example: argmax over the label words' logits at ``position``.

    ``logits`` is ``[B, L, V]`` (``position`` picks the row; default the last, the end of the
    prompt with left padding) or ``[B, V]``. Probabilities are a softmax over the label words only.
    """
    if not loaded.label_ids:
        raise TaskError(f"{loaded.name or 'this model'} has no task (no task.json with label_words)")
    names = list(loaded.label_ids)
    ids = torch.tensor([loaded.label_ids[n] for n in names], device=logits.device)
    scores = _last(logits, position).detach().double().index_select(-1, ids)
    probs = scores.softmax(dim=-1)
    out = []
    for row in probs:
        best = int(row.argmax())
        out.append(Prediction(label=names[best], token_id=int(ids[best]), probability=float(row[best]),
                              probabilities={n: float(p) for n, p in zip(names, row)}, is_label=True))
    return out


def predict_next_token(loaded: LoadedModel, logits: torch.Tensor, position: int = -1, top: int = 5) -> list[Prediction]:
    """The most likely next token of each example at ``position``, with the top ``top`` probabilities."""
    probs = _last(logits, position).detach().double().softmax(dim=-1)
    out = []
    for row in probs:
        values, indices = row.topk(min(top, row.numel()))
        decoded = [_decode(loaded, int(i)) for i in indices]
        out.append(Prediction(label=decoded[0], token_id=int(indices[0]), probability=float(values[0]),
                              probabilities={t: float(v) for t, v in zip(decoded, values)}, is_label=False))
    return out


def predict(loaded: LoadedModel, logits: torch.Tensor, position: int = -1) -> list[Prediction]:
    """:func:`predict_label` for task models at the end of the prompt, else :func:`predict_next_token`."""
    if loaded.label_ids:
        return predict_label(loaded, logits, position)
    return predict_next_token(loaded, logits, position)


def _decode(loaded: LoadedModel, token_id: int) -> str:
    return loaded.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def resolve_target(loaded: LoadedModel, target: str | int | None) -> int | None:
    """Turn a user's target into a token id.

    ``target`` may be a task label name (``"positive"``) or label word (``" positive"``), a
    decimal token id (``"1234"``), or a string that encodes to exactly one token (``" the"``).
    ``None`` stays ``None`` (explain the prediction).
    """
    if target is None:
        return None
    if isinstance(target, int):
        return _check_id(loaded, target)
    if target in loaded.label_ids:
        return loaded.label_ids[target]
    if loaded.task is not None:
        for label, word in loaded.task["label_words"].items():
            if target == word or target.strip() == word.strip():
                return loaded.label_ids[label]
    if target.strip().lstrip("-").isdigit():
        return _check_id(loaded, int(target))
    pieces = loaded.tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(pieces) == 1:
        return int(pieces[0])
    labels = f"a label ({', '.join(loaded.label_ids)}), " if loaded.label_ids else ""
    raise ValueError(f"target {target!r} is {len(pieces)} tokens {pieces}; give {labels}a token id or a string "
                     "that is exactly one token")


def _check_id(loaded: LoadedModel, token_id: int) -> int:
    vocab = loaded.model.get_output_embeddings().weight.shape[0] if loaded.model.get_output_embeddings() is not None \
        else len(loaded.tokenizer)
    if not 0 <= token_id < vocab:
        raise ValueError(f"target token id {token_id} out of range [0, {vocab})")
    return token_id
