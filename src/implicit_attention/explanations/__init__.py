"""Explanations: relevance of the input tokens for a prediction.

``api`` holds :func:`explain` and :func:`run_explanation`, ``methods`` one class per method (typed
options, Captum's shape), ``combination`` turns the decomposed layers' maps into relevance by a
matrix method, ``rules`` the rules themselves (rollout, attribution rollout, the paper's recipe) as
small tensor functions, ``baselines`` the methods without matrices (random, gradient x input,
integrated gradients, occlusion, SmoothGrad, through Captum), ``lrp`` the MambaLRP rules, ``target``
which score is explained, ``texts`` the same from raw strings with a loaded model (:func:`explain_texts`).
"""

from ..catalog import BASELINE_METHODS, MATRIX_METHODS, METHODS
from .api import Explanation, explain, run_explanation
from .combination import combine, layer_maps
from .texts import ExplainedTarget, TextExplanation, TextExplanations, TextRun, explain_texts

__all__ = ["BASELINE_METHODS", "ExplainedTarget", "Explanation", "MATRIX_METHODS", "METHODS", "TextExplanation",
           "TextExplanations", "TextRun", "combine", "explain", "explain_texts", "layer_maps", "run_explanation"]
