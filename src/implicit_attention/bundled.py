"""The model shipped with the package, :data:`BUNDLED_MODEL` (``rt-sentiment-mamba``).

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
