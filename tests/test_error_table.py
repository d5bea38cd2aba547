"""benchmarks/error_table.py, which prints the README's table of reconstruction errors."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(\d\.\de-\d+|0)"


def error_table():
    """``benchmarks/error_table.py`` as a module (registered first: its dataclasses look themselves up)."""
    name = "benchmarks_error_table"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "error_table.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_one_cheap_row_is_a_markdown_row_of_small_errors(capsys):
    table = error_table().main(["--only", "mamba", "--seeds", "1"])
    assert capsys.readouterr().out.strip() == table.strip()
    header, rule, *rows = table.splitlines()
    assert header == "| architecture | classes | variants (first = exact default) | float32 | float64 |"
    assert rule == "|---|---|---|---|---|" and len(rows) == 1
    match = re.fullmatch(rf"\| Mamba \| `MambaForCausalLM`, `MambaModel` \| .+ \| {NUMBER} \| {NUMBER} \|", rows[0])
    assert match, rows[0]
    assert float(match.group(1)) < 1e-4 and float(match.group(2)) < 1e-6


def test_the_readme_table_is_the_scripts():
    """Same rows, same text columns, numbers in the script's format: the README shows what it prints."""
    script = error_table()
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(script.HEADER.splitlines()[0])
    table = lines[start + 2:start + 2 + len(script.ROWS)]
    assert len(table) == len(script.ROWS)
    for line, row in zip(table, script.ROWS):
        numbers = re.fullmatch(rf"\| (.*) \| {NUMBER} \| {NUMBER} \|", line)
        assert numbers, line
        assert line == script.table_row(row, {dtype: float(numbers.group(i + 2))
                                              for i, dtype in enumerate(script.DTYPES)}), line
    assert not lines[start + 2 + len(script.ROWS)].startswith("|"), "the README table has rows the script lacks"
    above = lines[:start - 1]                                     # the paragraph just above the table
    paragraph = " ".join(above[len(above) - above[::-1].index(""):])
    assert "printed by `python benchmarks/error_table.py`" in paragraph and "rerun" in paragraph
