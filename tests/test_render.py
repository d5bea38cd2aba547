"""Terminal colouring, matrix images and the HTML/JSON report (no model needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from implicit_attention import render
from implicit_attention.render import (
    OutputDirectoryError,
    ReportExample,
    ReportLayer,
    color_tokens,
    display_token,
    matrix_png,
    normalize_relevance,
    relevance_rgb,
    write_report,
)

TOKENS = ["a", " b", " c"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ terminal
def test_color_tokens_exact_escapes() -> None:
    expected = ("\x1b[38;2;0;0;0;48;2;255;0;0ma\x1b[0m"           # +1: full red
                "\x1b[38;2;0;0;0;48;2;128;128;255m b\x1b[0m"      # -0.5: half blue
                "\x1b[38;2;0;0;0;48;2;255;255;255m c\x1b[0m")     # 0: white
    assert color_tokens(TOKENS, [1.0, -0.5, 0.0], color=True) == expected
    # normalised by max |r|: the scale does not matter; tensors are accepted
    assert color_tokens(TOKENS, torch.tensor([4.0, -2.0, 0.0]), color=True) == expected


def test_color_tokens_plain_text() -> None:
    assert color_tokens(TOKENS, [1.0, -0.5, 0.0], color=False) == "a[+1.00] b[-0.50] c[+0.00]"
    assert color_tokens(TOKENS, [0.0, 0.0, 0.0], color=False) == "a[+0.00] b[+0.00] c[+0.00]"
    assert color_tokens(TOKENS, [float("nan"), -3.0, 1.5], color=False) == "a[+0.00] b[-1.00] c[+0.50]"
    with pytest.raises(ValueError):
        color_tokens(TOKENS, [1.0, 2.0], color=False)


def test_relevance_helpers() -> None:
    assert normalize_relevance([2.0, -4.0]) == [0.5, -1.0]
    assert relevance_rgb(1.0) == (255, 0, 0) and relevance_rgb(-1.0) == (0, 0, 255)
    assert relevance_rgb(0.0) == (255, 255, 255) and relevance_rgb(7.0) == (255, 0, 0)
    # escape sequences in the input never reach the terminal
    assert display_token("\x1b[31mx\n") == "\\x1b[31mx\\n"
    assert "\x1b" not in color_tokens(["\x1b[2J"], [1.0], color=False)


# -------------------------------------------------------------------------------------- images
def test_matrix_png(tmp_path: Path) -> None:
    signed = torch.tril(torch.randn(5, 5))
    path = matrix_png(signed, ["<s>", " $x$", " ", "\n", " long" * 10], tmp_path / "m.png", "signed")
    assert path.read_bytes().startswith(PNG_MAGIC)
    big = matrix_png(torch.rand(80, 80), [f"t{i}" for i in range(80)], tmp_path / "big.png", "no ticks")
    assert big.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError):
        matrix_png(torch.zeros(3, 4), None, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        matrix_png(torch.zeros(3, 3), ["a"], tmp_path / "bad.png")


# -------------------------------------------------------------------------------------- report
def _report_args(text: str = "<script>alert('x')</script> & co") -> dict:
    matrices = {i: {"mean": torch.tril(torch.randn(3, 3)), "abs": torch.tril(torch.rand(3, 3))} for i in (0, 1)}
    example = ReportExample(text=text, tokens=["<s>", " <b>", " &"], relevance=torch.tensor([0.1, -0.2, 1.0]),
                            prediction={"label": "positive", "probability": 0.75, "kind": "label",
                                        "probabilities": {"positive": 0.75, "negative": 0.25}},
                            target={"id": 5, "token": " positive", "label": "positive", "position": 2},
                            token_ids=[1, 2, 3], matrices=matrices)
    layers = [ReportLayer(0, "backbone.layers.0.mixer", 1e-7, "mamba"),
              ReportLayer(1, "backbone.layers.1.mixer", float("nan"), "mamba")]
    return dict(examples=[example], layers=layers, method="attribution", variant="unified", model="tiny <model>")


def test_write_report(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "report"
    args = _report_args()
    html_path = write_report(out, **args)
    assert html_path == out / "report.html"
    info = json.loads((out / "explanation.json").read_text(encoding="utf-8"))
    ex = info["examples"][0]
    assert ex["tokens"] == ["<s>", " <b>", " &"] and len(ex["relevance"]) == 3
    assert ex["relevance_normalized"] == pytest.approx([0.1, -0.2, 1.0])
    assert info["layers"][1]["error"] is None and info["max_error"] == pytest.approx(1e-7)  # NaN -> null
    assert len(ex["images"]) == 4 and sorted(p.name for p in out.iterdir()) == sorted(info["files"])
    for name in info["files"]:
        if name.endswith(".png"):
            assert (out / name).read_bytes().startswith(PNG_MAGIC)
    html = html_path.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in html
    # the page's data: the tokens and matrices, with no "<" that could end its script element early
    data = json.loads(re.search(r'<script id=report-data type="application/json">(.*?)</script>', html).group(1))
    assert "<" not in re.search(r'<script id=report-data type="application/json">(.*?)</script>', html).group(1)
    assert data["examples"][0]["tokens"] == ["<s>", " <b>", " &"]
    mean = data["examples"][0]["matrices"]["1"]["mean"]
    assert mean == pytest.approx(args["examples"][0].matrices[1]["mean"].flatten().tolist(), rel=1e-3, abs=1e-12)
    assert "tiny &lt;model&gt;" in html and "&lt;b&gt;" in html
    assert 'style="background: rgb(255, 0, 0)"' in html          # the most relevant token
    assert "title=" in html and "relevance 1" in html              # value in the tooltip
    assert "1.000e-07" in html and "positive" in html and "0.7500" in html
    assert [p.name for p in tmp_path.iterdir()] == ["nested"]
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["report"]  # no temporary directory left


def test_write_report_is_atomic(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fails_late(matrix, tokens, path, title="", **kw):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("boom")
        Path(path).write_bytes(PNG_MAGIC)

    monkeypatch.setattr(render, "matrix_png", fails_late)
    with pytest.raises(RuntimeError, match="boom"):
        write_report(tmp_path / "out", **_report_args())
    assert list(tmp_path.iterdir()) == []
    # an existing empty directory is left empty on failure too
    (tmp_path / "out").mkdir()
    calls.clear()
    with pytest.raises(RuntimeError):
        write_report(tmp_path / "out", **_report_args())
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and list((tmp_path / "out").iterdir()) == []


def test_write_report_existing_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_report(out, **_report_args())                     # empty directory: fine
    with pytest.raises(OutputDirectoryError, match="not empty"):
        write_report(out, **_report_args())
    (out / "mine.txt").write_text("keep")
    args = _report_args("second")
    args["layers"] = args["layers"][:1]                     # fewer images than the first report
    write_report(out, overwrite=True, **args)
    info = json.loads((out / "explanation.json").read_text(encoding="utf-8"))
    assert info["examples"][0]["text"] == "second"
    assert sorted(p.name for p in out.iterdir()) == sorted(info["files"] + ["mine.txt"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirectoryError, match="not a directory"):
        write_report(tmp_path / "file", **_report_args())


def test_write_report_rejects_mismatched_relevance(tmp_path: Path) -> None:
    args = _report_args()
    args["examples"][0].relevance = [1.0, 2.0]
    with pytest.raises(ValueError, match="3 tokens"):
        write_report(tmp_path / "out", **args)
    assert list(tmp_path.iterdir()) == []
    assert {"implicit_attention", "torch", "transformers", "python"} <= set(render.versions())


def test_report_says_when_the_check_sampled_channels(tmp_path: Path) -> None:
    """A layer whose exactness check covered a sample of its channels (long inputs) is marked "sampled"."""
    import implicit_attention as ia

    from conftest import tiny_mamba

    model = tiny_mamba(dtype=torch.float64, hidden_size=24, num_hidden_layers=3)   # 48 channels > SAMPLED_CHANNELS
    result = ia.decompose(model, torch.randint(1, 40, (1, 50), generator=torch.Generator().manual_seed(0)))
    full, by_channels, by_rows = result.layers
    assert full.error_channels == full.channels == 48 and full.error_rows is None
    by_channels._row_outputs = lambda rows: None                      # an architecture without fast rows
    by_channels.measure_error(max_entries=0)                          # as above FULL_CHECK_ENTRIES
    assert by_channels.error_channels < by_channels.channels and by_channels.error <= 1e-6
    by_rows.measure_error(max_entries=0)                              # Mamba: every channel on 8 of 50 rows
    assert by_rows.error_channels == 48 and by_rows.error_rows == 8 and by_rows.error <= 1e-6
    layers = [ReportLayer(layer.index, layer.name, layer.error, "mamba", channels=layer.channels,
                          error_channels=layer.error_channels, error_rows=layer.error_rows)
              for layer in (full, by_channels, by_rows)]
    args = _report_args()
    args["examples"][0].matrices = {}
    html_path = write_report(tmp_path / "sampled", **{**args, "layers": layers})
    html = html_path.read_text(encoding="utf-8")
    assert f"(sampled: {by_channels.error_channels} of 48 channels)" in html
    assert "(sampled: 8 rows, all 48 channels)" in html
    assert html.count("(sampled:") == 2 and "a sample of each layer&#x27;s channels" in html
    info = json.loads((tmp_path / "sampled" / "explanation.json").read_text(encoding="utf-8"))
    assert [layer["sampled"] for layer in info["layers"]] == [False, True, True]
    assert info["layers"][1]["error_channels"] == by_channels.error_channels and info["layers"][1]["channels"] == 48
    assert info["layers"][2]["error_rows"] == 8
    plain = write_report(tmp_path / "full", **_report_args()).read_text(encoding="utf-8")
    assert "sampled" not in plain                                    # layers without channel counts: not marked


@pytest.mark.parametrize("length, title", [(5, "signed"), (40, "layer 3 (backbone.layers.3.mixer): attribution"),
                                           (80, "")])
def test_matrix_png_margins_fit_every_text(length: int, title: str) -> None:
    """The margins set without tight_layout keep every text (ticks, axis labels, title, the colour bar's
    ticks and offset) inside the image, and leave most of it to the map."""
    from implicit_attention.render import _matrix_figure

    tokens = ["<s>", " $x$", " ", "\n", " long" * 10] + [f" tok{i}" for i in range(length - 5)]
    fig = _matrix_figure((torch.rand(length, length) - 0.3) * 1e-7, tokens, title, None)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labelled = [t for t in fig.axes[0].get_xticklabels() + fig.axes[0].get_yticklabels() if t.get_text().strip()]
    assert len(labelled) == (2 * length if length <= 64 else len(labelled))
    for axes in fig.axes:            # the map's and the colour bar's: every text drawn with them
        box = axes.get_tightbbox(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.width + 1 and box.y1 <= fig.bbox.height + 1
    map_box = fig.axes[0].get_window_extent(renderer)
    assert map_box.height > 0.6 * fig.bbox.height
