"""Weakly supervised semantic segmentation from explanation maps.

The image-level label is the only supervision: a classifier's explanation of that label gives a
heatmap per image, the heatmap gives a pseudo-mask, and a small segmentation network trained on the
pseudo-masks alone is scored against the true masks of unseen images. A better explanation should
give better pseudo-masks and so a better network.

Conventions (as in :mod:`implicit_attention.vision.evaluation`):

- ``heatmap``: ``[H, W]`` (or ``[B, H, W]``) relevance upsampled to the image; any scale.
- ``mask``: ``[H, W]`` (or ``[B, H, W]``) bool, ``True`` on the foreground.
- A pseudo-mask is the heatmap min-max normalised and thresholded at its mean (the segmentation
  test's rule), then optionally cleaned: a 3 x 3 binary opening removes isolated pixels and thin
  bridges, and only the largest 8-connected component is kept (each composite holds one object).
- mIoU is the mean of the background and foreground IoU of intersections and unions pooled over
  the images, with a bootstrap interval over images (:func:`miou_interval`), as the segmentation
  test computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..benchmark.stats import Interval


# ----------------------------------------------------------------------------- pseudo-masks
def threshold_at_mean(heatmap: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` bool: each map min-max normalised and thresholded at its own mean (a constant map: none)."""
    heat = torch.as_tensor(heatmap).detach().double()
    flat = heat.flatten(-2)
    low, high = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
    span = high - low
    normalised = torch.where(span > 0, (heat - low) / torch.where(span > 0, span, 1), torch.zeros_like(heat))
    return normalised > normalised.flatten(-2).mean(-1)[..., None, None]


