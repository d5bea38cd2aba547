"""Text in and out of a loaded model: prompts, tokens, predictions and targets named by strings.

- :func:`encode` puts texts into the task's prompt template and pads them on the left;
- :func:`token_strings` / :func:`decode_token` give display strings of tokens;
- :func:`predict` reads the task's label (or the next token) off the logits;
- :func:`target_token_id` turns a user's target (a label, a label word, a token id or a
  one-token string) into a token id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import EmptyInputError
from .inputs import is_causal_model
from .loading import LoadedModel, TaskError

__all__ = ["Prediction", "decode_token", "encode", "finite", "predict", "predict_label", "predict_next_token",
           "prompt_for", "target_token_id", "token_strings"]


def prompt_for(loaded: LoadedModel, text: str) -> str:
    """The string the model reads for ``text``: the task's template filled in, else ``text`` itself.

    For task models runs of whitespace are collapsed and the text stripped, as in training.
    """
    if loaded.task is None:
        return text
    return loaded.task["template"].replace("{text}", " ".join(text.split()))


@dataclass(frozen=True)
class EncodedText:
    """One text as the model reads it.

    Attributes:
        ids: the prompt's token ids (BOS and the task template included).
        text: the user's text as put into the template (whitespace collapsed for task models).
        in_span: per token, whether it comes from the user's text (the template's ``{text}`` slot)
            rather than the template, BOS or other special tokens.
        offsets: per token, the ``(start, end)`` characters of :attr:`text` it covers, ``None`` outside
            the span. A tokenizer without offsets (a slow one) puts every token in the span.
    """

    ids: list[int]
    text: str
    in_span: list[bool]
    offsets: list[tuple[int, int] | None]


def encode_text(loaded: LoadedModel, text: str) -> EncodedText:
    """``text``'s tokens, and which of them (and which characters) come from the text itself."""
    tok = loaded.tokenizer
    prompt = prompt_for(loaded, text)
    inner = prompt if loaded.task is None else " ".join(text.split())
    start = 0 if loaded.task is None else loaded.task["template"].index("{text}")
    end = start + len(inner)
    try:
        encoded = tok(prompt, return_offsets_mapping=True)
        spans = [(a, b) for a, b in encoded["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError):     # a slow tokenizer: no offsets
        encoded, spans = tok(prompt), None
    ids = list(encoded["input_ids"])
    special = set(getattr(tok, "all_special_ids", []) or [])
    if spans is None:
        offsets: list[tuple[int, int] | None] = [None] * len(ids)
        in_span = [i not in special for i in ids]
    else:
        offsets = [(max(a, start) - start, min(b, end) - start) if max(a, start) < min(b, end) and i not in special
                   else None for (a, b), i in zip(spans, ids)]
        in_span = [o is not None for o in offsets]
    if loaded.task is not None and loaded.task.get("add_bos_token", True):
        bos = getattr(tok, "bos_token_id", None)
        if isinstance(bos, int) and (not ids or ids[0] != bos):
            ids, in_span, offsets = [bos, *ids], [False, *in_span], [None, *offsets]
    return EncodedText(ids=ids, text=inner, in_span=in_span, offsets=offsets)


def _encode_one(loaded: LoadedModel, text: str) -> list[int]:
    return encode_text(loaded, text).ids


def encode(loaded: LoadedModel, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_texts` without the spans."""
    ids, mask, _ = encode_texts(loaded, texts)
    return ids, mask


def encode_texts(loaded: LoadedModel, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor, list[EncodedText]]:
    """Token ids ``[B, L]`` and attention mask ``[B, L]`` of ``texts``, padded on the left for causal
    models (every text ends at the last position) and on the right for bidirectional encoders (every
    text starts with its class token at position 0).

    With a task, each text is put into the task's prompt template (and BOS prepended when the
    task asks for it). Texts are not truncated. The tensors are on the model's device.

    Raises:
        EmptyInputError: a text is empty or whitespace only (or encodes to no token).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise EmptyInputError("no text given: there is nothing to explain")
    encoded: list[EncodedText] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        label = f"text {i + 1}" if len(texts) > 1 else "the text"
        if not text.strip():
            raise EmptyInputError(f"{label} is empty (or only whitespace): there is nothing to explain")
        one = encode_text(loaded, text)
        if not one.ids:
            raise EmptyInputError(f"{label} encodes to no token: there is nothing to explain")
        encoded.append(one)
    rows = [one.ids for one in encoded]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), loaded.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    left = is_causal_model(loaded.model)
    for i, ids in enumerate(rows):
        place = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, place] = torch.tensor(ids, dtype=torch.long)
        mask[i, place] = 1
    return input_ids.to(loaded.device), mask.to(loaded.device), encoded


def token_strings(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
    """Display strings of one row's real tokens (padding dropped); special tokens kept (``"<s>"``).

    Each token is decoded on its own, so a word-initial token keeps its leading space and
    ``"".join(tokens)`` reads as the prompt.
    """
    ids = input_ids.reshape(-1).tolist()
    keep = attention_mask.reshape(-1).tolist() if attention_mask is not None else [1] * len(ids)
    return [loaded.tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for i, k in zip(ids, keep) if k]


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
        return {"label": self.label, "token_id": self.token_id, "probability": finite(self.probability),
                "probabilities": {k: finite(v) for k, v in self.probabilities.items()},
                "kind": "label" if self.is_label else "next_token"}


def finite(x: float) -> float | None:
    """``x`` as a float, or ``None`` for NaN and infinities (JSON has no such numbers)."""
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
        decoded = [decode_token(loaded, int(i)) for i in indices]
        out.append(Prediction(label=decoded[0], token_id=int(indices[0]), probability=float(values[0]),
                              probabilities={t: float(v) for t, v in zip(decoded, values)}, is_label=False))
    return out


def predict(loaded: LoadedModel, logits: torch.Tensor, position: int = -1) -> list[Prediction]:
    """:func:`predict_label` for task models at the end of the prompt, else :func:`predict_next_token`."""
    if loaded.label_ids:
        return predict_label(loaded, logits, position)
    return predict_next_token(loaded, logits, position)


def decode_token(loaded: LoadedModel, token_id: int) -> str:
    """The display string of one token (leading space kept, special tokens shown), or a classifier's label."""
    if loaded.is_classifier:
        return next((name for name, index in loaded.label_ids.items() if index == token_id), str(token_id))
    return loaded.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def target_token_id(loaded: LoadedModel, target: str | int | None) -> int | None:
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
    if loaded.is_classifier:
        raise ValueError(f"target {target!r} is not a label of the classifier ({', '.join(loaded.label_ids)}) "
                         "nor a class index")
    pieces = loaded.tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(pieces) == 1:
        return int(pieces[0])
    labels = f"a label ({', '.join(loaded.label_ids)}), " if loaded.label_ids else ""
    raise ValueError(f"target {target!r} is {len(pieces)} tokens {pieces}; give {labels}a token id or a string "
                     "that is exactly one token")


def _check_id(loaded: LoadedModel, token_id: int) -> int:
    vocab = len(loaded.label_ids) if loaded.is_classifier else loaded.model.get_output_embeddings().weight.shape[0]
    if not 0 <= token_id < vocab:
        raise ValueError(f"target token id {token_id} out of range [0, {vocab})")
    return token_id
