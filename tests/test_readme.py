"""The README's Python example runs as written, on the bundled model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    layer, result = namespace["layer"], namespace["result"]
    assert layer.matrix.shape[-1] == namespace["ids"].shape[-1]
    assert max(result.errors) <= 1e-4
    assert torch.allclose(namespace["rebuilt"], layer.output, rtol=1e-4, atol=1e-5)
    assert namespace["relevance"].shape == namespace["ids"].shape
    assert torch.isfinite(namespace["relevance_s6"]).all()


def test_readme_text_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict = {}
    for block in blocks[:2]:                              # the second uses the first's imports
        exec(compile(block, "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()[-2:]
    assert [line.split()[0] for line in lines] == ["positive", "negative"]
    # sub-word tokens of the text (" utterly" is " ut" "ter" "ly") and the template's tokens too
    assert "(' ut', " in lines[0] and "('ly', " in lines[0] and "(' mess', " in lines[1] and "(':', " in lines[1]


def test_readme_method_table_names_real_tests_for_every_method():
    import implicit_attention as ia

    text = README.read_text()
    table = [line for line in text.splitlines() if line.startswith("| `")]
    named = {re.match(r"\| `(\w+)`", line).group(1) for line in table}
    assert set(ia.METHODS) <= named, set(ia.METHODS) - named
    sources = "".join(path.read_text() for path in README.parent.joinpath("tests").glob("test_*.py"))
    for test in re.findall(r"`(test_\w+)`", "\n".join(table)):
        assert f"def {test}(" in sources, f"the README names {test}, which no test defines"
