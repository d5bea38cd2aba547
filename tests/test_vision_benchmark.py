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
