"""Notebook and console display of explanations (issue 14 item 2): ``_repr_html_``, ``__str__``, ``show``."""

from __future__ import annotations

import io
import re
import sys
import types
from html.parser import HTMLParser

import pytest
import torch

import implicit_attention as ia
from implicit_attention.render import display_token, normalize_relevance

TEXTS = ["an utterly charming film", 'a dull mess & <b>"x"</b>']
VOID = {"br", "img", "meta", "hr", "input", "link"}


@pytest.fixture(scope="module")
def result():
    loaded = ia.load_model()
    # signed relevance: both colours appear
    return ia.explain_texts(loaded, TEXTS, method="signed_attribution")


class Tags(HTMLParser):
    """Checks that tags nest and close; collects the elements that carry ``data-relevance``."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tokens: list[dict] = []      # {"attrs": ..., "text": ...} of each element with data-relevance
        self.open_token: dict | None = None
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag in VOID:
            return
        self.stack.append(tag)
        attrs = dict(attrs)
        if self.open_token is not None and "inner" not in self.open_token and background(attrs.get("style", "")):
            self.open_token["inner"] = background(attrs["style"])      # a bar inside a position's column
        if "data-relevance" in attrs:
            self.open_token = {"attrs": attrs, "text": "", "depth": len(self.stack)}
            self.tokens.append(self.open_token)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        if self.open_token is not None and self.open_token["depth"] == len(self.stack):
            self.open_token = None
        self.stack.pop()

    def handle_data(self, data):
        if self.open_token is not None:
            self.open_token["text"] += data


def parse(fragment: str) -> Tags:
    parser = Tags()
    parser.feed(fragment)
    parser.close()
    assert not parser.problems, parser.problems
    assert not parser.stack, f"unclosed tags: {parser.stack}"
    assert "script" not in parser.tags and "http" not in fragment      # self-contained
    return parser


def background(style: str) -> tuple[int, int, int] | None:
    match = re.search(r"background: rgb\((\d+), (\d+), (\d+)\)", style)
    return tuple(int(x) for x in match.groups()) if match else None


def check_sign(rgb, value: float) -> None:
    r, _, b = rgb
    if value > 0:
        assert r > b, (rgb, value)
    elif value < 0:
        assert b > r, (rgb, value)
    else:
        assert r == b, (rgb, value)


def check_example_tokens(example, tokens: list[dict]) -> None:
    assert [t["text"] for t in tokens] == [display_token(tok) for tok in example.tokens]
    for token, value, keep in zip(tokens, example.relevance.tolist(), example.in_span):
        attrs = token["attrs"]
        assert float(attrs["data-relevance"]) == value            # the exact value, in the title too
        assert f"relevance {attrs['data-relevance']} " in attrs["title"]
        if keep:
            check_sign(background(attrs["style"]), value)
        else:                                                       # the template: greyed, no background
            assert background(attrs["style"]) is None and "#999" in attrs["style"]
            assert "prompt template" in attrs["title"]


def test_text_html_has_every_token_escaped_with_its_value_and_the_colour_of_its_sign(result):
    assert any(v < 0 for ex in result for v in ex.relevance.tolist())
    assert any(v > 0 for ex in result for v in ex.relevance.tolist())
    for example in result:
        fragment = example._repr_html_()
        parsed = parse(fragment)
        check_example_tokens(example, parsed.tokens)
        for token in example.tokens:
            assert __import__("html").escape(display_token(token), quote=True) in fragment
        assert example.prediction.label in fragment and example.target.score in fragment
    assert "<b>" not in result[1]._repr_html_() and "&lt;b&gt;" in result[1]._repr_html_()


def test_texts_html_shows_every_text(result):
    parsed = parse(result._repr_html_())
    first = len(result[0].tokens)
    check_example_tokens(result[0], parsed.tokens[:first])
    check_example_tokens(result[1], parsed.tokens[first:])


def test_str_without_a_terminal_has_bracketed_values_and_no_ansi(result, monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())           # not a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    for example in result:
        text = str(example)
        assert "\x1b" not in text and example.prediction.label in text
        weights = normalize_relevance(example.relevance, example.in_span)
        for token, weight, keep in zip(example.tokens, weights, example.in_span):
            assert (f"{display_token(token)}[{weight:+.2f}]" if keep else f"{display_token(token)}({weight:+.2f})") \
                in text
    both = str(result)
    assert "\x1b" not in both and "[1] " in both and "[2] " in both and "max reconstruction error" in both


def test_str_in_a_terminal_or_forced_is_coloured_and_no_color_turns_it_off(result, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\x1b[38;2;0;0;0;48;2;" in str(result[0]) and "\x1b[38;2;0;0;0;48;2;" in str(result)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b" not in str(result[0])
    assert "\x1b[38;2;0;0;0;48;2;" in result[0].console(color=True)        # forced
    assert "\x1b" not in result.console(color=False)


def test_repr_is_one_short_line(result):
    for obj in (result, result[0], result[0].run.explanation):
        text = repr(obj)
        assert "\n" not in text and len(text) < 200 and "tensor" not in text, text
    assert repr(result[0]).startswith("<TextExplanation 'an utterly charming film': ")


def test_explanation_html_has_a_bar_per_position_labelled_by_id(result):
    explanation = result[0].run.explanation
    parsed = parse(explanation._repr_html_())
    ids = explanation.decomposition.input_values
    mask = explanation.decomposition.attention_mask
    assert len(parsed.tokens) == explanation.relevance.numel()
    for bar, value, token_id, real in zip(parsed.tokens, explanation.relevance.reshape(-1).tolist(),
                                          ids.reshape(-1).tolist(), mask.reshape(-1).tolist()):
        assert float(bar["attrs"]["data-relevance"]) == value
        assert bar["text"] == str(token_id) and f"token id {token_id}" in bar["attrs"]["title"]
        assert ("padding" in bar["attrs"]["title"]) == (not real)
        check_sign(bar.get("inner", (255, 255, 255)), value)


def fake_ipython(monkeypatch) -> list:
    calls = []
    package = types.ModuleType("IPython")
    module = types.ModuleType("IPython.display")
    module.display = lambda *objs, **kwargs: calls.append((objs, kwargs))
    package.display = module
    monkeypatch.setitem(sys.modules, "IPython", package)
    monkeypatch.setitem(sys.modules, "IPython.display", module)
    return calls


def test_show_displays_the_html_with_ipython(result, monkeypatch, capsys):
    calls = fake_ipython(monkeypatch)
    for obj in (result[0], result, result[0].run.explanation):
        obj.show()
        (bundle,), kwargs = calls[-1]
        assert kwargs == {"raw": True}
        assert bundle["text/html"] == obj._repr_html_() and bundle["text/plain"] == str(obj)
    assert len(calls) == 3 and capsys.readouterr().out == ""


def test_show_without_ipython_prints_the_console_view(result, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "IPython", None)           # import IPython raises ImportError
    monkeypatch.setenv("NO_COLOR", "1")
    result[0].show()
    out = capsys.readouterr().out
    assert out == str(result[0]) + "\n" and "[+" in out


def test_a_loaded_result_displays_the_same(result, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    result.save(tmp_path / "saved")
    loaded = ia.TextExplanations.load(tmp_path / "saved")
    assert loaded[0]._repr_html_() == result[0]._repr_html_()
    saved, original = str(loaded).rsplit("\n", 1), str(result).rsplit("\n", 1)
    assert saved[0] == original[0]                       # the texts' views; the decomposition was not saved:
    assert saved[1] == "max reconstruction error: n/a (the decomposition was not kept)"
    assert torch.equal(loaded[0].relevance, result[0].relevance)


def test_a_baseline_explanation_labels_its_bars_by_position(monkeypatch):
    baseline = ia.explain_texts(ia.load_model(), "a dull mess", method="occlusion")
    explanation = baseline[0].run.explanation
    parsed = parse(explanation._repr_html_())
    assert [bar["text"] for bar in parsed.tokens] == [str(i) for i in range(explanation.relevance.shape[1])]
    for bar, value in zip(parsed.tokens, explanation.relevance.reshape(-1).tolist()):
        check_sign(bar.get("inner", (255, 255, 255)), value)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "n/a (the method does not decompose the layers)" in str(baseline)
    assert "\n" not in repr(explanation) and "occlusion" in repr(explanation)
