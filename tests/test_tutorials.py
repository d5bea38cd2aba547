"""Every Python block of docs/tutorials.md runs, tutorial by tutorial (one fresh namespace each, the
blocks in order), in a scratch directory holding the repository's zoo/ and data/, and prints what
the page says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "tutorials.md"


def tutorials() -> dict[str, list[str]]:
    """``{title: [python blocks]}`` of the page's ``## `` sections, in order."""
    sections = re.split(r"^## ", PAGE.read_text(encoding="utf-8"), flags=re.M)[1:]
    return {s.splitlines()[0]: re.findall(r"```python\n(.*?)```", s, flags=re.S) for s in sections}


def run_tutorial(title: str, directory: Path, monkeypatch) -> str:
    for name in ("zoo", "data"):
        (directory / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(directory)
    printed = io.StringIO()
    namespace: dict = {"__name__": "__tutorial__"}
    with contextlib.redirect_stdout(printed):
        for number, block in enumerate(tutorials()[title]):
            exec(compile(block, f"{PAGE.name}: {title}, block {number + 1}", "exec"), namespace)
    return printed.getvalue()


def test_the_page_has_the_five_tutorials():
    assert [t.split(".")[0] for t in tutorials()] == ["1", "2", "3", "4", "5"]
    assert all(tutorials().values())


def _title(number: int) -> str:
    return next(t for t in tutorials() if t.startswith(f"{number}."))


def test_explain_a_sentence(tmp_path, monkeypatch):
    out = run_tutorial(_title(1), tmp_path, monkeypatch)
    lines = out.splitlines()
    assert re.match(r"positive 0\.9\d+ \[.*'charming'", lines[0]), lines[0]
    assert re.match(r"negative 0\.9\d+ \[.*'(lifeless|dull)'", lines[1]), lines[1]
    assert "prediction: positive" in out and "charming" in out
    assert out.rstrip().endswith("negative torch.Size([10])")


def test_compare_a_mamba_and_a_transformer(tmp_path, monkeypatch):
    out = run_tutorial(_title(2), tmp_path, monkeypatch)
    errors = [float(e) for e in re.findall(r"error (\S+)$", out, flags=re.M)]
    assert len(errors) == 2 and max(errors) < 1e-5                      # both last layers exact
    assert "mamba predicts" in out and "gpt2  predicts" in out and "transformer.h.3.attn" in out
    correlation = float(re.search(r"token relevance: (\S+)", out).group(1))
    assert -1 <= correlation <= 1
    assert len(re.findall(r"mean look-back: \d+\.\d tokens", out)) == 2


def test_explain_a_data_set(tmp_path, monkeypatch):
    out = run_tutorial(_title(3), tmp_path, monkeypatch)
    assert out.splitlines()[0] == "accuracy 0.667 on 3 labelled texts"     # "boring" is read as negative
    assert "['index.html', 'reports', 'results.jsonl', 'run.json', 'summary.json']" in out
    page = (tmp_path / "out" / "tutorial" / "reviews" / "index.html").read_text()
    assert page.count("<tr id=ex-") == 3 and page.count('class=report href="reports/') == 3


def test_evaluate_faithfulness(tmp_path, monkeypatch):
    out = run_tutorial(_title(4), tmp_path, monkeypatch)
    scores = dict(re.findall(r"^(\w+)\s+mean dA ([+-]\S+)$", out, flags=re.M))
    assert set(scores) == {"attribution", "random"}
    assert float(scores["attribution"]) > float(scores["random"])


def test_explain_an_image(tmp_path, monkeypatch):
    out = run_tutorial(_title(5), tmp_path, monkeypatch)
    assert out.startswith("true ['Ankle boot', 'Bag', 'Coat', 'Bag'] predicted [")
    shares = re.findall(r"^(\w+)\s+share of positive relevance on the object (\S+) \(the object covers (\S+)",
                        out, flags=re.M)
    assert [variant for variant, _, _ in shares] == ["unified", "s6"]
    for _, share, covered in shares:                                  # relevance gathers on the object
        assert float(share) > float(covered)


@pytest.mark.parametrize("path", ["README.md"])
def test_the_readme_points_to_the_tutorials(path):
    assert "docs/tutorials.md" in (ROOT / path).read_text(encoding="utf-8")
