"""Explaining an image classifier on image files: reading any image as the model needs it, the
relevance of its patches as a heatmap over the image, and the HTML/JSON report of ``explain-image``.

The model's config says what it reads (``image_size``, ``num_channels``); a
``preprocessor_config.json`` beside the model (``image_mean``, ``image_std``, ``do_normalize``,
as ``transformers``' image processors write it) says how pixels in ``[0, 1]`` are normalised.
Any image file Pillow opens is converted to the model's channels (``L`` or ``RGB``) and resized
bilinearly to its size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .evaluation import patch_grid, patch_relevance, upsample

#: Extensions :func:`image_files` picks from a folder.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

#: What ``explain-image`` says when no ``--model`` is given.

def image_files(path: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """``[path]`` for a file; the image files of a folder (by extension, sorted by name, not recursive),
    without the masks of a composites folder (``NAME_mask.png`` beside ``NAME.png``)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is neither an image file nor a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not _is_mask(p))
    if not files:
        raise ValueError(f"the folder {str(path)!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
    return files[:limit] if limit is not None else files


def _is_mask(path: Path) -> bool:
    return path.stem.endswith("_mask") and path.with_name(path.stem[:-len("_mask")] + path.suffix).is_file()


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's ``pixel_values`` ``[C, H, W]``.

    Attributes:
        size: ``(height, width)`` the model reads.
        channels: 1 (grey) or 3 (RGB).
        mean, std: per-channel normalisation of pixels in ``[0, 1]`` (``None``: not normalised).
    """

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, directory: str | os.PathLike | None = None) -> Preprocessing:
        """From the model's config and, if there is one, ``directory/preprocessor_config.json``."""
        config = model.config
        size = config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(config, "num_channels", 3))
        if channels not in (1, 3):
            raise ValueError(f"the model reads {channels} channels: only grey (1) and RGB (3) images are supported")
        mean = std = None
        processor = Path(directory) / "preprocessor_config.json" if directory is not None else None
        if processor is not None and processor.is_file():
            settings = json.loads(processor.read_text(encoding="utf-8"))
            if settings.get("do_normalize", True) and "image_mean" in settings:
                mean = tuple(float(v) for v in np.broadcast_to(settings["image_mean"], (channels,)))
                std = tuple(float(v) for v in np.broadcast_to(settings["image_std"], (channels,)))
        return cls(size=size, channels=channels, mean=mean, std=std)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def __call__(self, image) -> torch.Tensor:
        """``[C, H, W]`` float32 pixels of a Pillow image (any mode, any size)."""
        if image.mode in ("RGBA", "LA", "P"):                       # transparency onto white, then the model's mode
            from PIL import Image

            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        resized = image.convert(self.mode).resize((self.size[1], self.size[0]), resample=2)   # 2: bilinear
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()) / 255
        pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        if self.mean is not None:
            pixels = (pixels - torch.tensor(self.mean).reshape(-1, 1, 1)) / torch.tensor(self.std).reshape(-1, 1, 1)
        return pixels

    def to_dict(self) -> dict:
        return {"size": list(self.size), "channels": self.channels, "mean": self.mean, "std": self.std}


