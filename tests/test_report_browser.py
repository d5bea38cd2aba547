"""The HTML pages in a real browser: Debian's chromium driven by playwright loads the report that
``implicit-attention explain --out`` writes for the bundled model, and the test checks the DOM
(the tokens and their values), the matrix viewer (the drawn pixels are the saved numbers' colours,
the layer slider redraws another layer, a hovered token marks its row, a hovered cell reads its
value) and writes a screenshot; then the ``index.html`` of ``explain-dataset`` (sorting by a
column, the misclassified-only and text filters). Skips, saying why, where no browser is installed (``make test``
installs one where it can)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from implicit_attention.cli import main
from implicit_attention.render import relevance_rgb

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on this machine (make test installs Debian's chromium where apt-get can)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(["explain", "an utterly charming film", "--out", str(out)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    page_data = json.loads(re.search(r'<script id=report-data type="application/json">(.*?)</script>', html,
                                     flags=re.S).group(1))
    return out, json.loads((out / "explanation.json").read_text(encoding="utf-8")), page_data


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def _open(browser, path: Path, **options):
    """A new page on ``path`` whose script errors collect in ``page.errors``."""
    page = browser.new_page(**options)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri())
    page.errors = errors
    return page


@pytest.fixture(scope="module")
def page(browser, report):
    out, _, _ = report
    page = _open(browser, out / "report.html", viewport={"width": 1200, "height": 1600})
    page.wait_for_selector(".viewer[data-checksum]")
    yield page
    page.close()


def _expected_colour(value: float, scale: float) -> tuple[int, int, int]:
    """The page's signed colour map, written out: red for positive, blue for negative, white for 0."""
    w = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    c = round(255 * (1 - abs(w)))
    return (255, c, c) if w >= 0 else (c, c, 255)


def _pixel(page, x: int, y: int) -> tuple[int, int, int]:
    """The drawn colour at ``(x, y)`` of the matrix (the canvas less its margin of token labels)."""
    origin = int(page.locator(".viewer").get_attribute("data-origin"))
    return tuple(page.evaluate(
        "([x, y]) => Array.from(document.querySelector('.viewer canvas').getContext('2d')"
        ".getImageData(x, y, 1, 1).data.slice(0, 3))", [x + origin, y + origin]))


def test_the_page_shows_the_tokens_and_their_values(page, report):
    _, info, _ = report
    example = info["examples"][0]
    spans = page.locator(".tokens .tok")
    assert spans.count() == len(example["tokens"])
    titles = [spans.nth(i).get_attribute("title") for i in range(spans.count())]
    for i, (title, value) in enumerate(zip(titles, example["relevance"])):
        assert title.startswith(f"#{i} ") and f"relevance {value:.4g}" in title
    assert "charming" in page.locator(".tokens").inner_text()
    spans.nth(2).hover()
    assert page.locator(".token-readout").inner_text() == titles[2]
    assert page.errors == []


