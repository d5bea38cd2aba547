"""Small image classifiers for the Fashion-MNIST composites: ViT, DeiT (``transformers``) and Vision
Mamba (:mod:`implicit_attention.models.vim`, when it is importable), built and loaded alike.

Every model reads ``[B, 1, 64, 64]`` normalised pixels (:func:`~.composites.normalize`) in
8 x 8 patches (an 8 x 8 grid) and runs its softmax attention in eager mode, so that the attention
methods read its probabilities.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from .composites import CLASSES

#: The kinds :func:`build_classifier` knows.
KINDS: tuple[str, ...] = ("vit", "deit", "vim")

#: The shared shape of the small models (about 1.2 M parameters: at most 3 MB in float16).
SMALL = dict(image_size=64, patch_size=8, num_channels=1, hidden_size=192, num_hidden_layers=4)


def vim_available() -> bool:
    """Whether our Vision Mamba (``implicit_attention.models.vim``) is importable."""
    try:
        return importlib.util.find_spec("implicit_attention.models.vim") is not None
    except (ImportError, ValueError):
        return False


def _labels() -> dict:
    return dict(num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
                label2id={name: i for i, name in enumerate(CLASSES)})


def build_classifier(kind: str, *, seed: int = 0, **overrides) -> nn.Module:
    """A freshly initialised classifier of ``kind`` (``"vit"``, ``"deit"`` or ``"vim"``) of the
    :data:`SMALL` shape (``overrides`` change it), in eval mode."""
    settings = {**SMALL, **overrides}
    torch.manual_seed(seed)
    if kind in ("vit", "deit"):
        import transformers as tf

        heads = settings.pop("num_attention_heads", 3)
        intermediate = settings.pop("intermediate_size", 2 * settings["hidden_size"])
        config_cls, model_cls = ((tf.ViTConfig, tf.ViTForImageClassification) if kind == "vit"
                                 else (tf.DeiTConfig, tf.DeiTForImageClassification))
        config = config_cls(**settings, num_attention_heads=heads, intermediate_size=intermediate,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_labels())
        model = model_cls(config)
        model.set_attn_implementation("eager")
    elif kind == "vim":
        if not vim_available():
            raise ImportError("Vision Mamba needs implicit_attention.models.vim, which this checkout does not have")
        from ..models.vim import VimConfig, VimForImageClassification

        model = VimForImageClassification(VimConfig(**settings, **_labels()))
    else:
        raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(KINDS)}")
    return model.eval()


def load_classifier(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | None = None) -> nn.Module:
    """An image classifier saved with ``save_pretrained`` (ViT, DeiT, our ViM or any
    ``AutoModelForImageClassification``), in eval mode, eager attention where it has a choice."""
    from transformers import AutoModelForImageClassification

    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8")) if (path / "config.json").is_file() \
        else {}
    if config.get("model_type") == "vim" and vim_available():
        import implicit_attention.models  # noqa: F401  registers vim with the Auto classes
    kwargs = {} if config.get("model_type") == "vim" else {"attn_implementation": "eager"}
    model = AutoModelForImageClassification.from_pretrained(path, dtype=dtype, **kwargs)
    return model.to(device or "cpu").eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
