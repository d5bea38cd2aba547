"""The two image evaluations of explanations: segmentation against true masks, and patch perturbation.

Conventions:

- ``patch relevance``: ``[P]`` one value per image patch, in patch order (row-major over the
  ``grid = (rows, cols)`` of patches), read off an explanation's ``[L]`` token relevance at the
  model's patch positions (:func:`patch_relevance`; class tokens are not patches).
- ``heatmap``: ``[H, W]`` the patch map upsampled bilinearly to the image (:func:`upsample`) and
  min-max normalised to ``[0, 1]``, as in Chefer et al.'s ImageNet-segmentation code.
- ``mask``: ``[H, W]`` bool, the true foreground.

Segmentation test (:func:`segmentation_counts`, :func:`segmentation_summary`): the heatmap
thresholded at its mean is the predicted foreground; pixel accuracy and the two-class IoU
(foreground and background; mIoU their mean) are pooled over the data set (sums of correct
pixels, intersections and unions, as the paper's code accumulates them). Two average precisions
per image, averaged over images: ``ap`` the paper's "mAP" (the scores ``(1 - heatmap, heatmap)``
against the one-hot masks ``(background, foreground)``, flattened together, as its
``get_ap_scores`` does) and ``ap_foreground``, the threshold-free AP of the heatmap as the
foreground score alone. AP is scikit-learn's step-wise ``sum_n (R_n - R_{n-1}) P_n`` over the
distinct scores (:func:`average_precision`).

Perturbation test (:func:`perturbation_curve`): the patches are removed in order of relevance
(most relevant first: *positive*, lower AUC is better; least relevant first: *negative*, higher
is better), 10%, 20%, ..., 90% of them (:data:`FRACTIONS`); a removed patch has every pixel set
to ``fill`` (the data set's mean: 0 for inputs normalised by :func:`~.composites.normalize`).
At each step the model's accuracy against the true label is recorded (and the target's
probability); the AUC is the trapezoidal area over the fractions (:func:`~implicit_attention.benchmark.metrics.auc`),
reported in percent like the published numbers (so at most 80 over 10%..90%).

Intervals: bootstrap over images (:mod:`implicit_attention.benchmark.stats`); the pooled ratios
(pixel accuracy, IoU) are resampled as ratios of resampled sums (:func:`pooled_ratio_ci`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..benchmark.metrics import Curve, auc, count_for_fraction
from ..benchmark.stats import Interval, mean_ci

#: Fractions of the patches removed at the perturbation test's steps.
FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))


# ------------------------------------------------------------------------------------ maps
def patch_grid(model: nn.Module) -> tuple[int, int]:
    """``(rows, cols)`` of patches from the model's config (``image_size``, ``patch_size``; ints or pairs)."""
    config = model.config
    if isinstance(getattr(config, "grid_size", None), tuple):                # Vision Mamba's config says it
        return tuple(config.grid_size)
    size, patch = config.image_size, config.patch_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return size[0] // patch[0], size[1] // patch[1]