def test_the_viewer_draws_the_saved_numbers_and_the_slider_changes_the_layer(page, report, tmp_path):
    out, info, data = report
    tokens = data["examples"][0]["tokens"]
    n, layers = len(tokens), data["layers"]
    assert len(layers) == len(info["layers"]) == 4
    cell = max(1, 480 // n)
    checksums = {}
    for position, layer in enumerate(layers):
        page.locator(".layer-slider").fill(str(position))
        assert page.locator(".viewer").get_attribute("data-layer") == str(layer["index"])
        assert page.locator(".layer-name").inner_text().startswith(f"layer {layer['index']} ({layer['name']}); ")
        values = data["examples"][0]["matrices"][str(layer["index"])]["mean"]
        scale = max(abs(v) for v in values)
        for i, j in [(n - 1, 0), (n - 1, n - 1), (n // 2, 1), (0, n - 1)]:   # (0, n - 1): above the diagonal, 0
            drawn = _pixel(page, j * cell + cell // 2, i * cell + cell // 2)
            assert all(abs(a - b) <= 1 for a, b in zip(drawn, _expected_colour(values[i * n + j], scale))), (i, j)
        assert _pixel(page, (n - 1) * cell + cell // 2, cell // 2) == (255, 255, 255)   # causal: nothing above
        checksums[layer["index"]] = page.locator(".viewer").get_attribute("data-checksum")
    assert len(set(checksums.values())) == len(layers)            # every layer drew a different matrix
    page.select_option(".aggregate", "abs")
    values = data["examples"][0]["matrices"][str(layers[-1]["index"])]["abs"]
    peak = max(range(len(values)), key=lambda k: values[k])
    assert _pixel(page, (peak % n) * cell + cell // 2, (peak // n) * cell + cell // 2) == (255, 0, 0)
    page.select_option(".aggregate", "mean")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")


def test_hovering_marks_a_row_and_reads_a_cell(page, report):
    _, _, data = report
    n = len(data["examples"][0]["tokens"])
    cell = max(1, 480 // n)
    page.locator(".layer-slider").fill("0")
    row = n - 2
    before = _pixel(page, 2, row * cell + 1)
    page.locator(".tokens .tok").nth(row).hover()
    marked = _pixel(page, 2, row * cell + 1)
    assert marked != before and marked[1] > marked[0] and marked[1] > marked[2]   # the green outline
    canvas = page.locator(".viewer canvas")
    box = canvas.bounding_box()
    origin = int(page.locator(".viewer").get_attribute("data-origin"))
    assert origin > 0                                          # 10 tokens: cells tall enough for labels
    scale = box["width"] / (origin + cell * n)
    canvas.hover(position={"x": (origin + cell / 2) * scale, "y": (origin + (n - 1) * cell + cell / 2) * scale})
    value = data["examples"][0]["matrices"][str(data["layers"][0]["index"])]["mean"][(n - 1) * n]
    text = page.locator(".viewer .readout").inner_text()
    assert text.startswith(f"A[{n - 1}, 0] = ") and float(text.split(" = ")[1].split()[0]) == pytest.approx(value,
                                                                                                      rel=1e-3)


@pytest.fixture(scope="module")
def dataset_page(browser, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    (folder / "reviews.csv").write_text(
        "id,text,label\nr1,an utterly charming film,positive\nr2,a dull and lifeless mess,negative\n"
        "r3,the best movie of the year,positive\nr4,not good at all,negative\nr5,boring,positive\n", encoding="utf-8")
    out = folder / "run"
    assert main(["explain-dataset", str(folder / "reviews.csv"), "--label-column", "label", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    page = _open(browser, out / "index.html")
    yield page, rows
    page.close()


def test_the_data_set_page_sorts_and_filters_the_examples(dataset_page):
    page, rows = dataset_page
    assert page.locator("table.examples tbody tr").count() == len(rows) == 5
    ids = lambda: page.evaluate("Array.from(document.querySelectorAll('table.examples tbody tr'))"  # noqa: E731
                                ".filter(row => !row.hidden).map(row => row.cells[1].textContent)")
    assert ids() == [row["id"] for row in rows]                              # in the file's order
    page.click("th:has-text('probability')")
    assert ids() == [row["id"] for row in sorted(rows, key=lambda r: r["probability"])]
    page.click("th:has-text('probability')")
    assert ids() == [row["id"] for row in sorted(rows, key=lambda r: -r["probability"])]
    page.check("#only-wrong")
    wrong = [row["id"] for row in sorted(rows, key=lambda r: -r["probability"]) if row["correct"] is False]
    assert ids() == wrong and page.locator("#shown").inner_text() == str(len(wrong))
    page.uncheck("#only-wrong")
    page.fill("#search", "film")
    assert ids() == [row["id"] for row in rows if "film" in row["text"]]
    accuracy = sum(row["correct"] for row in rows) / len(rows)
    assert f"{accuracy:.4f}" in page.locator("table.meta").inner_text()
    first = page.locator("table.examples tbody tr").first
    assert first.locator(".tok").count() == len(rows[0]["tokens"])
    assert page.errors == []


def test_the_data_set_page_links_each_example_to_its_full_report(dataset_page):
    page, rows = dataset_page
    page.fill("#search", "")
    links = page.locator("a.report")
    assert links.count() == len(rows)                          # --reports defaults to 10: every row here
    page.locator("a.report", has_text="3").click()
    page.wait_for_selector(".viewer[data-checksum]")           # the report, its matrices drawn
    assert page.locator("p.text").inner_text() == rows[3]["text"]
    assert page.locator(".tokens .tok").count() == len(rows[3]["tokens"])
    page.go_back()


@pytest.fixture(scope="module")
def compared(browser, tmp_path_factory):
    out = tmp_path_factory.mktemp("compared") / "out"
    assert main(["explain", "an utterly charming film", "--compare", "rollout,attribution:s6,grad_x_input",
                 "--channels", "5,-1", "--out", str(out)]) == 0
    info = json.loads((out / "explanation.json").read_text(encoding="utf-8"))
    html = (out / "report.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id=report-data type="application/json">(.*?)</script>', html,
                                flags=re.S).group(1))
    page = _open(browser, out / "report.html", viewport={"width": 1200, "height": 1600})
    page.wait_for_selector(".viewer[data-checksum]")
    yield page, info, data
    page.close()


def _backgrounds(page) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('.tokens .tok')).map(s => s.style.background)")


def test_the_switcher_recolours_the_tokens_with_another_method(compared):
    page, info, _ = compared
    example = info["examples"][0]
    assert list(example["alternatives"]) == ["rollout:unified", "attribution:s6", "grad_x_input"]
    first = _backgrounds(page)
    for name, alternative in example["alternatives"].items():
        page.select_option(".method-switch", name)
        drawn = _backgrounds(page)
        for i, (own, weight) in enumerate(zip(example["in_span"], alternative["relevance_normalized"])):
            if own:
                assert drawn[i] == "rgb({}, {}, {})".format(*relevance_rgb(weight)), (name, i)
            else:                                                   # the template keeps its grey
                assert drawn[i] == first[i]
        assert page.locator(".tokens .tok").nth(5).get_attribute("title").startswith("#5 ")
    page.select_option(".method-switch", "attribution:unified")
    assert _backgrounds(page) == first
    assert page.errors == []


def test_the_channel_picker_draws_the_layers_own_channel(compared):
    """A picked channel moves the viewer to its layer and draws that channel's matrix, which is the
    decomposition's ``channel_matrix`` of the last layer."""
    import torch

    import implicit_attention as ia

    page, info, data = compared
    last = info["layers"][-1]
    page.locator(".layer-slider").fill("0")
    page.select_option(".aggregate", "channel 5")
    assert page.locator(".viewer").get_attribute("data-layer") == str(last["index"])
    loaded = ia.load_model()
    ids = torch.tensor([info["examples"][0]["token_ids"]])
    layer = ia.decompose(loaded.model, ids, layers=[-1]).layers[0]
    expected = layer.channel_matrix(5)[0].flatten().tolist()
    values = data["examples"][0]["matrices"][str(last["index"])]["channel 5"]
    assert values == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert str(last["index"]) in data["examples"][0]["matrices"] and \
        f"channel {layer.channels - 1}" in data["examples"][0]["matrices"][str(last["index"])]   # -1: the last
    n = len(data["examples"][0]["tokens"])
    cell = max(1, 480 // n)
    scale = max(abs(v) for v in values)
    i, j = max(((i, j) for i in range(n) for j in range(n)), key=lambda ij: abs(values[ij[0] * n + ij[1]]))
    drawn = _pixel(page, j * cell + cell // 2, i * cell + cell // 2)
    assert drawn == _expected_colour(values[i * n + j], scale) and drawn in [(255, 0, 0), (0, 0, 255)]
