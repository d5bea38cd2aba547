"""benchmarks/vision.py on a tiny random ViT and the saved composites: results, resumption, the table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from implicit_attention.vision.classifiers import build_classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vision_bench", ROOT / "benchmarks" / "vision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_resumes_and_reports(bench, tmp_path):
    build_classifier("vit", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16).save_pretrained(tmp_path / "models" / "vit")
    out = tmp_path / "run"
    args = ["--models", "vit,deit", "--model-dir", str(tmp_path / "models"), "--methods", "raw,random",
            "--data", str(ROOT / "data" / "fashion-composites" / "test"), "--out", str(out), "--resamples", "100",
            "--no-progress", "--batch-size", "2"]
    threads = torch.get_num_threads()
    try:
        assert bench.main(args + ["--limit", "3"]) == 0
        lines = (out / "results.jsonl").read_text().splitlines()
        assert len(lines) == 6                                             # deit has no model: skipped
        # an interrupted write leaves a cut line: it is dropped, and only the missing images run
        (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
        assert bench.main(args + ["--limit", "4"]) == 0
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert sorted((r["method"], r["index"]) for r in records) == [(m, i) for m in ("random", "raw")
                                                                       for i in range(4)]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["vit"]["raw"]["n"] == 4 and set(summary["vit"]["raw"]["segmentation"]) == {
            "pixel_accuracy", "miou", "map", "ap_foreground"}
        table = (out / "table.md").read_text()
        assert "| method | pos. vit (lower better) | neg. vit (higher better) | seg. vit" in table
        assert "| raw |" in table and "| random |" in table
        with pytest.raises(SystemExit, match="other settings"):
            bench.main(args + ["--limit", "4", "--seed", "1"])
    finally:
        torch.set_num_threads(threads)


REPO_ROOT = Path(__file__).resolve().parent.parent
README_MODELS = {"ViM": "vim", "DeiT": "deit", "ViT": "vit"}
README_METHODS = {"attribution (unified)": "attribution", "attribution, S6-only (predecessor)": "attribution:s6",
                  "paper (rollout of the second half)": "paper", "gradient x input": "grad_x_input",
                  "random": "random", "attribution (Chefer et al.)": "attribution", "rollout": "rollout",
                  "paper": "paper"}


def _readme_section(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    return text[text.index(title):]


def test_the_readme_image_table_is_the_shipped_benchmark_summary():
    """Every figure of the README's image results table is docs/benchmark/vision_summary.json's, rounded."""
    summary = json.loads((REPO_ROOT / "docs" / "benchmark" / "vision_summary.json").read_text())
    section = _readme_section("**Results** on the first 1,000 test composites")
    rows = [line for line in section.splitlines()[:30] if line.startswith("| ") and "," in line.split("|")[1]
            and not line.startswith("| model")]
    assert len(rows) == 10
    for row in rows:
        name, positive, negative, miou, mean_ap = [cell.strip() for cell in row.strip("|").split("|")]
        model, method = name.split(", ", 1)
        scores = summary[README_MODELS[model]][README_METHODS[method]]
        for cell, interval in ((positive, scores["positive_auc"]), (negative, scores["negative_auc"])):
            assert cell == f"{interval['mean']:.1f} [{interval['low']:.1f}, {interval['high']:.1f}]", (name, cell)
        assert float(miou) == round(100 * scores["segmentation"]["miou"]["mean"], 1), name
        assert float(mean_ap) == round(100 * scores["segmentation"]["map"]["mean"], 1), name
        assert scores["n"] == 1000


def test_the_shipped_image_models_pass_85_percent_as_the_readme_says():
    """The bundled ViM and DeiT: test accuracy at least 85% on 10,000 test composites (their train.json),
    float16 checkpoints under 3 MB, and the README's training table quotes them."""
    from implicit_attention.bundled import BUNDLED_IMAGE_MODELS, bundled_image_model_path

    section = _readme_section("**Trained models.**").replace("**", "")
    for name in BUNDLED_IMAGE_MODELS:
        record = json.loads((bundled_image_model_path(name) / "train.json").read_text())
        accuracy = record["test_accuracy"]
        assert accuracy["n"] == 10_000 and accuracy["mean"] >= 0.85, (name, accuracy)
        assert (bundled_image_model_path(name) / "model.safetensors").stat().st_size <= 3_000_000
        quoted = f"{100 * accuracy['mean']:.1f}% [{100 * accuracy['low']:.1f}, {100 * accuracy['high']:.1f}]"
        assert quoted in section, (name, quoted)