def patch_relevance(relevance: torch.Tensor, patch_positions: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` (or ``[P]``) the relevance of the patches from token relevance ``[B, L]`` (or ``[L]``)."""
    return relevance.index_select(-1, patch_positions.to(relevance.device))


def upsample(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` heatmap in ``[0, 1]``: the ``[P]`` patch relevance on its ``grid``, upsampled
    bilinearly to ``size`` and min-max normalised (a constant map gives zeros)."""
    if patches.numel() != grid[0] * grid[1]:
        raise ValueError(f"{patches.numel()} patch values for a {grid[0]} x {grid[1]} grid")
    image = torch.nn.functional.interpolate(patches.detach().double().reshape(1, 1, *grid).cpu(), size=size,
                                            mode="bilinear", align_corners=False)[0, 0]
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)


# --------------------------------------------------------------------------- segmentation
def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ``scores`` ``[n]`` for the boolean ``labels`` ``[n]`` (scikit-learn's definition).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct scores taken as thresholds, highest
    first (ties enter together). 0.0 when there is no positive (the paper's ``nan_to_num``).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ")
    positives = int(labels.sum())
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    ordered, hits = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(ordered) != 0), ordered.size - 1]     # end of each run of ties
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass(frozen=True)
class SegmentationCounts:
    """One image's segmentation test.

    Attributes:
        correct: pixels whose thresholded class (foreground: heatmap > its mean) is the true one.
        pixels: pixels in the image.
        intersection: ``[background, foreground]`` pixels in both the prediction and the truth.
        union: ``[background, foreground]`` pixels in either.
        ap: the paper's AP (``(1 - heatmap, heatmap)`` against the one-hot masks, flattened).
        ap_foreground: threshold-free AP of the heatmap as the foreground score.
    """

    correct: int
    pixels: int
    intersection: tuple[int, int]
    union: tuple[int, int]
    ap: float
    ap_foreground: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SegmentationCounts:
        return cls(int(data["correct"]), int(data["pixels"]), tuple(int(v) for v in data["intersection"]),
                   tuple(int(v) for v in data["union"]), float(data["ap"]), float(data["ap_foreground"]))


def segmentation_counts(heatmap: torch.Tensor, mask: torch.Tensor) -> SegmentationCounts:
    """The segmentation test of one ``[H, W]`` heatmap (any scale: min-max normalised here) against ``mask``."""
    heat = torch.as_tensor(heatmap).detach().double().cpu()
    truth = torch.as_tensor(mask).bool().cpu()
    if heat.shape != truth.shape:
        raise ValueError(f"heatmap {tuple(heat.shape)} and mask {tuple(truth.shape)} differ")
    low, high = heat.min(), heat.max()
    heat = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    predicted = heat > heat.mean()
    inter = (int((~predicted & ~truth).sum()), int((predicted & truth).sum()))
    union = (int((~predicted | ~truth).sum()), int((predicted | truth).sum()))
    scores = torch.stack([1 - heat, heat]).numpy()
    onehot = torch.stack([~truth, truth]).numpy()
    return SegmentationCounts(correct=int((predicted == truth).sum()), pixels=truth.numel(), intersection=inter,
                              union=union, ap=average_precision(scores, onehot),
                              ap_foreground=average_precision(heat.numpy(), truth.numpy()))


def pooled_ratio_ci(numerators: Sequence[float], denominators: Sequence[float], *, confidence: float = 0.95,
                    resamples: int = 10_000, seed: int = 0) -> Interval:
    """``sum(numerators) / sum(denominators)`` over images with a bootstrap percentile interval
    (images resampled with replacement, the ratio of the resampled sums)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.ndim != 1 or num.shape != den.shape or num.size == 0:
        raise ValueError(f"pooled_ratio_ci needs two 1-D samples of one length >= 1, got {num.shape}, {den.shape}")
    value = float(num.sum() / den.sum()) if den.sum() > 0 else 0.0
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    chunk = max(1, 2_000_000 // num.size)
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, num.size, size=(min(chunk, resamples - start), num.size))
        n, d = num[idx].sum(axis=1), den[idx].sum(axis=1)
        ratios[start:start + len(idx)] = np.where(d > 0, n / np.where(d > 0, d, 1), 0.0)
    alpha = 1 - confidence
    low, high = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return Interval(mean=value, low=float(low), high=float(high), n=int(num.size), confidence=confidence)


def segmentation_summary(counts: Sequence[SegmentationCounts], *, resamples: int = 10_000,
                         seed: int = 0) -> dict[str, Interval]:
    """Pixel accuracy, mIoU (pooled, as the paper), mAP and threshold-free AP (means over images), with intervals.

    mIoU's interval resamples images and recomputes ``(IoU_bg + IoU_fg) / 2`` of the resampled sums.
    """
    if not counts:
        raise ValueError("segmentation_summary needs at least one image")
    from .segmentation import miou_interval

    correct = np.array([c.correct for c in counts], dtype=np.float64)
    pixels = np.array([c.pixels for c in counts], dtype=np.float64)
    inter = np.array([c.intersection for c in counts], dtype=np.float64)         # [n, 2]
    union = np.array([c.union for c in counts], dtype=np.float64)
    return {"pixel_accuracy": pooled_ratio_ci(correct, pixels, resamples=resamples, seed=seed),
            "miou": miou_interval(inter, union, resamples=resamples, seed=seed),
            "map": mean_ci([c.ap for c in counts], resamples=resamples, seed=seed),
            "ap_foreground": mean_ci([c.ap_foreground for c in counts], resamples=resamples, seed=seed)}


# --------------------------------------------------------------------------- perturbation
def patch_order(patches: torch.Tensor, *, most_relevant_first: bool) -> torch.Tensor:
    """``[P]`` patch indices by relevance, ties broken by index (earlier first) in both directions."""
    values = patches.detach().double().cpu().numpy()
    key = -values if most_relevant_first else values
    return torch.from_numpy(np.lexsort((np.arange(values.size), key)))


def remove_patches(pixels: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int], fill) -> torch.Tensor:
    """``pixels`` ``[C, H, W]`` with the patches ``patches`` (indices, row-major on ``grid``) set to ``fill``
    (a number, or ``[C]`` per channel). ``H, W`` must be multiples of the grid."""
    channels, height, width = pixels.shape
    ph, pw = height // grid[0], width // grid[1]
    if ph * grid[0] != height or pw * grid[1] != width:
        raise ValueError(f"a {height} x {width} image is not a {grid[0]} x {grid[1]} grid of patches")
    keep = torch.ones(grid[0] * grid[1], dtype=pixels.dtype, device=pixels.device)
    keep[torch.as_tensor(patches, dtype=torch.long, device=pixels.device)] = 0
    keep = keep.reshape(grid).repeat_interleave(ph, 0).repeat_interleave(pw, 1)          # [H, W]
    fill = torch.as_tensor(fill, dtype=pixels.dtype, device=pixels.device).reshape(-1, 1, 1)
    return pixels * keep + fill * (1 - keep)


