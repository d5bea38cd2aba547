#!/usr/bin/env python
"""Quantus' faithfulness metrics on our explanations of the bundled Vision Mamba.

Our method objects (``implicit_attention.make_method(name, model, variant=...)``, Captum's shape:
``.attribute(inputs, target=...)``) become a Quantus ``explain_func``; the patch relevance is
spread over each patch's pixels, and ``quantus.FaithfulnessCorrelation`` (Bhatt et al. 2020:
the correlation between the relevance of random pixel subsets and the drop in the target's logit
when they are replaced by the image mean) scores the unified attribution, the S6-only attribution
of the predecessor and random relevance on saved Fashion-MNIST composites.

    pip install quantus                       # (make install does)
    python docs/examples/quantus_faithfulness.py --images 16 --runs 20

Quantus draws its subsets at random: the scores vary from run to run, more so with few images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import quantus
import torch

import implicit_attention as ia
from implicit_attention.bundled import bundled_image_model_path
from implicit_attention.inputs import patch_positions
from implicit_attention.vision.classifiers import load_classifier
from implicit_attention.vision.composites import CompositeFolder, normalize
from implicit_attention.vision.evaluation import patch_grid, patch_relevance

COMPOSITES = Path(__file__).resolve().parents[2] / "data" / "fashion-composites" / "test"
METHODS = [("attribution", "unified"), ("attribution", "s6"), ("random", None)]


class Logits(torch.nn.Module):
    """The classifier as Quantus calls it: ``[B, 1, 64, 64]`` pixels in, ``[B, 10]`` logits out."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixel_values=pixels).logits


def explain(model: Logits, inputs, targets, method: str = "attribution", variant: str | None = None,
            **_) -> np.ndarray:
    """Quantus' ``explain_func``: ``[B, 1, H, W]`` our method's relevance of each patch over its pixels."""
    classifier = model.classifier
    pixels = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    options = {"variant": variant} if variant else {}
    relevance = ia.make_method(method, classifier, **options).attribute(pixels, target=torch.as_tensor(targets))
    positions, _ = patch_positions(classifier, pixels)
    patches = patch_relevance(relevance, positions).reshape(-1, 1, *patch_grid(classifier))      # [B, 1, 8, 8]
    size = classifier.config.patch_size
    return patches.repeat_interleave(size, -2).repeat_interleave(size, -1).detach().numpy()


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="saved composites to score (default %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="Quantus' random subsets per image (default %(default)s)")
    parser.add_argument("--subset-size", type=int, default=128, help="pixels per subset (default %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    model = Logits(load_classifier(bundled_image_model_path())).eval()
    data = CompositeFolder(COMPOSITES, length=args.images)
    x = normalize(torch.stack([data[i][0] for i in range(len(data))]))
    with torch.no_grad():
        y = model(x).argmax(-1)
    metric = quantus.FaithfulnessCorrelation(nr_runs=args.runs, subset_size=args.subset_size, perturb_baseline="mean",
                                             return_aggregate=True, disable_warnings=True)
    scores = {}
    for method, variant in METHODS:
        options = {"method": method, "variant": variant}
        score = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=explain(model, x, y, **options),
                       device="cpu", explain_func=explain, explain_func_kwargs=options)
        name = method + (f":{variant}" if variant else "")
        scores[name] = float(np.mean(score))
        print(f"{name:20s} faithfulness correlation {scores[name]:+.3f} ({len(data)} images, {args.runs} subsets each)")
    return scores


if __name__ == "__main__":
    main()
