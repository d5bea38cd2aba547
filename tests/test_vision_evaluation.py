"""The image evaluations on hand-made cases: average precision, the segmentation test, patch removal,
the perturbation curves and the published table layout; then one batch of a tiny ViT end to end."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from implicit_attention.benchmark.stats import Interval
from implicit_attention.vision.evaluation import (
    FRACTIONS,
    average_precision,
    curve_auc,
    evaluate_batch,
    format_table,
    patch_order,
    perturbation_curve,
    pooled_ratio_ci,
    remove_patches,
    segmentation_counts,
    segmentation_summary,
    summarize,
    upsample,
)

from conftest import assert_close


def square_mask(size: int = 16, top: int = 4, left: int = 8, side: int = 6) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:top + side, left:left + side] = True
    return mask


# --------------------------------------------------------------------------------- AP
def test_average_precision_by_hand():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0]) == 1.0
    # hits at ranks 1 and 3: precision 1 at recall 1/2, 2/3 at recall 1
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # ties enter together: one threshold, precision = prevalence
    assert average_precision([0.5] * 5, [1, 0, 0, 1, 0]) == pytest.approx(0.4)
    assert average_precision([0.2, 0.1], [0, 0]) == 0.0                 # no positive: 0 (the paper's nan_to_num)


def test_average_precision_agrees_with_scikit_learn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed")
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 6, 200) / 5, rng.random(200) < 0.3
    assert average_precision(scores, labels) == pytest.approx(metrics.average_precision_score(labels, scores))


# ----------------------------------------------------------------------- segmentation
def test_a_map_equal_to_the_mask_scores_one_everywhere():
    mask = square_mask()
    counts = segmentation_counts(mask.double() * 3.0, mask)                # any scale: min-max normalised
    assert counts.correct == counts.pixels == 256
    assert counts.intersection == counts.union == (256 - 36, 36)
    assert counts.ap == 1.0 and counts.ap_foreground == 1.0
    summary = segmentation_summary([counts, counts], resamples=200)
    for key in ("pixel_accuracy", "miou", "map", "ap_foreground"):
        assert (summary[key].mean, summary[key].low, summary[key].high) == pytest.approx((1.0, 1.0, 1.0)), key


def test_an_inverted_map_scores_zero_and_a_constant_map_finds_nothing():
    mask = square_mask()
    inverted = segmentation_counts((~mask).double(), mask)
    assert inverted.correct == 0 and inverted.intersection == (0, 0) and inverted.ap_foreground < 0.2
    assert segmentation_summary([inverted], resamples=100)["miou"].mean == pytest.approx(0.0, abs=1e-12)
    constant = segmentation_counts(torch.ones(16, 16), mask)
    assert constant.correct == 256 - 36 and constant.intersection[1] == 0    # nothing above the mean
    assert constant.ap_foreground == pytest.approx(36 / 256)                 # ties: the prevalence


def test_the_threshold_is_the_maps_mean():
    heat = torch.zeros(4, 4)
    heat[0, :2] = 1.0                                                         # mean 0.125: two pixels above
    heat[1, 0] = 0.1                                                          # below the mean: background
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, :3] = True
    counts = segmentation_counts(heat, mask)
    assert counts.intersection == (13, 2) and counts.union == (14, 3) and counts.correct == 15
    summary = segmentation_summary([counts], resamples=100)
    assert summary["miou"].mean == pytest.approx((13 / 14 + 2 / 3) / 2)
    assert summary["pixel_accuracy"].mean == pytest.approx(15 / 16)


def test_pooled_ratio_interval():
    iv = pooled_ratio_ci([1, 2, 3], [2, 4, 6], resamples=500)
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.5, 0.5, 0.5, 3)
    iv = pooled_ratio_ci([0, 10], [10, 10], resamples=2000)
    assert iv.mean == 0.5 and iv.low == 0.0 and iv.high == 1.0


def test_upsample_puts_the_relevant_patch_where_it_is():
    heat = upsample(torch.tensor([0.0, 0.0, 0.0, 5.0]), (2, 2), (8, 8))
    assert heat.shape == (8, 8) and float(heat.min()) == 0.0 and float(heat.max()) == 1.0
    assert float(heat[4:, 4:].mean()) > 0.6 > float(heat[:4, :4].mean())
    assert torch.all(upsample(torch.ones(4), (2, 2), (8, 8)) == 0)
    with pytest.raises(ValueError, match="patch values"):
        upsample(torch.ones(3), (2, 2), (8, 8))


# ----------------------------------------------------------------------- perturbation
def test_remove_patches_sets_exactly_those_patches():
    pixels = torch.arange(2 * 4 * 6, dtype=torch.float64).reshape(2, 4, 6) + 1
    out = remove_patches(pixels, torch.tensor([1, 5]), (2, 3), fill=torch.tensor([-1.0, -2.0]))
    removed = torch.zeros(4, 6, dtype=torch.bool)
    removed[:2, 2:4] = removed[2:, 4:] = True                               # patches 1 and 5 of a 2 x 3 grid
    assert torch.all(out[0][removed] == -1) and torch.all(out[1][removed] == -2)
    assert torch.equal(out[:, ~removed], pixels[:, ~removed])
    with pytest.raises(ValueError, match="grid"):
        remove_patches(pixels, torch.tensor([0]), (3, 3), 0.0)


def test_patch_order_breaks_ties_by_index_in_both_directions():
    r = torch.tensor([0.5, 0.9, 0.5, 0.1])
    assert patch_order(r, most_relevant_first=True).tolist() == [1, 0, 2, 3]
    assert patch_order(r, most_relevant_first=False).tolist() == [3, 0, 2, 1]


class ObjectDetector(nn.Module):
    """Class 1 while the object (bright pixels in patch 0 of a 2 x 2 grid of 4 x 4 patches) is there."""

    config = SimpleNamespace(image_size=8, patch_size=4)

    def forward(self, pixel_values):
        present = pixel_values[:, 0, :4, :4].mean(dim=(-1, -2)) > 0.5
        logits = torch.stack([(~present).double(), present.double()], dim=-1) * 4
        return SimpleNamespace(logits=logits)


def test_ranking_the_object_first_drops_the_positive_curve_first():
    pixels = torch.zeros(1, 8, 8)
    pixels[0, :4, :4] = 1.0
    good = torch.tensor([3.0, 1.0, 0.5, 0.0])                               # the object's patch first
    positive = perturbation_curve(ObjectDetector(), pixels, good, 1, most_relevant_first=True)
    negative = perturbation_curve(ObjectDetector(), pixels, good, 1, most_relevant_first=False)
    # 4 patches: 10% removes none, 20%..30% one, ..., 90% all four
    assert positive.counts == [0, 1, 1, 2, 2, 2, 3, 3, 4]
    assert positive.correct == [True] + [False] * 8
    assert negative.correct == [True] * 8 + [False]
    assert curve_auc(positive) < curve_auc(negative)
    assert curve_auc(positive) == pytest.approx(100 * 0.1 / 2) and curve_auc(negative) == pytest.approx(100 * 0.75)
    # the reverse ranking swaps the two tests
    bad = perturbation_curve(ObjectDetector(), pixels, -good, 1, most_relevant_first=True)
    assert bad.correct == negative.correct
    assert positive.fractions == list(FRACTIONS)


def test_removed_patches_get_the_fill_value():
    seen = []

    class Recorder(ObjectDetector):
        def forward(self, pixel_values):
            seen.append(pixel_values.clone())
            return super().forward(pixel_values)

    pixels = torch.ones(1, 8, 8)
    perturbation_curve(Recorder(), pixels, torch.tensor([0.0, 1.0, 2.0, 3.0]), 0, most_relevant_first=True,
                       fill=-0.25, fractions=(0.5,))
    batch = seen[0]
    assert torch.all(batch[0, 0, 4:, :] == -0.25) and torch.all(batch[0, 0, :4, :] == 1)   # patches 3, 2 removed


# ----------------------------------------------------------------------------- table
def test_table_has_the_published_layout():
    iv = Interval(mean=0.5, low=0.4, high=0.6, n=10)
    auc = Interval(mean=17.27, low=16.0, high=18.5, n=10)
    seg = {"pixel_accuracy": iv, "map": iv, "miou": iv, "ap_foreground": iv}
    summary = {"vit": {"raw": {"positive": auc, "negative": auc, "segmentation": seg}}}
    table = format_table(summary, ["vit", "deit"], ["raw", "rollout"])
    lines = table.splitlines()
    assert lines[0] == ("| method | pos. vit (lower better) | pos. deit (lower better) | neg. vit (higher better) | "
                        "neg. deit (higher better) | seg. vit (pix. acc / mAP / mIoU) | "
                        "seg. deit (pix. acc / mAP / mIoU) |")
    assert lines[2] == ("| raw | 17.27 [16.00, 18.50] | - | 17.27 [16.00, 18.50] | - | 50.00 [40.00, 60.00] / "
                        "50.00 [40.00, 60.00] / 50.00 [40.00, 60.00] | - |")
    assert lines[3] == "| rollout | - | - | - | - | - | - |"


# ----------------------------------------------------------------------- end to end
def test_evaluate_batch_on_a_tiny_vit():
    from implicit_attention.vision.classifiers import build_classifier

    model = build_classifier("vit", image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=8).double()
    pixels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    masks = torch.stack([square_mask(), square_mask(top=0, left=0)])
    records = evaluate_batch(model, pixels, [1, 2], masks, method="attribution")
    assert len(records) == 2
    for b, record in enumerate(records):
        assert record["label"] == [1, 2][b] and 0 <= record["prediction"] < 10
        assert record["positive"]["counts"] == [2, 3, 5, 6, 8, 10, 11, 13, 14]       # of 16 patches
        assert 0 <= record["positive_auc"] <= 80 and 0 <= record["negative_auc"] <= 80
        assert record["segmentation"]["pixels"] == 256
    # the perturbation starts from the model's own logits on the input: no patch removed, same prediction
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    first = perturbation_curve(model, pixels[0], torch.zeros(16), int(logits[0].argmax()), most_relevant_first=True,
                               fractions=(0.0, 0.5))
    assert first.correct[0] and first.score[0] == pytest.approx(float(logits[0].max()))
    summary = summarize(records, resamples=200)
    assert summary["n"] == 2 and set(summary["segmentation"]) == {"pixel_accuracy", "miou", "map", "ap_foreground"}
    assert_close(torch.tensor(summary["positive"].mean), torch.tensor(np.mean([r["positive_auc"] for r in records])),
                 1e-12, "mean AUC")


def _paired_record(index: int, correct_positive: list[bool], intersection, union, ap: float) -> dict:
    from implicit_attention.benchmark.metrics import Curve
    from implicit_attention.vision.evaluation import SegmentationCounts

    def curve(correct, first):
        return Curve(fractions=[0.0, 0.5, 1.0], probability=[0.5] * 3, score=[0.0] * 3, correct=correct,
                     counts=[0, 1, 2], most_relevant_first=first).to_dict()
    seg = SegmentationCounts(correct=0, pixels=10, intersection=tuple(intersection), union=tuple(union), ap=ap,
                             ap_foreground=ap)
    return {"index": index, "positive": curve(correct_positive, True), "negative": curve([True] * 3, False),
            "segmentation": seg.to_dict()}


def test_paired_comparison_by_hand():
    """Per image: positive AUC of [1, 0, 0] is 25%, of [1, 1, 0] 75%; IoU (3/4 + 1/2) / 2 = 62.5% against
    (2/4 + 1/4) / 2 = 37.5%; AP 90% against 60%. Images are matched by index, in any order."""
    from implicit_attention.vision.evaluation import format_paired, paired_comparison

    a = [_paired_record(i, [True, False, False], (3, 1), (4, 2), 0.9) for i in range(6)]
    b = [_paired_record(i, [True, True, False], (2, 1), (4, 4), 0.6) for i in reversed(range(6))]
    result = paired_comparison(a, b + [_paired_record(9, [False] * 3, (0, 0), (1, 1), 0.0)], resamples=200)
    assert result["positive AUC"].difference == pytest.approx(25 - 75)
    assert result["negative AUC"].difference == pytest.approx(0.0)
    assert result["IoU"].difference == pytest.approx(62.5 - 37.5)
    assert result["AP"].difference == pytest.approx(90 - 60)
    assert all(r.n == 6 for r in result.values())
    table = format_paired({("vim", "attribution", "attribution:s6"): result})
    assert "-50.00 [-50.00, -50.00]" in table and "(attribution)" in table and "+0.00" in table
    with pytest.raises(ValueError, match="share no image"):
        paired_comparison(a, [_paired_record(99, [True] * 3, (1, 1), (1, 1), 1.0)])
