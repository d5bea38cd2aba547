"""The error of the data set modules (it imports nothing else of the data set package, so every module can use it)."""

from __future__ import annotations

from ..errors import ImplicitAttentionError

__all__ = ["DatasetError"]


class DatasetError(ImplicitAttentionError, ValueError):
    """A data set file, an output directory or the options of a data set run are unusable."""