def clean_mask(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[H, W]`` bool: ``mask`` after a 3 x 3 binary opening, reduced to its largest 8-connected component.

    If the opening removes everything, the largest component of the mask itself is kept instead
    (a thin object is not erased).
    """
    from scipy import ndimage

    mask = np.asarray(torch.as_tensor(mask).bool().cpu().numpy())
    if mask.ndim != 2:
        raise ValueError(f"clean_mask takes one [H, W] mask, got shape {mask.shape}")
    opened = ndimage.binary_opening(mask, structure=np.ones((3, 3), dtype=bool))
    source = opened if opened.any() else mask
    labels, count = ndimage.label(source, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return torch.zeros(mask.shape, dtype=torch.bool)
    sizes = np.bincount(labels.ravel())[1:]
    return torch.from_numpy(labels == 1 + int(sizes.argmax()))


def pseudo_masks(heatmaps: torch.Tensor, *, clean: bool = True) -> torch.Tensor:
    """``[B, H, W]`` bool pseudo-masks from ``[B, H, W]`` heatmaps (thresholded at the mean; cleaned if ``clean``)."""
    masks = threshold_at_mean(heatmaps)
    if clean:
        masks = torch.stack([clean_mask(m) for m in masks]) if len(masks) else masks
    return masks


# ------------------------------------------------------------------------------------ scores
@dataclass(frozen=True)
class MaskCounts:
    """One image's predicted mask against its true mask: ``[background, foreground]`` pixel counts."""

    intersection: tuple[int, int]
    union: tuple[int, int]

    def to_dict(self) -> dict:
        return asdict(self)


def mask_counts(predicted: torch.Tensor, truth: torch.Tensor) -> MaskCounts:
    """The intersections and unions of one ``[H, W]`` predicted mask with the true one, per class."""
    predicted, truth = torch.as_tensor(predicted).bool().cpu(), torch.as_tensor(truth).bool().cpu()
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted mask {tuple(predicted.shape)} and true mask {tuple(truth.shape)} differ")
    return MaskCounts(intersection=(int((~predicted & ~truth).sum()), int((predicted & truth).sum())),
                      union=(int((~predicted | ~truth).sum()), int((predicted | truth).sum())))


def miou_interval(intersections: np.ndarray, unions: np.ndarray, *, resamples: int = 10_000, seed: int = 0,
                  confidence: float = 0.95) -> Interval:
    """Pooled mIoU of ``[n, classes]`` per-image intersections and unions, with a bootstrap interval.

    The point value is the mean over classes of ``sum_images intersection / sum_images union``; the
    interval resamples images with replacement and recomputes it from the resampled sums.
    """
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    if inter.ndim != 2 or inter.shape != union.shape or len(inter) == 0:
        raise ValueError(f"miou_interval needs two [n, classes] arrays with n >= 1, got {inter.shape}, {union.shape}")
    eps = np.spacing(1)

    def miou(idx: np.ndarray) -> np.ndarray:
        return (inter[idx].sum(axis=-2) / (eps + union[idx].sum(axis=-2))).mean(axis=-1)

    rng = np.random.default_rng(seed)
    n = len(inter)
    draws = np.concatenate([miou(rng.integers(0, n, size=(min(1000, resamples - s), n)))
                            for s in range(0, resamples, 1000)])
    alpha = 1 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return Interval(mean=float(miou(np.arange(n))), low=float(low), high=float(high), n=n, confidence=confidence)


def masks_miou(predicted: torch.Tensor, truth: torch.Tensor, **options) -> Interval:
    """mIoU with its interval of ``[B, H, W]`` predicted masks against the true ones (:func:`miou_interval`)."""
    counts = [mask_counts(p, t) for p, t in zip(predicted, truth)]
    return miou_interval(np.array([c.intersection for c in counts]), np.array([c.union for c in counts]), **options)


# ---------------------------------------------------------------------------- explanations
def explanation_heatmaps(model: nn.Module, pixels: torch.Tensor, labels: Sequence[int], *, method: str,
                         **options) -> torch.Tensor:
    """``[B, H, W]`` heatmaps in ``[0, 1]``: ``method``'s explanation of each image's given label.

    ``pixels`` ``[B, C, H, W]`` are the model's input; the label is the weak supervision, so it is
    explained whatever the model predicts. ``options`` (``variant=...``, ...) go to the method.
    """
    from ..explanations.api import run_explanation
    from ..inputs import prepare_model_inputs
    from .evaluation import patch_grid, patch_relevance, upsample

    inputs = prepare_model_inputs(model, pixels)
    target = torch.as_tensor(list(labels), dtype=torch.long)
    explanation = run_explanation(model, inputs, method=method, target=target, **options)
    patches = patch_relevance(explanation.relevance, inputs.patch_positions)                    # [B, P]
    grid, size = patch_grid(model), tuple(pixels.shape[-2:])
    return torch.stack([upsample(patches[b], grid, size) for b in range(len(patches))]).float()


# ------------------------------------------------------------------------ the segmentation network
class TinySegmenter(nn.Module):
    """A small encoder-decoder for binary masks: ``[B, 1, H, W]`` images -> ``[B, H, W]`` foreground logits.

    Two 3 x 3 convolution stages at full resolution and one at half, a skip connection, and a 1 x 1
    head (about 32 k parameters at the default width); ``H`` and ``W`` must be even.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.full = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.coarse = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=4, dilation=4), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        full = self.full(pixels)
        up = self.up(self.coarse(full))
        return self.head(torch.cat([full, up], dim=1))[:, 0]


@dataclass
class SegmenterTraining:
    """Settings of :func:`train_segmenter`."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 16
    seed: int = 0


def train_segmenter(images: torch.Tensor, masks: torch.Tensor, settings: SegmenterTraining = SegmenterTraining(),
                    *, device: str | torch.device = "cpu", progress: bool = True,
                    description: str = "training the segmenter") -> TinySegmenter:
    """Train a :class:`TinySegmenter` on ``[N, 1, H, W]`` images and their ``[N, H, W]`` (pseudo-)masks.

    Binary cross-entropy with the foreground weighted by the background-to-foreground ratio of the
    masks (so that a small object is not ignored), AdamW with a cosine schedule, random horizontal
    flips; batches drawn with a seeded generator, so a run is a function of its inputs and settings.
    """
    from tqdm.auto import tqdm

    if len(images) != len(masks) or len(images) == 0:
        raise ValueError(f"train_segmenter needs as many masks as images (>= 1), got {len(images)} and {len(masks)}")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = TinySegmenter(settings.width).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps)))
    targets = masks.float()
    foreground = float(targets.mean())
    positive_weight = torch.tensor((1 - foreground) / max(foreground, 1e-6), device=device)
    model.train()
    for _ in tqdm(range(settings.steps), desc=description, disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (min(settings.batch_size, len(images)),), generator=generator)
        x, y = images[idx].to(device), targets[idx].to(device)
        flip = torch.rand(len(idx), generator=generator) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, pos_weight=positive_weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict_masks(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """``[N, H, W]`` bool: the segmenter's foreground (logit > 0) on ``[N, 1, H, W]`` images."""
    device = next(model.parameters()).device
    return torch.cat([model(images[s:s + batch_size].to(device)).cpu() > 0 for s in range(0, len(images), batch_size)])


# ------------------------------------------------------------------------------ one source
@dataclass
class SourceResult:
    """One pseudo-mask source: its pseudo-masks' mIoU on the training images, and the segmenter's on the test images."""

    source: str
    pseudo_miou: Interval
    segmenter_miou: Interval
    train_images: int
    test_images: int
    seconds_pseudo: float
    seconds_training: float

    def to_dict(self) -> dict:
        return {"source": self.source, "pseudo_miou": self.pseudo_miou.to_dict(),
                "segmenter_miou": self.segmenter_miou.to_dict(), "train_images": self.train_images,
                "test_images": self.test_images, "seconds_pseudo": self.seconds_pseudo,
                "seconds_training": self.seconds_training}


def evaluate_source(name: str, masks_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    test: tuple[torch.Tensor, torch.Tensor], settings: SegmenterTraining = SegmenterTraining(), *,
                    device: str | torch.device = "cpu", progress: bool = True) -> tuple[SourceResult, torch.Tensor]:
    """Pseudo-masks of ``train = (images [N, 1, H, W] in [0, 1], labels [N], true masks [N, H, W])`` by
    ``masks_of(images, labels, true_masks) -> [N, H, W] bool``, their mIoU against the true masks, a
    segmenter trained on them alone, and its mIoU on ``test = (images, true masks)``.

    Returns the :class:`SourceResult` and the pseudo-masks.
    """
    import time

    images, labels, truth = train
    began = time.perf_counter()
    masks = masks_of(images, labels, truth).bool().cpu()
    seconds_pseudo = time.perf_counter() - began
    began = time.perf_counter()
    segmenter = train_segmenter(images, masks, settings, device=device, progress=progress,
                                description=f"segmenter on {name}")
    seconds_training = time.perf_counter() - began
    test_images, test_truth = test
    result = SourceResult(source=name, pseudo_miou=masks_miou(masks, truth),
                          segmenter_miou=masks_miou(predict_masks(segmenter, test_images), test_truth),
                          train_images=len(images), test_images=len(test_images), seconds_pseudo=seconds_pseudo,
                          seconds_training=seconds_training)
    return result, masks
