"""``explain``: relevance of each input token for one prediction, from the implicit attention or a baseline."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures.primitives import to_batch
from ..architectures.registry import padding_leaks
from ..catalog import AGGREGATES, MATRIX_METHODS, ROLLOUT_NEEDS_NON_NEGATIVE
from ..decomposition import (
    DEFAULT_TOLERANCE,
    PHASE,
    Decomposition,
    build_layers,
    check_variant,
    compute_dtype_for,
    ensure_decomposition_fits,
)
from ..devices import model_dtype
from ..errors import PaddingError
from ..hooks import capture, layer_indices, select_layers
from ..inputs import ModelInputs, as_module, prepare_model_inputs
from ..scans import parallel_scans
from .combination import combine
from .target import Target, resolve_target


@dataclass
class Explanation:
    """The full result behind :func:`explain`.

    Attributes:
        relevance: ``[B, L]`` relevance of each input token (0 on padding).
        target: the explained score (target ids and position).
        logits: the model's logits on the input.
        decomposition: the decomposed layers for matrix methods, else ``None``.
        method, variant: what was asked (``variant`` is ``None`` for baselines, which do not use it).
        diagnostics: what a method reports beside the relevance, e.g. integrated gradients'
            ``convergence_delta`` ``[B]`` or LRP's ``conservation_delta`` ``[B]``.
        span: ``[B, L]`` bool, the tokens that :meth:`normalized` and :meth:`top_tokens` read (the
            ``span`` of :func:`run_explanation`, within the real tokens); ``None``: every real token.
    """

    relevance: torch.Tensor
    target: Target
    logits: torch.Tensor
    decomposition: Decomposition | None
    method: str
    variant: str | None
    diagnostics: dict = field(default_factory=dict)
    span: torch.Tensor | None = None

    def _span(self) -> torch.Tensor:
        if self.span is not None:
            return self.span
        return torch.ones(self.relevance.shape, dtype=torch.bool, device=self.relevance.device)

    def normalized(self) -> torch.Tensor:
        """``[B, L]`` relevance divided by each row's largest ``|relevance|`` inside the span (tokens outside
        share the scale and may exceed 1; a row without relevance stays 0)."""
        inside = self.relevance.abs().masked_fill(~self._span(), 0)
        scale = inside.amax(dim=-1, keepdim=True)
        return torch.where(scale > 0, self.relevance / scale.clamp_min(1e-300), torch.zeros_like(self.relevance))

    def top_tokens(self, k: int = 5) -> list[list[int]]:
        """Per row, the positions of the ``k`` most relevant tokens inside the span, largest first."""
        ranked = self.relevance.masked_fill(~self._span(), float("-inf")).argsort(dim=-1, descending=True)
        counts = self._span().sum(dim=-1).tolist()
        return [row[: min(k, n)].tolist() for row, n in zip(ranked, counts)]

    def save(self, path, *, decomposition: bool = False, layers=None, aggregates=("mean",)):
        """Save to the directory ``path`` (``meta.json`` + ``tensors.safetensors``); ``decomposition=True``
        also saves the decomposition (``layers``, ``aggregates`` as for :meth:`Decomposition.save`, default
        the ``"mean"`` aggregates). See :func:`implicit_attention.persistence.save_explanation`."""
        from ..persistence import save_explanation

        return save_explanation(self, path, decomposition=decomposition, layers=layers, aggregates=aggregates)

    @classmethod
    def load(cls, path) -> Explanation:
        """The explanation saved at ``path`` by :meth:`save` (same relevance, logits, target, span,
        diagnostics, method and variant; a callable target comes back without its function)."""
        from ..persistence import load_explanation

        return load_explanation(path)

    def __repr__(self) -> str:
        from ..display import explanation_repr

        return explanation_repr(self)

    def _repr_html_(self) -> str:
        """A relevance bar per position (token ids as labels), for Jupyter."""
        from ..display import explanation_html

        return explanation_html(self)

    def show(self) -> None:
        """Display the bars inline with IPython (a notebook), else print the one-line repr."""
        from ..display import show

        show(self)


def resolve_span(span, relevance: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, L]`` bool from ``span``: a ``slice`` of positions, or a bool mask ``[L]`` or ``[B, L]``; kept
    within the real tokens. ``None`` stays ``None``."""
    if span is None:
        return None
    shape = relevance.shape
    if isinstance(span, slice):
        mask = torch.zeros(shape, dtype=torch.bool, device=relevance.device)
        mask[:, span] = True
    else:
        mask = torch.as_tensor(span, device=relevance.device)
        if mask.dtype != torch.bool or mask.shape not in (shape, shape[1:]):
            raise ValueError(f"span must be a slice or a bool mask of shape {tuple(shape[1:])} or {tuple(shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.expand(shape).clone()
    if attention_mask is not None:
        mask &= attention_mask.to(device=relevance.device).bool()
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("the span holds no real token in some row")
    return mask


def explain(model: nn.Module, input_ids, attention_mask=None, *, method: str = "attribution",
            target=None, position: int = -1, **options) -> torch.Tensor:
    """Relevance ``[B, L]`` of the input tokens for the score of ``target`` at ``position``.

    Args:
        model: a supported model with a head (``MambaForCausalLM``, ``FalconMambaForCausalLM``, ...).
        input_ids: ``[B, L]`` or ``[L]``; pad batches on the left.
        attention_mask: ``[B, L]`` or ``None``.
        method: from the implicit attention: ``"raw"`` (target row of the layer-mean aggregated map),
            ``"rollout"`` (attention rollout), ``"attribution"`` (gradient-weighted attention, Chefer
            et al. 2021, the default), ``"signed_attribution"`` (the same without the clamp),
            ``"paper"`` (the paper's recipe); or a baseline: ``"random"``, ``"grad_x_input"``,
            ``"integrated_gradients"``, ``"occlusion"``, ``"smoothgrad"``, ``"lrp"`` (the MambaLRP
            rules). Each is a class of :mod:`.methods` with its own typed options.
        target: what is explained: a token id (or ``[B]`` ids) whose logit is the score, a
            :class:`~.target.Contrast`, a :class:`~.target.LogProb` or a callable on the logits
            (see :mod:`.target`); default the logit of the predicted token.
        position: output position of a causal LM (default the last).
        **options: the method's options (see its class in :mod:`.methods`): ``variant``, ``layers``,
            ``dtype``, ``check``, ``tolerance`` for matrix methods, ``aggregate`` for raw and
            rollout, ``start_layer`` for paper, ``steps`` and ``baseline`` for integrated gradients,
            ``window`` and ``replacement`` for occlusion, ``samples``, ``noise`` and ``seed`` for
            smoothgrad, ``seed`` for random. Options of other methods are ignored (so that one set
            of settings serves every method); a name no method takes is an error.
    """
    return run_explanation(model, input_ids, attention_mask, method=method, target=target, position=position,
                           **options).relevance


def run_explanation(model: nn.Module, input_ids, attention_mask=None, *, method: str = "attribution",
                    target=None, position: int = -1, span=None, **options) -> Explanation:
    """:func:`explain`, returning the :class:`Explanation` with the decomposition, target and diagnostics.

    ``span``: the tokens that the explanation's :meth:`~Explanation.normalized` and
    :meth:`~Explanation.top_tokens` read (a ``slice`` of positions or a bool mask ``[L]`` / ``[B, L]``),
    e.g. the user's text inside a prompt; the relevance itself is computed over every token.
    """
    from .methods import make_method

    explanation = make_method(method, model, **options).explain(input_ids, attention_mask, target=target,
                                                                position=position)
    if span is not None:
        prepared = prepare_model_inputs(as_module(model), input_ids, attention_mask)
        explanation.span = resolve_span(span, explanation.relevance, prepared.attention_mask)
    return explanation


def baseline_explanation(model: nn.Module, input_ids, attention_mask, method: str,
                         relevance_fn: Callable[[ModelInputs, Target], tuple[torch.Tensor, dict]], *,
                         target=None, position: int = -1, dtype: torch.dtype | None = None,
                         one_pass: Callable | None = None) -> Explanation:
    """An :class:`Explanation` by a method that runs the model only.

    ``relevance_fn(inputs, target) -> (relevance [B, L], diagnostics)`` computes the relevance for
    the prepared inputs and the resolved target, after a forward pass that gives the logits (and
    resolves the target). ``one_pass(inputs, resolve) -> (relevance, target, logits)``, where given,
    does both in one forward pass instead (``resolve(logits) -> Target``): gradient x input.
    """
    model = as_module(model)
    inputs = prepare_model_inputs(model, input_ids, attention_mask)
    refuse_padding_that_leaks(model, inputs.attention_mask)
    compute_dtype = compute_dtype_for(model, dtype)
    resolve = lambda logits: resolve_target(logits, target, position, inputs.length,  # noqa: E731
                                            row=inputs.classifier_row)
    if one_pass is not None:
        relevance, tgt, logits = one_pass(inputs, resolve)
        _warn_if_padding(inputs.attention_mask, tgt.row)
        return Explanation(_finish(relevance, inputs.attention_mask, compute_dtype), tgt, logits, None, method,
                           None, {})
    with torch.no_grad():
        logits = inputs.call(model).logits
    tgt = resolve(logits)
    _warn_if_padding(inputs.attention_mask, tgt.row)
    relevance, diagnostics = relevance_fn(inputs, tgt)
    return Explanation(_finish(relevance, inputs.attention_mask, compute_dtype), tgt, logits, None, method, None,
                       diagnostics)


def matrix_explanation(model: nn.Module, input_ids, attention_mask=None, *, method: str = "attribution",
                       target=None, position: int = -1, variant: str = "unified",
                       layers: int | Sequence[int] | None = None, dtype: torch.dtype | None = None,
                       check: bool = True, tolerance: float | None = None, progress: bool | None = None,
                       aggregate: str = "abs", start_layer: int | None = None, signed: bool = False) -> Explanation:
    """An :class:`Explanation` by a matrix ``method`` of :data:`~implicit_attention.catalog.MATRIX_METHODS`:
    capture the token-mixing layers, decompose them (checked), combine their maps (:func:`.combination.combine`)."""
    if method not in MATRIX_METHODS:
        raise ValueError(f"{method!r} is not a matrix method; choose one of {MATRIX_METHODS}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if method == "rollout" and aggregate == "mean":
        raise ValueError(ROLLOUT_NEEDS_NON_NEGATIVE)
    rule = "attribution" if method == "signed_attribution" else method     # the same computation and memory
    model = as_module(model)
    inputs = prepare_model_inputs(model, input_ids, attention_mask)
    ids, mask, length = inputs.values, inputs.attention_mask, inputs.length
    refuse_padding_that_leaks(model, mask)
    compute_dtype = compute_dtype_for(model, dtype)
    targets = select_layers(model, layers)
    check_variant(targets, variant)
    ensure_decomposition_fits(targets, inputs, compute_dtype, method=rule)
    need_grad = rule in ("attribution", "paper")
    embeds = inputs.embed(model).requires_grad_(need_grad)
    grads: list[torch.Tensor] = []
    with torch.set_grad_enabled(need_grad), parallel_scans(model, inputs.shape), \
            capture(model, targets, keep_graph=need_grad, block_inputs=rule == "paper") as captured:
        out = inputs.call(model, embeds)
        captured.stop()            # a backward that recomputes blocks calls the hooked layers again
        logits = getattr(out, "logits", None)
        tgt = resolve_target(logits, target, position, length, row=inputs.classifier_row)
        _warn_if_padding(mask, tgt.row)
        if need_grad:
            wrt = [r.output for r in captured] if rule == "attribution" else [r.block_input for r in captured]
            grads = list(torch.autograd.grad(tgt.score(logits).sum(), wrt))
            if rule == "attribution":  # layers that ran the batch unpadded: back to [B, L, C]
                grads = [to_batch(g, r.inputs, r.attention_mask) for g, r in zip(grads, captured)]
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(model_dtype(model), 1e-4)
    with torch.profiler.record_function(PHASE):
        built = build_layers(captured, layer_indices(model, captured), variant=variant, dtype=compute_dtype,
                             check=check, tolerance=tol, progress=progress, default_tolerance=tolerance is None)
        captured.clear()  # the layers' inputs and call arguments: no longer needed
        mask_f = inputs.token_mask(compute_dtype)
        relevance = combine(method, built, grads, tgt.row, mask_f, aggregate=aggregate, start_layer=start_layer,
                            signed=signed)
    decomposition = Decomposition(layers=built, input_values=ids, attention_mask=mask,
                                  logits=logits.detach(), variant=variant)
    return Explanation(_finish(relevance, mask, compute_dtype), tgt, logits.detach(), decomposition, method, variant)


def refuse_padding_that_leaks(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Raise :class:`~implicit_attention.errors.PaddingError` for a padded batch of a model that reads padding.

    Its prediction for a padded text differs from the text's own, so no explanation of the batch
    explains the text; each text must run alone.
    """
    if mask is None or bool(mask.all()):
        return
    leaks = padding_leaks(model)
    if leaks:
        shown = ", ".join(leaks[:2]) + (", ..." if len(leaks) > 2 else "")
        raise PaddingError(
            f"{type(model).__name__} reads padding tokens (its layers {shown} ignore the attention mask, or carry "
            "a bias into real tokens), so padding changes its predictions: explain one text at a time (an "
            "unpadded row); implicit_attention.explain_texts and the command line do so for this model")


def _warn_if_padding(mask: torch.Tensor | None, row: int) -> None:
    """Right-padded batches put the explained position on padding: say so instead of explaining it silently."""
    if mask is not None and mask.dim() == 2 and bool((mask[:, row] == 0).any()):
        bad = (mask[:, row] == 0).nonzero().reshape(-1).tolist()
        warnings.warn(f"the explained position {row} is padding in example(s) {bad}: pad the batch on the left "
                      "(tokenizer.padding_side = 'left'), so that every text ends at the last position, or explain "
                      "raw strings with implicit_attention.explain_texts, which pads them so (position= is one "
                      "position for the whole batch: it cannot reach the end of texts of different lengths)",
                      UserWarning, stacklevel=3)


def _finish(relevance: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    relevance = relevance.detach().to(dtype)
    return relevance if mask is None else relevance * mask.to(dtype)