@torch.no_grad()
def perturbation_curve(model: nn.Module, pixels: torch.Tensor, patches: torch.Tensor, label: int, *,
                       most_relevant_first: bool, fill=0.0, fractions: Sequence[float] = FRACTIONS,
                       grid: tuple[int, int] | None = None) -> Curve:
    """One image's perturbation curve: remove ``round(f * P)`` patches at each fraction ``f`` in order of
    ``patches`` (``[P]`` relevance), one batched forward pass.

    Args:
        model: an image classifier (``pixel_values -> logits [B, K]``).
        pixels: ``[C, H, W]`` the model's input.
        patches: ``[P]`` patch relevance.
        label: the class whose accuracy (``correct``) and probability the curve records.
        most_relevant_first: positive (``True``) or negative test.
        fill: the removed patches' value in the model's input (the data set's mean).
    """
    grid = grid or patch_grid(model)
    order = patch_order(patches, most_relevant_first=most_relevant_first)
    counts = [count_for_fraction(order.numel(), f) for f in fractions]
    batch = torch.stack([remove_patches(pixels, order[:k], grid, fill) for k in counts])
    logits = model(pixel_values=batch).logits.double()
    return Curve(fractions=[float(f) for f in fractions], probability=logits.softmax(-1)[:, label].tolist(),
                 score=logits[:, label].tolist(), correct=(logits.argmax(-1) == label).tolist(), counts=counts,
                 most_relevant_first=most_relevant_first)


def curve_auc(curve: Curve, key: str = "correct") -> float:
    """The AUC of a curve in percent (accuracy by default)."""
    return 100 * auc(curve.fractions, curve.values(key))


