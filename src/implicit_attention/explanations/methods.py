"""One small class per explanation method, in Captum's shape.

Each is constructed with the model and its own typed options and explains with
``attribute(input_ids, attention_mask=None, *, target=None, position=-1) -> [B, L]`` (or
``explain(...)`` for the whole :class:`~.api.Explanation`)::

    from implicit_attention.explanations.methods import IntegratedGradients
    ig = IntegratedGradients(model, steps=64, baseline=tokenizer.pad_token_id)
    relevance = ig.attribute(input_ids, attention_mask, target=token_id)

:func:`~.api.explain` ``(model, ..., method="integrated_gradients", steps=64)`` builds the same
object from the method's name (:data:`METHOD_CLASSES`) and passes it the options it takes.
``target`` may be an id, ``[B]`` ids, a :class:`~.target.Contrast`, a :class:`~.target.LogProb` or
a callable (see :mod:`.target`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..catalog import (
    AGGREGATES,
    METHOD_OPTIONS,
    METHODS,
    OPTION_KINDS,
    ROLLOUT_NEEDS_NON_NEGATIVE,
    check_option_value,
)
from ..inputs import as_module
from . import baselines
from .api import Explanation, baseline_explanation, matrix_explanation


@dataclass
class Method:
    """The base of every method: the model (a ``LoadedModel`` gives its model) and the compute dtype."""

    model: nn.Module
    dtype: torch.dtype | None = None

    #: the method's name in :func:`~.api.explain` and on the command line
    name: ClassVar[str] = ""

    def __post_init__(self):
        for option in METHOD_OPTIONS.get(self.name, ()):
            check_option_value(option, getattr(self, option))

    def attribute(self, input_ids, attention_mask=None, *, target=None, position: int = -1) -> torch.Tensor:
        """Relevance ``[B, L]`` of the input tokens (0 on padding) for ``target`` at ``position``."""
        return self.explain(input_ids, attention_mask, target=target, position=position).relevance

    def explain(self, input_ids, attention_mask=None, *, target=None, position: int = -1) -> Explanation:
        """The :class:`~.api.Explanation`: relevance, explained target, logits, decomposition, diagnostics."""
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options this method takes (its dataclass fields besides the model)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "model")


# ----------------------------------------------------------------------- from the implicit attention
@dataclass
class MatrixMethod(Method):
    """A method on the decomposed layers: ``variant``, ``layers`` and the exactness check as in
    :func:`~implicit_attention.decompose`."""

    variant: str = "unified"
    layers: int | Sequence[int] | None = None
    check: bool = True
    tolerance: float | None = None
    progress: bool | None = None

    def _combine_options(self) -> dict:
        return {}

    def explain(self, input_ids, attention_mask=None, *, target=None, position: int = -1) -> Explanation:
        return matrix_explanation(self.model, input_ids, attention_mask, method=self.name, target=target,
                                  position=position, variant=self.variant, layers=self.layers, dtype=self.dtype,
                                  check=self.check, tolerance=self.tolerance, progress=self.progress,
                                  **self._combine_options())


@dataclass
class Raw(MatrixMethod):
    """The explained row of the layers' aggregated maps, averaged over the layers.

    ``aggregate``: ``"abs"`` (mean of ``|A|`` over channels), ``"pos"`` (of ``relu(A)``) or ``"mean"`` (signed).
    """

    aggregate: str = "abs"
    name: ClassVar[str] = "raw"

    def __post_init__(self):
        super().__post_init__()
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")

    def _combine_options(self) -> dict:
        return {"aggregate": self.aggregate}


@dataclass
class Rollout(Raw):
    """Attention rollout (Abnar & Zuidema 2020) of the layers' aggregated maps: ``prod_l normalize_rows(I + A_l)``.

    The maps must be non-negative: ``aggregate`` is ``"abs"`` or ``"pos"``.
    """

    name: ClassVar[str] = "rollout"

    def __post_init__(self):
        super().__post_init__()
        if self.aggregate == "mean":
            raise ValueError(ROLLOUT_NEEDS_NON_NEGATIVE)


@dataclass
class Attribution(MatrixMethod):
    """Chefer et al. (2021): ``R = R + cam_l R`` with ``cam_l = mean_heads clamp(dA * A, 0)`` and the exact
    gradient ``dA[i, j] = g_i v_j``; a head is a channel of a recurrent layer, a head of softmax attention.
    ``signed=True`` keeps the sign of ``dA * A`` (no clamp)."""

    signed: bool = False
    name: ClassVar[str] = "attribution"

    def _combine_options(self) -> dict:
        return {"signed": self.signed}


@dataclass
class SignedAttribution(MatrixMethod):
    """:class:`Attribution` without the clamp: ``cam_l = mean_heads dA * A``, so that negative evidence is kept
    (blue in the report)."""

    name: ClassVar[str] = "signed_attribution"


@dataclass
class Paper(MatrixMethod):
    """The paper's recipe (as published for Vision Mamba): rollout from ``start_layer`` (default the second
    half) of ``minmax(mean_c relu(A_l) diag(s_l))``, ``s_l`` the min-max normalised ``max_c relu(gradient)``
    at each layer's block input."""

    start_layer: int | None = None
    name: ClassVar[str] = "paper"

    def _combine_options(self) -> dict:
        return {"start_layer": self.start_layer}


