"""Spans: which tokens come from the user's text (the template's ``{text}`` slot), their character
offsets, normalisation and ranking over the span, words, and how the CLI, report and data-set tool show them."""

from __future__ import annotations

import json

import pytest
import torch

import implicit_attention as ia
from implicit_attention import cli
from implicit_attention.explanations.texts import TextExplanation
from implicit_attention.loading import load_model
from implicit_attention.render import color_tokens, normalize_relevance
from implicit_attention.text import encode_text


@pytest.fixture(scope="module")
def loaded():
    return load_model()


def test_the_span_is_the_text_slot_and_its_offsets_rebuild_the_text(loaded):
    text = "a  gorgeous, witty, seductive movie"                    # two spaces: collapsed as in training
    encoded = encode_text(loaded, text)
    tokens = [loaded.tokenizer.decode([i]) for i in encoded.ids]
    assert encoded.text == "a gorgeous, witty, seductive movie"
    # BOS and the template "{text} sentiment:" are outside; every token of the text is inside
    outside = [tok for tok, keep in zip(tokens, encoded.in_span) if not keep]
    assert outside == [loaded.tokenizer.bos_token, " sentiment", ":"], outside
    offsets = [o for o in encoded.offsets if o is not None]
    assert len(offsets) == sum(encoded.in_span)
    assert "".join(encoded.text[a:b] for a, b in offsets) == encoded.text          # contiguous, complete
    assert all(tok.strip() == encoded.text[a:b].strip()
               for tok, o in zip(tokens, encoded.offsets) if o is not None for a, b in [o])


def example(tokens, relevance, in_span, offsets, span_text) -> TextExplanation:
    return TextExplanation(text=span_text, tokens=tokens, token_ids=list(range(len(tokens))),
                           relevance=torch.tensor(relevance, dtype=torch.float64), prediction=None, target=None,
                           run=None, row=0, in_span=in_span, offsets=offsets, span_text=span_text)


def test_normalisation_ranking_and_words_read_the_span_only():
    ex = example(["<s>", " un", "bear", "able", " film", " sentiment", ":"], [0.5, 0.1, -0.2, 0.3, 0.25, 0.9, 0.4],
                 [False, True, True, True, True, False, False],
                 [None, (0, 2), (2, 6), (6, 10), (10, 15), None, None], "unbearable film")
    assert ex.span_scale == pytest.approx(0.3)                      # the template's 0.9 does not set the scale
    assert ex.normalized()[3] == pytest.approx(1.0) and ex.normalized()[5] == pytest.approx(3.0)
    assert ex.top_tokens(2) == [("able", pytest.approx(0.3)), (" film", pytest.approx(0.25))]
    assert ex.words() == [("unbearable", pytest.approx(0.2)), ("film", pytest.approx(0.25))]   # 0.1 - 0.2 + 0.3
    assert normalize_relevance([0.5, 0.1, -0.2], [False, True, True]) == pytest.approx([2.5, 0.5, -1.0])
    plain = color_tokens([" a", " b", " c"], [2.0, 1.0, -0.5], color=False, span=[False, True, True])
    assert plain == " a(+2.00) b[+1.00] c[-0.50]"


def test_cli_report_and_dataset_show_the_span(capsys, loaded, tmp_path):
    code = cli.main(["explain", "a gorgeous, witty, seductive movie", "--no-color", "--words", "--out",
                     str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 0 and "over the text; the prompt template's values in parentheses" in out
    assert " sentiment(" in out and "[+1.00]" in out and "words (whitespace-separated, their tokens summed, same scale): a[" in out
    info = json.loads((tmp_path / "report" / "explanation.json").read_text())
    (ex,) = info["examples"]
    assert ex["tokens"][1:16] == [" a", " g", "or", "ge", "ous", ",", " wit", "ty", ",", " s", "ed", "u", "ct", "ive",
                                  " movie"]                              # the text; then " sentiment", ":"
    assert ex["in_span"] == [False] + [True] * 15 + [False, False]
    assert max(abs(w) for w, keep in zip(ex["relevance_normalized"], ex["in_span"]) if keep) == pytest.approx(1.0)
    assert ex["span_text"] == "a gorgeous, witty, seductive movie" and ex["offsets"][1] == [0, 1]
    assert [w for w, _ in ex["words"]] == ["a", "gorgeous,", "witty,", "seductive", "movie"]
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count('class="tok template"') == 3                   # <s>, " sentiment", ":"

    data = tmp_path / "reviews.txt"
    data.write_text("an utterly charming film\n")
    assert cli.main(["explain-dataset", str(data), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    row = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    # a token's span starts at the space before it
    assert row["tokens"][1:8] == [" an", " ut", "ter", "ly", " char", "ming", " film"]
    assert row["in_span"] == [False] + [True] * 7 + [False, False]
    assert row["offsets"][1:8] == [[0, 2], [2, 5], [5, 8], [8, 10], [10, 15], [15, 19], [19, 24]]
    assert row["offsets"][0] is None and row["offsets"][8:] == [None, None]


def test_all_tokens_normalises_over_the_prompt(capsys):
    assert cli.main(["explain", "a gorgeous movie", "--no-color", "--all-tokens"]) == 0
    out = capsys.readouterr().out
    assert "over the prompt" in out and "(+" not in out.split("relevance")[-1].splitlines()[1]


def test_explain_texts_keeps_the_span_for_every_text(loaded):
    result = ia.explain_texts(loaded, ["dull", "a quiet, moving triumph"], method="grad_x_input")
    for ex in result:
        assert len(ex.in_span) == len(ex.tokens) == len(ex.offsets)
        assert [tok for tok, keep in zip(ex.tokens, ex.in_span) if not keep][-2:] == [" sentiment", ":"]


def test_run_explanation_span_restricts_normalisation_and_ranking():
    from conftest import left_padded, tiny_mamba

    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=6)
    full = ia.run_explanation(model, ids, mask, method="grad_x_input", target=4)
    spanned = ia.run_explanation(model, ids, mask, method="grad_x_input", target=4, span=slice(2, 5))
    assert torch.equal(full.relevance, spanned.relevance)                   # the relevance itself is unchanged
    r = full.relevance
    for b in range(2):
        inside = torch.zeros(6, dtype=torch.bool)
        inside[2:5] = True
        inside &= mask[b].bool()
        scale = r[b][inside].abs().max()
        assert torch.allclose(spanned.normalized()[b], r[b] / scale)
        order = sorted(inside.nonzero().reshape(-1).tolist(), key=lambda i: -float(r[b, i]))
        assert spanned.top_tokens(2)[b] == order[:2]
    as_mask = ia.run_explanation(model, ids, mask, method="grad_x_input", target=4,
                                 span=torch.tensor([False, False, True, True, True, False]))
    assert torch.equal(as_mask.span, spanned.span)
    with pytest.raises(ValueError, match="span must be a slice or a bool mask"):
        ia.run_explanation(model, ids, mask, method="grad_x_input", span=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="no real token"):
        ia.run_explanation(model, ids, mask, method="grad_x_input", span=slice(0, 1))
