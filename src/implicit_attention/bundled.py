"""The model shipped with the package, :data:`BUNDLED_MODEL` (``rt-sentiment-mamba``).

A stock ``MambaForCausalLM`` trained by ``scripts/train_sentiment.py`` on Rotten Tomatoes review
sentences as a prompted next-token task: the prompt ``"{text} sentiment:"`` after the tokenizer's
BOS token ``<s>`` (``task.json``: ``template`` and ``add_bos_token``) -> ``" positive"`` |
``" negative"``. Its directory holds the usual ``config.json``, ``model.safetensors``,
``tokenizer.json`` and a ``task.json`` describing the prompt and the label words (see
:mod:`~implicit_attention.loading`). Load it with :func:`~implicit_attention.loading.load_model`
(the default) or with ``from_pretrained(bundled_model_path())``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: Name of the model shipped with the package.
BUNDLED_MODEL = "rt-sentiment-mamba"

__all__ = ["BUNDLED_MODEL", "bundled_model_path"]


def bundled_model_path() -> Path:
    """Directory of the bundled model (``implicit_attention/bundled/rt-sentiment-mamba``).

    The path is returned whether or not the directory exists; :func:`load_model` says so
    clearly when it is missing.
    """
    try:
        root = resources.files("implicit_attention")
        path = Path(str(root)) / "bundled" / BUNDLED_MODEL
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - e.g. a zipped, not extracted, package
        path = Path(__file__).resolve().parent / "bundled" / BUNDLED_MODEL
    return path
