"""The error of the data set modules (no other import of the package: every module can use it)."""

from __future__ import annotations

from ..errors import ImplicitAttentionError

__all__ = ["DatasetError"]


class DatasetError(ImplicitAttentionError, ValueError):
    """A data set file, an output directory or the options of a data set run are unusable."""
