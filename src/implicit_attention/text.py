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

__all__ = ["Prediction", "decode_token", "display_strings", "encode", "finite", "long_input_message", "predict", "predict_label", "predict_next_token",
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


def long_input_message(loaded: LoadedModel, encoded: list[EncodedText]) -> str | None:
    """One line saying which texts are longer than the model's training length
    (:attr:`~implicit_attention.loading.LoadedModel.max_training_tokens`), or ``None``."""
    limit = loaded.max_training_tokens
    if limit is None:
        return None
    lengths = [sum(one.in_span) for one in encoded]
    long = [(i, n) for i, n in enumerate(lengths, 1) if n > limit]
    if not long:
        return None
    if len(encoded) == 1:
        which = f"the text is {long[0][1]:,} tokens long"
    else:
        which = (f"text{'s' if len(long) > 1 else ''} {', '.join(str(i) for i, _ in long[:5])}"
                 f"{', ...' if len(long) > 5 else ''} {'are' if len(long) > 1 else 'is'} up to "
                 f"{max(n for _, n in long):,} tokens long")
    return (f"{which}, but {loaded.name or 'the model'} was trained on texts of at most {limit} tokens "
            "(max_sentence_tokens of its task.json): predictions and explanations of longer texts are less "
            "reliable, and explaining them is slow (the implicit attention grows with the square of the length)")


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
    return display_strings(loaded.tokenizer, [i for i, k in zip(ids, keep) if k])


def display_strings(tokenizer, ids: list[int]) -> list[str]:
    """One readable string per token of ``ids``, which ``"".join`` reads as the decoded text.

    A character whose bytes span several tokens (byte-level BPE splits "日" or "ï" into byte tokens that
    decode alone to U+FFFD) is shown once, on the token holding its first byte; the tokens holding only
    the rest of it show ``""``.
    """
    def one(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    singles = [one(i) for i in ids]
    if not any("\ufffd" in piece for piece in singles):
        return singles
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        table = _byte_decoder()
        pieces = []
        for i, (token, single) in enumerate(zip(tokenizer.convert_ids_to_tokens(ids), singles)):
            byte_level = isinstance(token, str) and token and all(ch in table for ch in token)
            pieces.append(bytes(table[ch] for ch in token) if byte_level and "\ufffd" in single
                          else single.encode("utf-8"))
        return _split_characters(pieces)
    out = list(singles)                 # other tokenizers (byte fallback): a run of broken tokens decoded together
    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and j - i < 8 and "\ufffd" in singles[j]:
            j += 1
        if j - i > 1:
            group = tokenizer.decode(ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if group.count("\ufffd") < sum(piece.count("\ufffd") for piece in singles[i:j]):
                out[i:j] = [group] + [""] * (j - i - 1)
        i = max(j, i + 1)
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the byte each character stands for."""
    bs = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _split_characters(pieces: list[bytes]) -> list[str]:
    """Each token's bytes as text, a UTF-8 character going to the token that holds its first byte."""
    data = b"".join(pieces)

    def starts(k: int) -> bool:
        return k >= len(data) or (data[k] & 0xC0) != 0x80

    out, begin = [], 0
    for piece in pieces:
        end = begin + len(piece)
        a = begin
        while a < end and not starts(a):
            a += 1
        b = end
        while not starts(b):
            b += 1
        out.append(data[a:b].decode("utf-8", errors="replace") if a < end else "")
        begin = end
    return out


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
    prompt with left padding) or ``[B, V]``. Probabilities are a softmax over the label words only,
    of the logits divided by the task's ``temperature`` where ``task.json`` records one (fitted on
    the validation split: calibrated probabilities; the argmax is the same).
    """
    if not loaded.label_ids:
        raise TaskError(f"{loaded.name or 'this model'} has no task (no task.json with label_words)")
    names = list(loaded.label_ids)
    ids = torch.tensor([loaded.label_ids[n] for n in names], device=logits.device)
    scores = _last(logits, position).detach().double().index_select(-1, ids)
    temperature = float((loaded.task or {}).get("temperature", 1.0))
    probs = (scores / temperature).softmax(dim=-1)
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
