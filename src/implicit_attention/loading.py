"""Loading a model to explain: the bundled sentiment model, a local directory or a Hub id.

Any model directory may carry a ``task.json``; the keys read here are

- ``template`` (required): the prompt, with one ``{text}`` placeholder;
- ``label_words`` (required): ``{label name: label word}``, each label word a single token;
- ``label_token_ids`` (optional): ``{label name: token id}``, checked against the tokenizer;
- ``add_bos_token`` (optional, default true): start the prompt with the tokenizer's BOS token;
- ``max_sentence_tokens`` (optional): the longest text, in tokens, the model was trained on (texts were cut
  there); longer inputs are explained with a :class:`~implicit_attention.errors.LongInputWarning`
  (:attr:`LoadedModel.max_training_tokens`).

Other keys (accuracy, data set, training details) are kept in :attr:`LoadedModel.task` as-is.

Example::

    from implicit_attention.loading import load_model
    from implicit_attention.text import encode, predict
    loaded = load_model()                      # the bundled model
    ids, mask = encode(loaded, ["an utterly charming film"])
    logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    print(predict(loaded, logits)[0])          # Prediction(label='positive', probability=0.9..., ...)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import find_layers
from .architectures.registry import unsupported_model
from .bundled import BUNDLED_MODEL, bundled_model_path
from .devices import refuses_float64_experts
from .errors import ImplicitAttentionError, UnsupportedModelError

#: dtype names accepted by :func:`load_model` (and the CLI's ``--dtype``).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
}

__all__ = ["DTYPES", "LoadedModel", "ModelLoadError", "TaskError", "load_model"]


class ModelLoadError(ImplicitAttentionError, OSError):
    """A model or tokenizer could not be loaded from the given directory or Hub id."""


class TaskError(ImplicitAttentionError, ValueError):
    """A ``task.json`` is malformed or does not fit the tokenizer (e.g. a label word of several tokens)."""


@dataclass
class LoadedModel:
    """A model ready to explain.

    Attributes:
        model: the model, in eval mode, on the requested device and dtype.
        tokenizer: its tokenizer.
        task: the parsed ``task.json`` of the model directory, or ``None``.
        name: what was loaded, for display (``"rt-sentiment-mamba (bundled)"``, a path or a Hub id).
        source: the directory or Hub id passed to ``from_pretrained``.
        label_ids: ``{label name: token id}`` of the task's label words; for a sequence classifier
            ``{label name: class index}`` from its ``id2label`` (empty for a language model without a task).
    """

    model: nn.Module
    tokenizer: Any
    task: dict | None = None
    name: str = ""
    source: str = ""
    label_ids: dict[str, int] = field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        """Whether the model classifies the whole text (logits ``[B, K]``) rather than predicting tokens."""
        return self.model.get_output_embeddings() is None

    @property
    def labels(self) -> list[str]:
        """The task's label names, in ``task.json`` order (empty without a task)."""
        return list(self.label_ids)

    @property
    def max_training_tokens(self) -> int | None:
        """The longest text, in tokens, the model was trained on: ``max_sentence_tokens`` of its ``task.json``
        (or ``max_training_tokens``, or ``settings.max_tokens``); ``None`` when unknown."""
        task = self.task or {}
        for value in (task.get("max_training_tokens"), task.get("max_sentence_tokens"),
                      (task.get("settings") or {}).get("max_tokens")):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

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


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype=None, device=None,
               device_map: str | dict | None = None) -> LoadedModel:
    """Load a supported causal LM and its tokenizer (and ``task.json`` if the directory has one).

    Args:
        name_or_path: a local model directory, a Hugging Face Hub id (``"state-spaces/mamba-130m-hf"``;
            needs network access or a copy in the local Hugging Face cache), or ``None`` /
            ``"rt-sentiment-mamba"`` for the bundled model.
        dtype: ``torch.float32`` (default), ``torch.float64`` (much smaller reconstruction errors), ... or their
            names (``"float64"``).
        device: where to put the model (``"cpu"``, ``"cuda"``, ...); default CPU.
        device_map: instead of ``device``, spread the model over the visible GPUs with ``accelerate``
            (``"auto"``, ``"balanced"``, ``"sequential"``, or a dict mapping module names to devices), as
            ``from_pretrained(device_map=...)`` does.

    Raises:
        ModelLoadError: the directory / id could not be loaded (the message says what was tried).
        UnsupportedModelError: the model has no layer this library can decompose.
        TaskError: the directory's ``task.json`` is malformed or does not fit the tokenizer.
    """
    from transformers import AutoTokenizer

    from . import models  # noqa: F401  registers our RetNet/HGRN/GLA/RWKV-6/RWKV-7 with the Auto classes

    torch_dtype = _parse_dtype(dtype)
    if device_map is not None:
        if device is not None:
            raise ValueError("device and device_map exclude each other")
        if importlib.util.find_spec("accelerate") is None:
            raise ModelLoadError(f"device_map={device_map!r} needs the accelerate package, which is not installed: "
                                 "pip install accelerate")
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
        placement = {} if device_map is None else {"device_map": device_map}
        model_class = _declared_class(source, kwargs)
        with _quiet_weight_loading():
            model, info = model_class.from_pretrained(source, dtype=torch_dtype, output_loading_info=True,
                                                      **placement, **kwargs)
    except (ModelLoadError, UnsupportedModelError):
        raise
    except ValueError as exc:
        if "does not recognize this architecture" in str(exc) and _import_fla():
            # a flash-linear-attention checkpoint (fla-hub): fla registers its model types on import
            return load_model(name_or_path, dtype=dtype, device=device, device_map=device_map)
        if "does not recognize this architecture" in str(exc):
            import transformers

            kind = re.search(r"model type `([^`]*)`", str(exc))
            raise ModelLoadError(
                f"the model in {where} has model_type {kind.group(1) if kind else '?'!r}, which the installed "
                f"transformers {transformers.__version__} does not know: a newer transformers may (pip install "
                "--upgrade transformers), or the model's own code must be imported first") from exc
        if "Unrecognized configuration class" in str(exc) or "does not recognize this architecture" in str(exc):
            raise unsupported_model(f"the model in {where} (not a causal LM transformers can load)") from exc
        raise ModelLoadError(f"could not load the model from {where}: {_describe(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError, ...: all mean "cannot load this"
        hint = "" if local else (" (no such local directory either; loading a Hub id needs network access "
                                 "or a copy in the local Hugging Face cache)")
        raise ModelLoadError(f"could not load the model from {where}{hint}: {_describe(exc)}") from exc
    if refuses_float64_experts(model):  # our own load: the eager experts are the same function in float64
        model.set_experts_implementation("eager")
    missing = sorted(info.get("missing_keys") or []) + sorted(f"{key} (shape mismatch)" for key, *_ in
                                                              info.get("mismatched_keys") or [])
    if missing:
        raise ModelLoadError(
            f"the checkpoint in {where} lacks {len(missing)} weight(s) of {type(model).__name__}, which would be "
            f"initialised at random: {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
    if not find_layers(model):
        raise unsupported_model(f"{type(model).__name__} (from {where})")
    if not _has_head(model):
        raise ModelLoadError(
            f"the checkpoint in {where} is a {type(model).__name__}, a backbone without a head: it makes no "
            "prediction to explain (load a ...ForCausalLM or ...ForSequenceClassification checkpoint, or call "
            "implicit_attention.decompose on the backbone)")
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
    elif loaded.is_classifier:
        id2label = getattr(model.config, "id2label", None) or {}
        loaded.label_ids = {str(id2label.get(k, k)): k for k in range(int(model.config.num_labels))}
    return loaded


def _import_fla() -> bool:
    """Import ``flash-linear-attention`` (which registers its model types with the Auto classes) if it is
    installed and not imported yet; whether that happened."""
    import importlib.util
    import sys

    if "fla" in sys.modules or importlib.util.find_spec("fla") is None:
        return False
    import fla  # noqa: F401
    return True


def _declared_class(source: str, kwargs: dict):
    """The model class the checkpoint's ``config.json`` declares (``architectures``), else ``AutoModelForCausalLM``.

    Loading the declared class keeps a classifier a classifier (``BertForSequenceClassification``)
    and a backbone a backbone, where ``AutoModelForCausalLM`` would attach a new, random head.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, **kwargs)
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
        # our own models (ia_gla, ...) are reached through the Auto classes they register with
        return AutoModelForCausalLM if name.endswith("ForCausalLM") else transformers.AutoModel
    return AutoModelForCausalLM


def _has_head(model: nn.Module) -> bool:
    """Whether ``model`` returns logits: a language-model head, or a classifier."""
    if model.get_output_embeddings() is not None:
        return True
    return any(hasattr(model, name) for name in ("classifier", "score", "classification_head"))


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


@contextlib.contextmanager
def _quiet_weight_loading():
    """``transformers``' per-tensor "Loading weights" bar off while a (small) model loads; restored after."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