# --------------------------------------------------------------------------------- baselines
@dataclass
class BaselineMethod(Method):
    """A method that runs the model only (no decomposition); ``variant`` and ``layers`` do not apply."""

    def _relevance(self, inputs, target) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def _refuse_model(self) -> None:
        """Raise before running anything if the method cannot explain this model."""

    def _one_pass(self) -> Callable | None:
        """``(inputs, resolve) -> (relevance, target, logits)`` where the method needs only the forward pass
        that also gives the logits (see :func:`~.api.baseline_explanation`), else ``None``."""
        return None

    def explain(self, input_ids, attention_mask=None, *, target=None, position: int = -1) -> Explanation:
        self._refuse_model()
        return baseline_explanation(self.model, input_ids, attention_mask, self.name, self._relevance,
                                    target=target, position=position, dtype=self.dtype, one_pass=self._one_pass())


@dataclass
class RandomRelevance(BaselineMethod):
    """Uniform random relevance from ``seed``: the lower bound every method must beat."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def _relevance(self, inputs, target):
        return baselines.random_relevance(inputs, seed=self.seed), {}


@dataclass
class GradientXInput(BaselineMethod):
    """``sum_h embed[t, h] * d score / d embed[t, h]``."""

    name: ClassVar[str] = "grad_x_input"

    def _one_pass(self) -> Callable:
        return functools.partial(baselines.grad_x_input_one_pass, self.model)

    def _relevance(self, inputs, target):
        return baselines.grad_x_input(self.model, inputs, None, target), {}


@dataclass
class IntegratedGradients(BaselineMethod):
    """Integrated gradients (Captum) from a baseline embedding, summed over the hidden size.

    ``baseline``: ``"zeros"`` (the zero embedding), or a token id whose embedding replaces every token
    (the pad, unk or mask token's). ``steps``: Riemann steps. The explanation's diagnostics hold
    Captum's ``convergence_delta`` ``[B]`` (the completeness gap: sum of relevance minus the score
    difference between the input and the baseline).
    """

    steps: int = 32
    baseline: str | int = "zeros"
    name: ClassVar[str] = "integrated_gradients"

    def _relevance(self, inputs, target):
        relevance, delta = baselines.integrated_gradients(self.model, inputs, None, target, steps=self.steps,
                                                          baseline=self.baseline)
        return relevance, {"convergence_delta": delta}


@dataclass
class Occlusion(BaselineMethod):
    """The drop of the score when ``window`` consecutive tokens' embeddings are replaced (Captum, stride 1).

    ``replacement``: ``"zeros"`` or a token id whose embedding is put in. A token's relevance is the
    mean drop over the windows that cover it.
    """

    window: int = 1
    replacement: str | int = "zeros"
    name: ClassVar[str] = "occlusion"

    def _relevance(self, inputs, target):
        return baselines.occlusion(self.model, inputs, None, target, window=self.window,
                                   replacement=self.replacement), {}


@dataclass
class SmoothGrad(BaselineMethod):
    """SmoothGrad of gradient x input (Captum's ``NoiseTunnel``): the mean over ``samples`` copies of the
    embeddings with Gaussian noise of ``noise`` times their standard deviation, from ``seed``."""

    samples: int = 16
    noise: float = 0.1
    seed: int = 0
    name: ClassVar[str] = "smoothgrad"

    def _relevance(self, inputs, target):
        return baselines.smoothgrad(self.model, inputs, None, target, samples=self.samples, noise=self.noise,
                                    seed=self.seed), {}


@dataclass
class LRP(BaselineMethod):
    """Layer-wise relevance propagation as gradient x input of a backward pass with the LRP rules (see
    :mod:`.lrp`). MambaLRP (Jafari et al. 2024) for Mamba mixers: the identity rule through SiLU (the
    sigmoid detached), the norms' scales detached, the selective scan's ``dt``, ``B``, ``C`` detached (the
    scan is then linear in its input), the gate's product halved between its factors. AttnLRP (Achtibat
    et al. 2024) for softmax attention: ``q k^T`` and ``P v`` halved, the softmax by its gradient,
    LayerNorm/RMSNorm scales detached, the identity rule on activations, a gated MLP's product halved.
    Mamba, FalconMamba, GPT-2, Llama and BERT models. The diagnostics hold ``conservation_delta`` ``[B]``:
    the score minus the sum of relevance (0 for a Mamba without biases)."""

    name: ClassVar[str] = "lrp"

    def _refuse_model(self) -> None:
        from .lrp import refuse_unsupported
        refuse_unsupported(as_module(self.model))

    def _relevance(self, inputs, target):
        from .lrp import lrp_relevance
        return lrp_relevance(self.model, inputs, target)


#: Every method by name, as :func:`~.api.explain` and the command line know them.
METHOD_CLASSES: dict[str, type[Method]] = {cls.name: cls for cls in (
    Raw, Rollout, Attribution, SignedAttribution, Paper, RandomRelevance, GradientXInput, IntegratedGradients,
    Occlusion, SmoothGrad, LRP)}
assert tuple(METHOD_CLASSES) == METHODS, "catalog.METHODS and the method classes name the same methods in order"



def make_method(name: str, model: nn.Module, **options) -> Method:
    """The method ``name`` for ``model`` with the ``options`` it takes.

    The settings that :func:`~.api.explain` and the text tools pass to every method (``variant``,
    ``layers``, ``aggregate``, ``check``, ``dtype``, ...) are dropped for methods without them; another
    method's own option (``steps`` for rollout) is dropped with a warning; a name that no method takes
    raises ``TypeError``.
    """
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_CLASSES)}")
    known = {option for method in METHOD_CLASSES.values() for option in method.option_names()}
    unknown = sorted(set(options) - known)
    cls = METHOD_CLASSES[name]
    if unknown:
        raise TypeError(f"no method takes the option(s) {', '.join(unknown)}; {name!r} takes "
                        f"{', '.join(cls.option_names())}")
    taken = cls.option_names()
    foreign = sorted(set(options) & set(OPTION_KINDS) - set(taken))
    if foreign:
        warnings.warn(f"method {name!r} does not take {', '.join(foreign)} (ignored); it takes "
                      f"{', '.join(METHOD_OPTIONS[name]) or 'no options of its own'}", UserWarning, stacklevel=3)
    return cls(model, **{key: value for key, value in options.items() if key in taken})


__all__ = ["LRP", "METHOD_CLASSES", "Attribution", "GradientXInput", "IntegratedGradients", "MatrixMethod",
           "Method", "Occlusion", "Paper", "RandomRelevance", "Raw", "Rollout", "SignedAttribution", "SmoothGrad",
           "make_method"]