def perturbation_summary(curves: Sequence[Curve], *, key: str = "correct", resamples: int = 10_000,
                         seed: int = 0) -> Interval:
    """The mean AUC (percent) of one image's curves over images, with its bootstrap interval.

    The AUC of the mean accuracy curve (the published number) equals the mean of the images' AUCs.
    """
    if not curves:
        raise ValueError("perturbation_summary needs at least one curve")
    return mean_ci([curve_auc(c, key) for c in curves], resamples=resamples, seed=seed)


# ------------------------------------------------------------------------------- the table
#: Columns of the published layout per model.
COLUMNS = ("positive", "negative", "segmentation")


def format_table(summary: dict, models: Sequence[str], methods: Sequence[str], *, intervals: bool = True) -> str:
    """Markdown table in the published layout: rows methods; per model positive AUC, negative AUC and
    segmentation ``pixel accuracy / mAP / mIoU`` (percent).

    ``summary[model][method]`` holds ``"positive"``, ``"negative"`` (:class:`Interval` of the AUC in
    percent) and ``"segmentation"`` (:func:`segmentation_summary`); missing cells print ``-``.
    """
    def cell(iv: Interval | None, scale: float = 1.0) -> str:
        if iv is None:
            return "-"
        text = f"{iv.mean * scale:.2f}"
        return text + (f" [{iv.low * scale:.2f}, {iv.high * scale:.2f}]" if intervals else "")

    header = ["method"] + [f"pos. {m} (lower better)" for m in models] + [f"neg. {m} (higher better)" for m in models] \
        + [f"seg. {m} (pix. acc / mAP / mIoU)" for m in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        row = [method]
        for column in ("positive", "negative"):
            row += [cell(summary.get(m, {}).get(method, {}).get(column)) for m in models]
        for m in models:
            seg = summary.get(m, {}).get(method, {}).get("segmentation")
            row.append("-" if not seg else " / ".join(cell(seg[k], 100) for k in ("pixel_accuracy", "map", "miou")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def interval_dict(iv: Interval) -> dict:
    out = iv.to_dict()
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in out.items()}


# ------------------------------------------------------------------------- one explanation
def evaluate_batch(model: nn.Module, pixels: torch.Tensor, labels: Sequence[int], masks: torch.Tensor, *,
                   method: str, fill=0.0, fractions: Sequence[float] = FRACTIONS, **options) -> list[dict]:
    """Explain ``pixels`` ``[B, C, H, W]`` (the model's input) with ``method`` and run both tests on each image.

    The explained score is the predicted class's logit (as in the published evaluations); the
    perturbation curves record the accuracy against the true ``labels`` and the label's
    probability; ``masks`` ``[B, H, W]`` are the true foregrounds. ``options`` go to the method.

    Returns one JSON-ready record per image: ``label``, ``prediction``, ``segmentation``
    (:class:`SegmentationCounts`), ``positive`` and ``negative`` (curves), ``positive_auc`` and
    ``negative_auc`` (accuracy, percent) and the method's diagnostics, if any.
    """
    from ..explanations.api import run_explanation
    from ..inputs import prepare_model_inputs

    inputs = prepare_model_inputs(model, pixels)
    explanation = run_explanation(model, inputs, method=method, **options)
    patches = patch_relevance(explanation.relevance, inputs.patch_positions)                  # [B, P]
    grid = patch_grid(model)
    size = tuple(pixels.shape[-2:])
    records = []
    for b in range(pixels.shape[0]):
        label = int(labels[b])
        heat = upsample(patches[b], grid, size)
        seg = segmentation_counts(heat, masks[b])
        curves = {name: perturbation_curve(model, inputs.values[b], patches[b], label, most_relevant_first=first,
                                           fill=fill, fractions=fractions, grid=grid)
                  for name, first in (("positive", True), ("negative", False))}
        record = {"label": label, "prediction": int(explanation.logits[b].argmax()),
                  "segmentation": seg.to_dict(),
                  **{name: curve.to_dict() for name, curve in curves.items()},
                  **{f"{name}_auc": curve_auc(curve) for name, curve in curves.items()}}
        for key, value in explanation.diagnostics.items():
            record[key] = float(torch.as_tensor(value).reshape(-1)[b])
        records.append(record)
    return records


def summarize(records: Sequence[dict], *, resamples: int = 10_000, seed: int = 0) -> dict:
    """The intervals of one model and method from its :func:`evaluate_batch` records:
    ``{"positive", "negative"`` (AUC percent), ``"segmentation"`` (:func:`segmentation_summary`),
    ``"accuracy"`` (of the unperturbed model), ``"n"}``."""
    from ..benchmark.stats import wilson_interval

    curves = {name: [Curve.from_dict(r[name]) for r in records] for name in ("positive", "negative")}
    correct = sum(int(r["prediction"] == r["label"]) for r in records)
    return {"positive": perturbation_summary(curves["positive"], resamples=resamples, seed=seed),
            "negative": perturbation_summary(curves["negative"], resamples=resamples, seed=seed),
            "segmentation": segmentation_summary([SegmentationCounts.from_dict(r["segmentation"]) for r in records],
                                                 resamples=resamples, seed=seed),
            "accuracy": wilson_interval(correct, len(records)), "n": len(records)}


#: What :func:`paired_comparison` compares, per image: name -> (record -> value, higher is better).
PAIRED_SCORES = {
    "positive AUC": (lambda r: curve_auc(Curve.from_dict(r["positive"])), False),
    "negative AUC": (lambda r: curve_auc(Curve.from_dict(r["negative"])), True),
    "IoU": (lambda r: 100 * float(np.mean([i / u if u else 1.0 for i, u in zip(r["segmentation"]["intersection"],
                                                                               r["segmentation"]["union"])])), True),
    "AP": (lambda r: 100 * float(r["segmentation"]["ap"]), True),
}


def paired_comparison(records_a: Sequence[dict], records_b: Sequence[dict], *, resamples: int = 10_000,
                      seed: int = 0) -> dict:
    """``{score: PairedResult of a - b}`` over the images both record sets scored (matched by ``index``):
    each image's positive and negative AUC, its IoU (the mean of its background and foreground IoUs)
    and its AP, in percent; :data:`PAIRED_SCORES` says which direction is better."""
    from ..benchmark.stats import paired_bootstrap

    by_index = {r["index"]: r for r in records_b}
    pairs = [(r, by_index[r["index"]]) for r in records_a if r["index"] in by_index]
    if not pairs:
        raise ValueError("the two record sets share no image")
    return {name: paired_bootstrap([score(a) for a, _ in pairs], [score(b) for _, b in pairs], resamples=resamples,
                                   seed=seed)
            for name, (score, _) in PAIRED_SCORES.items()}


def format_paired(comparisons: dict[tuple[str, str, str], dict]) -> str:
    """Markdown table of :func:`paired_comparison` results keyed ``(model, method a, method b)``: the mean
    difference ``a - b`` with its interval and p-value per score, the better side marked."""
    header = ["model", "a vs b"] + [f"{name} a - b ({'higher' if better else 'lower'} better)"
                                    for name, (_, better) in PAIRED_SCORES.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, a, b), results in comparisons.items():
        cells = []
        for name, (_, higher) in PAIRED_SCORES.items():
            r = results[name]
            winner = "" if r.low <= 0 <= r.high else (a if (r.difference > 0) == higher else b)
            cells.append(f"{r.difference:+.2f} [{r.low:+.2f}, {r.high:+.2f}], p={r.p_value:.3g}"
                         + (f" ({winner})" if winner else ""))
        lines.append("| " + " | ".join([model, f"{a} vs {b}"] + cells) + " |")
    return "\n".join(lines)
