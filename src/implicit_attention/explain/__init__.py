"""Explanations: relevance of the input tokens for a prediction.

``api`` holds :func:`explain` and :func:`run_explanation`, ``combine`` turns the decomposed layers'
maps into relevance by a matrix method, ``rules`` the rules themselves (rollout, attribution
rollout, the paper's recipe) as small tensor functions, ``baselines`` the methods without matrices
(random, gradient x input, integrated gradients, occlusion), ``target`` which score is explained.
"""

from ..catalog import BASELINE_METHODS, MATRIX_METHODS, METHODS
from .api import Explanation, explain, run_explanation
from .combine import combine, layer_maps

__all__ = ["BASELINE_METHODS", "Explanation", "MATRIX_METHODS", "METHODS", "combine", "explain", "layer_maps",
           "run_explanation"]
