"""Exceptions raised by implicit_attention. All derive from :class:`ImplicitAttentionError`."""

from __future__ import annotations


class ImplicitAttentionError(Exception):
    """Base class of every error this library raises on purpose."""


class EmptyInputError(ImplicitAttentionError, ValueError):
    """The input holds no token (empty text, zero-length ids or an all-padding mask)."""


class UnsupportedModelError(ImplicitAttentionError, TypeError):
    """The model contains no token-mixing layer this library can decompose."""


class LongInputWarning(UserWarning):
    """An input is longer than the texts the model was trained on (``max_sentence_tokens`` of its ``task.json``)."""


class PaddingError(ImplicitAttentionError, ValueError):
    """A padded batch for a model whose predictions depend on the padding (it reads padding tokens)."""


class MemoryBudgetError(ImplicitAttentionError, MemoryError):
    """The requested tensors would not fit in the memory available.

    Raised *before* anything is allocated, with the estimate in the message.
    """

    def __init__(self, what: str, needed_bytes: int, available_bytes: int, advice: str):
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        super().__init__(
            f"{what} needs about {format_bytes(needed_bytes)} but only "
            f"{format_bytes(available_bytes)} is available. {advice}"
        )


class OffloadedLayerError(ImplicitAttentionError, ValueError):
    """A layer to decompose has its parameters offloaded (``meta`` device) by ``accelerate``."""


class ReconstructionError(ImplicitAttentionError, ArithmeticError):
    """A decomposition does not reproduce the module's own forward within tolerance.

    This means the model's code computes something the decomposition does not model (for example
    a newer ``transformers`` changed the layer). Pass ``check=False`` or a larger ``tolerance`` to
    :func:`implicit_attention.decompose` to inspect the matrices anyway.
    """

    def __init__(self, layer_name: str, error: float, tolerance: float):
        self.layer_name = layer_name
        self.error = error
        self.tolerance = tolerance
        super().__init__(
            f"layer {layer_name!r}: the implicit attention reconstructs the module output with "
            f"relative error {error:.3e}, above the tolerance {tolerance:.1e}. The module probably "
            "computes something this version of implicit_attention does not model; pass "
            "check=False (or a larger tolerance=) to decompose anyway."
        )


def format_bytes(n: float) -> str:
    """Human-readable size: ``format_bytes(3 * 2**30) == '3.0 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
