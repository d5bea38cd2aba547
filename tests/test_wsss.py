"""Weakly supervised segmentation (implicit_attention.vision.segmentation, benchmarks/wsss.py):
pseudo-masks, mIoU and the segmenter on hand-made cases, the explanation heatmaps against the
evaluation's own pipeline, and a reduced end-to-end run on the saved composites."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from implicit_attention.vision.segmentation import (
    SegmenterTraining,
    clean_mask,
    explanation_heatmaps,
    mask_counts,
    masks_miou,
    miou_interval,
    predict_masks,
    pseudo_masks,
    threshold_at_mean,
    train_segmenter,
)

REPO = Path(__file__).resolve().parent.parent
SAVED = REPO / "data" / "fashion-composites" / "test"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_threshold_at_mean_by_hand() -> None:
    # normalised 0, 1/3, 2/3, 1: the mean is 1/2
    assert threshold_at_mean(torch.tensor([[0.0, 1.0], [2.0, 3.0]])).tolist() == [[False, False], [True, True]]
    # a shifted, scaled copy thresholds the same; one bright pixel of four is above a mean of 1/4
    batch = torch.stack([torch.tensor([[10.0, 12.0], [14.0, 16.0]]), torch.tensor([[0.0, 0.0], [0.0, 5.0]])])
    assert threshold_at_mean(batch).tolist() == [[[False, False], [True, True]], [[False, False], [False, True]]]
    assert not threshold_at_mean(torch.full((3, 3), 2.0)).any()


def test_clean_mask_keeps_the_largest_opened_component() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:3, 0:3] = True           # 9 pixels: survives the opening, but is not the largest
    mask[5:9, 5:9] = True           # 16 pixels: kept
    mask[0, 8] = True               # an isolated pixel: opened away
    mask[8, 0:3] = True             # a one-pixel-thick line: opened away
    expected = np.zeros((10, 10), dtype=bool)
    expected[5:9, 5:9] = True
    assert np.array_equal(clean_mask(mask).numpy(), expected)
    # nothing survives the opening: the largest component of the mask itself is kept
    thin = np.zeros((6, 6), dtype=bool)
    thin[1, 0:5] = True
    thin[4, 0:2] = True
    expected_thin = np.zeros((6, 6), dtype=bool)
    expected_thin[1, 0:5] = True
    assert np.array_equal(clean_mask(thin).numpy(), expected_thin)
    assert not clean_mask(np.zeros((4, 4), dtype=bool)).any()
    with pytest.raises(ValueError, match="one \\[H, W\\] mask"):
        clean_mask(np.zeros((2, 4, 4), dtype=bool))


def test_pseudo_masks_threshold_then_clean() -> None:
    heat = torch.zeros(1, 8, 8)
    heat[0, 2:6, 2:6] = 1.0
    heat[0, 0, 7] = 1.0             # a lone hot pixel: above the mean, removed by the cleaning
    raw = pseudo_masks(heat, clean=False)
    cleaned = pseudo_masks(heat)
    assert raw[0, 0, 7] and int(raw.sum()) == 17
    assert not cleaned[0, 0, 7] and int(cleaned.sum()) == 16 and cleaned[0, 2:6, 2:6].all()


def test_mask_counts_and_miou_by_hand() -> None:
    truth = torch.tensor([[True, True], [False, False]])
    predicted = torch.tensor([[True, False], [True, False]])
    counts = mask_counts(predicted, truth)
    # background: both at (1, 1); either at (0, 1), (1, 0), (1, 1). foreground: both at (0, 0); either at 3
    assert counts.intersection == (1, 1) and counts.union == (3, 3)
    # pooled over a second image predicted perfectly (2 background, 2 foreground pixels):
    # background IoU (1 + 2) / (3 + 2) = 0.6, foreground (1 + 2) / (3 + 2) = 0.6
    interval = masks_miou(torch.stack([predicted, truth]), torch.stack([truth, truth]), resamples=2000)
    assert interval.mean == pytest.approx(0.6) and interval.n == 2
    # resampling two images: both the first (1/3), both the second (1), or one of each (0.6)
    assert interval.low == pytest.approx(1 / 3) and interval.high == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        mask_counts(predicted, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="n >= 1"):
        miou_interval(np.zeros((0, 2)), np.zeros((0, 2)))


def test_segmenter_learns_a_learnable_mask() -> None:
    """Bright squares on noise: a segmenter trained on their masks finds them on new images."""
    def squares(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        images = 0.3 * torch.rand(count, 1, 16, 16, generator=g)
        masks = torch.zeros(count, 16, 16, dtype=torch.bool)
        for i in range(count):
            r, c = torch.randint(0, 10, (2,), generator=g).tolist()
            masks[i, r:r + 6, c:c + 6] = True
            images[i, 0, r:r + 6, c:c + 6] += 0.6
        return images, masks

    images, masks = squares(64, 0)
    model = train_segmenter(images, masks, SegmenterTraining(steps=150, batch_size=16, width=8), progress=False)
    test_images, test_masks = squares(32, 1)
    assert masks_miou(predict_masks(model, test_images), test_masks, resamples=200).mean > 0.9
    # the same settings and data train the same network
    again = train_segmenter(images, masks, SegmenterTraining(steps=150, batch_size=16, width=8), progress=False)
    assert torch.equal(predict_masks(again, test_images), predict_masks(model, test_images))
    with pytest.raises(ValueError, match="as many masks as images"):
        train_segmenter(images, masks[:3], progress=False)


def _saved(count: int):
    from implicit_attention.vision.composites import CompositeFolder

    folder = CompositeFolder(SAVED)
    items = [folder[i] for i in range(count)]
    return (torch.stack([p for p, _, _ in items]), torch.tensor([label for _, label, _ in items]),
            torch.stack([m for _, _, m in items]))


@pytest.mark.skipif(not (SAVED / "index.csv").is_file(), reason="saved composites not present")
def test_explanation_heatmaps_explain_the_given_label() -> None:
    from implicit_attention.bundled import bundled_image_model_path
    from implicit_attention.explanations.api import run_explanation
    from implicit_attention.inputs import prepare_model_inputs
    from implicit_attention.vision.classifiers import load_classifier
    from implicit_attention.vision.composites import normalize
    from implicit_attention.vision.evaluation import patch_grid, patch_relevance, upsample

    model = load_classifier(bundled_image_model_path("fashion-deit"))
    images, labels, _ = _saved(2)
    pixels = normalize(images)
    heat = explanation_heatmaps(model, pixels, labels.tolist(), method="attribution")
    assert heat.shape == (2, 64, 64)
    # the evaluation's own steps, with the label as the target
    inputs = prepare_model_inputs(model, pixels)
    relevance = run_explanation(model, inputs, method="attribution", target=labels).relevance
    patches = patch_relevance(relevance, inputs.patch_positions)
    for b in range(2):
        assert torch.allclose(heat[b], upsample(patches[b], patch_grid(model), (64, 64)).float(), atol=1e-6)
    # another label gives another map: the label is what is explained
    other = ((labels + 1) % 10).tolist()
    assert not torch.allclose(explanation_heatmaps(model, pixels, other, method="attribution"), heat, atol=1e-3)


@pytest.mark.skipif(not (SAVED / "index.csv").is_file(), reason="saved composites not present")
def test_wsss_benchmark_end_to_end(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("wsss_bench", REPO / "benchmarks" / "wsss.py")
    wsss = importlib.util.module_from_spec(spec)
    sys.modules["wsss_bench"] = wsss
    spec.loader.exec_module(wsss)
    out = tmp_path / "run"
    args = ["--data", "saved", "--train-images", "24", "--test-images", "16", "--steps", "20", "--explain-batch", "16",
            "--sources", "deit:rollout,truth,random", "--out", str(out), "--no-progress"]
    assert wsss.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["source"]: row for row in results["sources"]}
    assert list(rows) == ["deit:rollout", "truth", "random"]
    assert rows["truth"]["pseudo_miou"]["mean"] == pytest.approx(1.0)
    # the rollout's pseudo-masks, recomputed here from the cached maps, score what the row says
    _, _, truth = _saved(24)
    maps = torch.cat([torch.load(f) for f in sorted((out / "maps" / "deit-rollout").glob("*.pt"))])
    assert maps.shape == (24, 64, 64)
    expected = masks_miou(pseudo_masks(maps), truth)
    assert rows["deit:rollout"]["pseudo_miou"]["mean"] == pytest.approx(expected.mean)
    assert rows["deit:rollout"]["train_images"] == 24 and rows["deit:rollout"]["test_images"] == 16
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 3 and "| truth | 100.0 [100.0, 100.0] |" in table
    # a rerun reuses every row; other settings are refused
    capsys.readouterr()
    assert wsss.main(args) == 0
    assert capsys.readouterr().out.count("done before") == 3
    with pytest.raises(SystemExit, match="other settings.*--steps: 20 there, 21 now"):
        wsss.main([*args[:7], "21", *args[8:]])
    with pytest.raises(SystemExit):
        wsss.main(["--sources", "vim", "--out", str(tmp_path / "bad")])