def overlay_png(image, heat: torch.Tensor, path: str | os.PathLike, *, min_side: int = 256,
                alpha: float = 0.45) -> Path:
    """Draw ``heat`` (``[h, w]`` in ``[0, 1]``) over ``image`` (a Pillow image, shown in colour) to ``path``.

    The heatmap is upsampled bilinearly to the image (itself enlarged, nearest, so that its shorter
    side is at least ``min_side``) and blended with matplotlib's ``jet`` colours.
    """
    from matplotlib import colormaps
    from PIL import Image

    base = image.convert("RGB")
    scale = max(1, -(-min_side // min(base.size)))
    if scale > 1:
        base = base.resize((base.size[0] * scale, base.size[1] * scale), resample=0)          # 0: nearest
    width, height = base.size
    big = torch.nn.functional.interpolate(heat.detach().double().cpu()[None, None], size=(height, width),
                                          mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
    colours = colormaps["jet"](big)[..., :3]
    blended = (1 - alpha) * np.asarray(base, dtype=np.float64) / 255 + alpha * colours
    path = Path(path)
    Image.fromarray(np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)).save(path)
    return path


@dataclass
class ImageExplanation:
    """One explained image.

    Attributes:
        path: the file.
        image: the original Pillow image (as read).
        explanation: the :class:`~implicit_attention.explanations.api.Explanation` (batch of one).
        inputs: the model's :class:`~implicit_attention.inputs.ModelInputs`.
        heat: ``[H, W]`` the patches' positive relevance upsampled to the model's size, in ``[0, 1]``.
        probabilities: ``{label: probability}`` of every class, largest first.
        decomposition: the decomposed layers (a baseline's are decomposed for the report), or ``None``.
    """

    path: Path
    image: Any
    explanation: Any
    inputs: Any
    heat: torch.Tensor
    probabilities: dict[str, float] = field(default_factory=dict)
    decomposition: Any = None

    @property
    def patches(self) -> torch.Tensor:
        """``[P]`` relevance of the patches."""
        return patch_relevance(self.explanation.relevance[0], self.inputs.patch_positions)

    def top_patches(self, k: int, grid: tuple[int, int]) -> list[tuple[int, int]]:
        """The ``k`` most relevant patches as ``(row, column)`` of the ``grid``."""
        order = self.patches.argsort(descending=True)[:k].tolist()
        return [divmod(i, grid[1]) for i in order]


def label_of(model: nn.Module, index: int) -> str:
    names = getattr(model.config, "id2label", None) or {}
    return str(names.get(index, names.get(str(index), index)))


def resolve_class(model: nn.Module, target) -> int | None:
    """A class index from ``None`` (the prediction), an index or a label name of ``config.label2id``."""
    if target is None:
        return None
    names = {str(k).lower(): int(v) for k, v in (getattr(model.config, "label2id", None) or {}).items()}
    text = str(target).strip()
    if text.lower() in names:
        return names[text.lower()]
    if text.lstrip("-").isdigit() and 0 <= int(text) < model.config.num_labels:
        return int(text)
    raise ValueError(f"--target {target!r} is neither a class index in [0, {model.config.num_labels}) nor a label "
                     f"of the model ({', '.join(sorted(names)) or 'it has no label names'})")


def explain_image(model: nn.Module, path: str | os.PathLike, preprocessing: Preprocessing, *, method: str,
                  target: int | None = None, decompose_for_report: bool = False, **options) -> ImageExplanation:
    """Explain ``model``'s prediction (or class ``target``) on the image file ``path``."""
    from PIL import Image

    from ..decomposition import decompose
    from ..explanations.api import run_explanation
    from ..inputs import prepare_model_inputs

    with Image.open(path) as opened:
        opened.load()
        image = opened.copy()
    pixels = preprocessing(image).unsqueeze(0)
    inputs = prepare_model_inputs(model, pixels)
    explanation = run_explanation(model, inputs, method=method, target=target, **options)
    grid = patch_grid(model)
    heat = upsample(patch_relevance(explanation.relevance[0], inputs.patch_positions).clamp(min=0), grid,
                    preprocessing.size)
    probs = explanation.logits[0].detach().double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    decomposition = explanation.decomposition
    if decomposition is None and decompose_for_report:
        keep = {k: v for k, v in options.items() if k in ("variant", "layers", "check")}
        decomposition = decompose(model, inputs, **keep)
    return ImageExplanation(path=Path(path), image=image, explanation=explanation, inputs=inputs, heat=heat,
                            probabilities={label_of(model, i): float(probs[i]) for i in order},
                            decomposition=decomposition)


def report_example(model: nn.Module, item: ImageExplanation, number: int, *, matrices: bool) -> Any:
    """The :class:`~implicit_attention.render.ReportExample` of one explained image: its patches as the
    tokens (``p(row,col)``; class tokens greyed), the overlay PNG ``overlay_<number>_<name>.png`` and each
    layer's maps if ``matrices``."""
    from ..render import ReportExample

    grid = patch_grid(model)
    positions = item.inputs.patch_positions.tolist()
    names = {pos: f"p({r},{c})" for pos, (r, c) in zip(positions, (divmod(i, grid[1]) for i in range(len(positions))))}
    tokens = [names.get(i, "[CLS]" if i == item.inputs.class_token else "[extra]") for i in range(item.inputs.length)]
    expl = item.explanation
    cls = int(expl.target.ids[0])
    label = label_of(model, cls)
    top = next(iter(item.probabilities))
    prediction = {"label": top, "probability": item.probabilities[top], "kind": "label",
                  "probabilities": dict(list(item.probabilities.items())[:5])}
    target = {"label": label, "id": cls, "position": expl.target.row, "score": f"logit of class {label!r}"}
    maps = {}
    if matrices and item.decomposition is not None:
        maps = {layer.index: {how: layer.aggregate(how)[0].detach().cpu().double() for how in ("mean", "abs")}
                for layer in item.decomposition.layers}
    stem = f"overlay_{number}_{''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in item.path.stem)}"
    return ReportExample(
        text=str(item.path), tokens=tokens, relevance=expl.relevance[0].detach().cpu().double(),
        prediction=prediction, target=target, matrices=maps, in_span=[i in names for i in range(len(tokens))],
        diagnostics={k: float(torch.as_tensor(v).reshape(-1)[0]) for k, v in expl.diagnostics.items()},
        pictures=[(f"{stem}.png", f"{item.path.name}: positive relevance of the patches for {label!r}, upsampled "
                   "to the pixels, over the image", lambda p, it=item: overlay_png(it.image, it.heat, p))])
