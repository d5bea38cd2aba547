"""Rough edges of issue 14, second round: long inputs (a warning, a progress bar, a short echo), an unknown
model type, the supported-class list, non-ASCII tokens on the command line, and the right-padding advice."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import implicit_attention as ia  # noqa: E402
from implicit_attention import cli  # noqa: E402
from implicit_attention.architectures.registry import supported_model_classes, unsupported_model  # noqa: E402
from implicit_attention.errors import LongInputWarning  # noqa: E402
from implicit_attention.loading import LoadedModel, ModelLoadError, load_model  # noqa: E402
from implicit_attention.text import display_strings  # noqa: E402

from conftest import tiny_mamba  # noqa: E402

LONG = " ".join(["a truly great film with a dull plot"] * 12)          # about 100 tokens, 431 characters
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def loaded():
    return load_model()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------ 1: long inputs
def test_loader_exposes_the_training_length(loaded) -> None:
    assert loaded.task["max_sentence_tokens"] == 64 and loaded.max_training_tokens == 64
    assert LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, task={"settings": {"max_tokens": 32}}
                       ).max_training_tokens == 32
    assert LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer).max_training_tokens is None


def test_explain_texts_warns_of_a_text_longer_than_the_training_length(loaded) -> None:
    with pytest.warns(LongInputWarning, match=r"^the text is \d+ tokens long, but rt-sentiment-mamba \(bundled\) "
                                              r"was trained on texts of at most 64 tokens"):
        ia.explain_texts(loaded, LONG, method="grad_x_input")
    with pytest.warns(LongInputWarning, match=r"^text 2 is up to \d+ tokens long"):
        ia.explain_texts(loaded, ["a fine film", LONG], method="grad_x_input")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LongInputWarning)
        ia.explain_texts(loaded, "a fine film", method="grad_x_input")          # short: no warning


def test_cli_long_text_warns_shows_progress_and_cuts_the_echo(capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "LONG_INPUT_TOKENS", 50)
    code, out, err = run(capsys, "explain", LONG, "--layers=-1", "--no-color")
    assert code == 0, err
    warning_lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1 and "at most 64 tokens" in warning_lines[0]
    assert "decomposing" in err                                           # the progress bar over the layers
    assert f"text: {LONG[:cli.ECHO_CHARACTERS]!r}... ({len(LONG)} characters)" in out
    assert LONG not in out
    code, out, err = run(capsys, "explain", LONG, "--layers=-1", "--no-color", "--no-progress")
    assert code == 0 and "decomposing" not in err


def test_cli_short_text_has_no_warning_nor_progress_bar(capsys) -> None:
    code, out, err = run(capsys, "explain", "a fine film", "--layers=-1", "--no-color")
    assert code == 0 and err == ""
    assert "text: 'a fine film'" in out


# --------------------------------------------------------------------------- 2: unknown model type
def test_unknown_model_type_is_named(capsys, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "foo_bar_lm",
                                                      "architectures": ["FooBarForCausalLM"]}))
    with pytest.raises(ModelLoadError, match=r"model_type 'foo_bar_lm', which the installed transformers \S+ "
                                             r"does not know"):
        load_model(tmp_path)
    code, _, err = run(capsys, "info", "--model", tmp_path)
    assert code == 2 and "foo_bar_lm" in err and "no token-mixing layer" not in err


def test_supported_class_list_is_short_and_without_repeats() -> None:
    classes = supported_model_classes()
    assert len(classes) == len(set(classes))
    message = str(unsupported_model("OPTForCausalLM"))
    named = re.findall(r"\b\w+(?:ForCausalLM|LMHeadModel|ForSequenceClassification|ForImageClassification|Model)\b",
                       message.split("include", 1)[1])
    assert len(named) == len(set(named)) and len(named) <= 16
    assert "MambaForCausalLM" in named and "MambaModel" not in named  # a backbone cannot be explained
    assert "implicit-attention info --architectures" in message and len(message) < 700


# ------------------------------------------------------------------------------ 3: non-ASCII tokens
def test_multi_token_characters_are_shown_once(loaded) -> None:
    text = "café naïve 日本"
    ids = loaded.tokenizer(text)["input_ids"]
    single = [loaded.tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in single)                     # byte tokens of ï, 日, 本
    shown = display_strings(loaded.tokenizer, ids)
    assert len(shown) == len(ids) and not any("\ufffd" in piece for piece in shown)
    assert "".join(shown) == loaded.tokenizer.decode(ids) and "".join(shown).endswith(text)
    result = ia.explain_texts(loaded, text)
    example = result[0]
    assert len(example.tokens) == len(example.relevance) == len(example.token_ids)   # relevance per token
    assert "".join(example.tokens) == f"<s> {text} sentiment:"              # the prefix space


def test_cli_shows_non_ascii_text_readably(capsys) -> None:
    code, out, _ = run(capsys, "explain", "café naïve 日本", "--color")
    assert code == 0 and "\ufffd" not in out
    assert "café naïve 日本 sentiment:" in ANSI.sub("", out)
    code, out, _ = run(capsys, "explain", "café naïve 日本", "--no-color")
    assert code == 0 and "\ufffd" not in out and "日[" in out and "本[" in out


# ------------------------------------------------------------------------- 4: right-padding advice
def test_right_padding_warning_gives_advice_that_works() -> None:
    model = tiny_mamba()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.warns(UserWarning, match="padding in example") as record:
        ia.explain(model, ids, mask, method="grad_x_input")
    message = str(record[0].message)
    assert "on the left" in message and "explain_texts" in message and "or pass position=" not in message


def test_explain_dataset_warns_of_the_first_long_input_only(capsys, tmp_path: Path) -> None:
    data = tmp_path / "reviews.txt"
    data.write_text("\n".join(["a fine film", LONG, LONG + " again", "a dull film", LONG]) + "\n", encoding="utf-8")
    code, _, err = run(capsys, "explain-dataset", data, "--out", tmp_path / "run", "--method", "grad_x_input",
                       "--no-progress", "--reports", "0")      # reports cost seconds each and are not checked
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("warning: explain-dataset: input 1 is ") and "at most 64" in lines[0]
