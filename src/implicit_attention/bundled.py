"""The models shipped with the package: the text model :data:`BUNDLED_MODEL` (``rt-sentiment-mamba``)
and the image model :data:`BUNDLED_IMAGE_MODEL` (``fashion-vim``).

A stock ``MambaForCausalLM`` (4 layers, width 128, 0.88 M parameters), the Mamba of the model zoo
trained by ``scripts/train_zoo.py``: pre-trained as a language model on an English corpus, then
fine-tuned on Rotten Tomatoes review sentences as a prompted next-token task: the prompt
``"{text} sentiment:"`` after the tokenizer's BOS token ``<s>`` (``task.json``: ``template`` and
``add_bos_token``) -> ``" positive"`` | ``" negative"`` (74.9% test accuracy). Its directory holds
the usual ``config.json``, ``model.safetensors`` (float16), ``tokenizer.json`` (the zoo's shared
3,072-token BPE) and a ``task.json`` describing the prompt, the label words and the training (see
:mod:`~implicit_attention.loading`). Load it with :func:`~implicit_attention.loading.load_model`
(the default; float32 unless told) or with ``from_pretrained(bundled_model_path(), dtype=torch.float32)``
(without ``dtype`` it stays in float16).

``fashion-vim`` is our Vision Mamba (:mod:`implicit_attention.models.vim`: 4 bidirectional layers,
width 192, 8 x 8 patches of a 64 x 64 grey image with the class token in the middle, 1.16 M
parameters) trained by ``scripts/train_vision.py`` on the Fashion-MNIST composites
(:mod:`implicit_attention.vision.composites`): 86.1% test accuracy on 10,000 test composites after
8,000 steps of 256 images (``train.json`` records the settings, the loss, the time and the
hardware). ``explain-image`` uses it when no ``--model`` is given; load it with
:func:`~implicit_attention.vision.classifiers.load_classifier` (``bundled_image_model_path()``).

``fashion-deit`` is its Transformer reference, a stock ``DeiTForImageClassification`` of the same
size (1.22 M parameters) trained the same way (85.4%): ``explain-image --model fashion-deit``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: Name of the text model shipped with the package.
BUNDLED_MODEL = "rt-sentiment-mamba"
#: Name of the image model shipped with the package (the default of ``explain-image``).
BUNDLED_IMAGE_MODEL = "fashion-vim"
#: Every image model shipped with the package: the Vision Mamba and its DeiT reference.
BUNDLED_IMAGE_MODELS = ("fashion-vim", "fashion-deit")

__all__ = ["BUNDLED_IMAGE_MODEL", "BUNDLED_IMAGE_MODELS", "BUNDLED_MODEL", "bundled_image_model_path",
           "bundled_model_path"]


def _bundled(name: str) -> Path:
    try:
        root = resources.files("implicit_attention")
        return Path(str(root)) / "bundled" / name
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - e.g. a zipped, not extracted, package
        return Path(__file__).resolve().parent / "bundled" / name


def bundled_model_path() -> Path:
    """Directory of the bundled text model (``implicit_attention/bundled/rt-sentiment-mamba``).

    The path is returned whether or not the directory exists; :func:`load_model` says so
    clearly when it is missing.
    """
    return _bundled(BUNDLED_MODEL)


def bundled_image_model_path(name: str = BUNDLED_IMAGE_MODEL) -> Path:
    """Directory of a bundled image model (``implicit_attention/bundled/<name>``, by default the Vision
    Mamba ``fashion-vim``), whether or not it exists; ``name`` is one of :data:`BUNDLED_IMAGE_MODELS`."""
    if name not in BUNDLED_IMAGE_MODELS:
        raise ValueError(f"no bundled image model {name!r}; the bundled ones are {', '.join(BUNDLED_IMAGE_MODELS)}")
    return _bundled(name)
