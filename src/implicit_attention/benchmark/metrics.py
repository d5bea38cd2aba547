"""Faithfulness metrics of token-level explanations of a text classifier.

Everything here is pure: the functions take token ids, a relevance vector, the candidate positions
and a :class:`Scorer` (a batched forward pass), and return plain numbers.

- Perturbation test (Chefer et al. 2021): remove 0%, 10%, ..., 100% of the candidate tokens in
  order of relevance, most relevant first (*positive*, lower AUC is better) or least relevant first
  (*negative*, higher AUC is better), and record the target's probability, its explained score and
  whether the prediction is still the target at every step (:func:`perturbation_curve`, :func:`auc`).
- MambaLRP's ``dA = AUC(least relevant first) - AUC(most relevant first)`` (:func:`delta_auc`).
- ERASER (DeYoung et al. 2020): comprehensiveness ``p(y|x) - p(y|x \\ r)`` and sufficiency
  ``p(y|x) - p(y|r)`` for the top-k% tokens ``r`` (:func:`eraser`).
- Localisation on a task with planted ground-truth tokens: token-level ROC AUC and pointing game
  (:func:`localisation`).

Conventions:

- ``input_ids``: ``[L]`` one sequence, template and BOS included.
- ``relevance``: ``[L]`` one float per token of that sequence.
- ``positions``: ``[n]`` the *candidate* positions, the only ones ever perturbed (the review's own
  tokens; never the prompt template or BOS). Fractions are fractions of ``n``.
- Removing a token is either ``mode="delete"`` (drop it; the others keep their order and the
  sequence gets shorter) or ``mode="replace"`` (put ``pad_id`` in its place; same length).
- A scorer returns ``[m, num_labels]`` label logits; probabilities are their softmax, the prediction
  their argmax, and the explained score the label contrast (:func:`contrast`).

Ties in relevance are broken by position, earlier first, in both directions (:func:`ranking`), so an
uninformative constant relevance removes the same tokens in the positive and negative orders and
gets ``dA = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

#: The perturbation test's steps: 0%, 10%, ..., 100% of the candidate tokens removed.
FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(11))

#: ERASER's top-k% (k = 5, 10, 20, 50) of the candidate tokens.
ERASER_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)

#: How a removed token is removed: dropped from the sequence, or replaced by a pad token.
Mode = Literal["delete", "replace"]
MODES: tuple[str, ...] = ("delete", "replace")

#: Slack for products like ``0.7 * 45 = 31.499999999999996`` before rounding to a token count.
_EPS = 1e-9


class Scorer(Protocol):
    """A batched forward pass of the classifier.

    Called with ``m`` 1-D LongTensor sequences (possibly of different lengths, in ``"delete"`` mode),
    it returns a ``[m, num_labels]`` float tensor of label logits, row ``i`` for ``sequences[i]``.
    The metrics call it once per curve (or per ERASER evaluation) with all inputs; batching and
    padding them is the scorer's job.
    """

    def __call__(self, sequences: Sequence[torch.Tensor]) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------
# input checks


def _vector(x: torch.Tensor | Sequence[float], name: str) -> torch.Tensor:
    """``x`` as a 1-D float64 CPU tensor without NaNs."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per token), got shape {tuple(x.shape)}")
    x = x.to("cpu", torch.float64)
    if torch.isnan(x).any():
        raise ValueError(f"{name} holds NaN values")
    return x


def _ids(input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` checked to be one 1-D integer sequence."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 1-D tensor of token ids (one sequence), got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    return input_ids


def _positions(positions: torch.Tensor | Sequence[int], length: int, name: str = "positions") -> torch.Tensor:
    """``positions`` as a 1-D int64 CPU tensor of distinct positions in ``[0, length)``."""
    positions = torch.as_tensor(positions).detach()
    if positions.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of token positions, got shape {tuple(positions.shape)}")
    if positions.numel() and (positions.dtype.is_floating_point or positions.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer positions, got dtype {positions.dtype}")
    positions = positions.to("cpu", torch.long)
    if positions.numel():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= length:
            raise ValueError(f"{name} must lie in [0, {length}), got values from {low} to {high}")
        if torch.unique(positions).numel() != positions.numel():
            raise ValueError(f"{name} holds a position more than once")
    return positions


def _mode(mode: str, pad_id: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "replace" and pad_id is None:
        raise ValueError("mode='replace' puts pad_id in place of the removed tokens: give pad_id")


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a fraction must lie in [0, 1], got {fraction}")


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"the number of candidate tokens must be >= 0, got {n}")


# --------------------------------------------------------------------------------------------------
# orders and counts


def ranking(relevance: torch.Tensor, positions: torch.Tensor, *, descending: bool = True) -> torch.Tensor:
    """The candidate positions in order of relevance.

    Args:
        relevance: ``[L]`` relevance of every token of the sequence.
        positions: ``[n]`` the candidate positions (any order; distinct, in ``[0, L)``).
        descending: most relevant first (default) or least relevant first.

    Returns:
        ``[n]`` LongTensor (CPU): ``positions`` sorted by relevance, ties broken by position, earlier
        first, in both directions.
    """
    relevance = _vector(relevance, "relevance")
    positions = _positions(positions, relevance.numel())
    values = relevance[positions]
    key = -values if descending else values
    return positions[torch.from_numpy(np.lexsort((positions.numpy(), key.numpy())))]


def _order(input_ids: torch.Tensor, relevance: torch.Tensor, positions: torch.Tensor, *,
           descending: bool) -> torch.Tensor:
    """:func:`ranking` after checking that ``relevance`` matches ``input_ids`` and that there are candidates."""
    relevance = _vector(relevance, "relevance")
    if relevance.numel() != input_ids.numel():
        raise ValueError(f"relevance has {relevance.numel()} values for {input_ids.numel()} tokens")
    order = ranking(relevance, positions, descending=descending)
    if order.numel() == 0:
        raise ValueError("no candidate positions to perturb")
    return order


def count_for_fraction(n: int, fraction: float) -> int:
    """How many of ``n`` candidate tokens the perturbation test removes at ``fraction``.

    ``round(fraction * n)`` with halves rounded up, ``floor(fraction * n + 0.5)`` (with a 1e-9
    slack against floating-point error, so ``0.7 * 45 = 31.499999999999996`` counts as 31.5 and
    gives 32); 0 at fraction 0 and ``n`` at fraction 1.
    """
    _check_n(n)
    _check_fraction(fraction)
    return min(n, max(0, math.floor(fraction * n + 0.5 + _EPS)))


def eraser_count(n: int, fraction: float) -> int:
    """How many of ``n`` candidate tokens form ERASER's top-``fraction`` rationale.

    ERASER rounds up: ``ceil(fraction * n)`` (with a 1e-9 slack against floating-point error, so
    ``(0.1 + 0.2) * 10 = 3.0000000000000004`` gives 3, not 4), and at least one token when
    ``n >= 1``; at most ``n``.
    """
    _check_n(n)
    _check_fraction(fraction)
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(fraction * n - _EPS)))


# --------------------------------------------------------------------------------------------------
# perturbed sequences


def _without(input_ids: torch.Tensor, removed: torch.Tensor, mode: str, pad_id: int | None) -> torch.Tensor:
    """``input_ids`` ``[L]`` with the positions ``removed`` deleted or set to ``pad_id``."""
    removed = removed.to(input_ids.device)
    if mode == "replace":
        out = input_ids.clone()
        out[removed] = pad_id
        return out
    keep = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    keep[removed] = False
    return input_ids[keep]


def _order_and_counts(input_ids: torch.Tensor, order: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    order = _positions(order, input_ids.numel(), "order")
    for k in counts:
        if not 0 <= int(k) <= order.numel():
            raise ValueError(f"a count must lie in [0, {order.numel()}] (the length of order), got {k}")
    return order


def perturbed_inputs(input_ids: torch.Tensor, order: torch.Tensor, counts: Sequence[int], *, mode: Mode,
                     pad_id: int | None = None) -> list[torch.Tensor]:
    """The sequences of a perturbation curve: for each ``k`` in ``counts``, ``order[:k]`` removed.

    Args:
        input_ids: ``[L]`` token ids.
        order: ``[n]`` candidate positions in removal order (from :func:`ranking`).
        counts: how many of ``order`` to remove, one sequence per count (each in ``[0, n]``).
        mode: ``"delete"``: drop the removed tokens, the others keep their order (length ``L - k``);
            ``"replace"``: ``pad_id`` in their place (length ``L``).
        pad_id: the replacement token id (needed by ``"replace"``).

    Returns:
        One 1-D tensor per count, on ``input_ids``' device; positions outside ``order`` are never
        touched.
    """
    input_ids = _ids(input_ids)
    _mode(mode, pad_id)
    order = _order_and_counts(input_ids, order, counts)
    return [_without(input_ids, order[: int(k)], mode, pad_id) for k in counts]


def kept_inputs(input_ids: torch.Tensor, order: torch.Tensor, counts: Sequence[int], *, mode: Mode,
                pad_id: int | None = None) -> list[torch.Tensor]:
    """The sequences of a sufficiency test: for each ``k`` in ``counts``, only ``order[:k]`` kept.

    Every candidate position (every position in ``order``) except the first ``k`` is removed
    (deleted or replaced by ``pad_id``, see :func:`perturbed_inputs`); positions outside ``order``
    (template, BOS) are always kept.

    Args:
        input_ids: ``[L]`` token ids.
        order: ``[n]`` all candidate positions, most relevant first.
        counts: how many of ``order`` to keep, one sequence per count (each in ``[0, n]``).

    Returns:
        One 1-D tensor per count, on ``input_ids``' device.
    """
    input_ids = _ids(input_ids)
    _mode(mode, pad_id)
    order = _order_and_counts(input_ids, order, counts)
    return [_without(input_ids, order[int(k):], mode, pad_id) for k in counts]


# --------------------------------------------------------------------------------------------------
# scores


def contrast(scores: torch.Tensor, target: int, *, other: Literal["mean", "max"] = "mean") -> torch.Tensor:
    """The explained score: the target label's logit minus the other labels' logits.

    Args:
        scores: ``[m, num_labels]`` label logits (``num_labels >= 2``).
        target: the label.
        other: ``"mean"`` (default): minus the mean of the other logits, the library's
            :class:`~implicit_attention.Contrast` and the default score of the text tools;
            ``"max"``: minus the largest other logit (a margin). Both agree on two labels.

    Returns:
        ``[m]``.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"a contrast needs [m, num_labels >= 2] scores, got shape {tuple(scores.shape)}")
    _check_target(target, scores.shape[1])
    others = torch.cat([scores[:, :target], scores[:, target + 1:]], dim=1)
    if other == "mean":
        reduced = others.mean(dim=1)
    elif other == "max":
        reduced = others.max(dim=1).values
    else:
        raise ValueError(f"other must be 'mean' or 'max', got {other!r}")
    return scores[:, target] - reduced


def _check_target(target: int, num_labels: int) -> None:
    if not 0 <= int(target) < num_labels:
        raise ValueError(f"target must be a label in [0, {num_labels}), got {target}")


def _score(scorer: Scorer, sequences: list[torch.Tensor]) -> torch.Tensor:
    """``scorer(sequences)`` checked and moved to a ``[m, num_labels]`` float64 CPU tensor."""
    scores = scorer(sequences)
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(np.asarray(scores))
    if scores.dim() != 2 or scores.shape[0] != len(sequences):
        raise ValueError(f"the scorer must return [{len(sequences)}, num_labels] label scores for "
                         f"{len(sequences)} sequences, got shape {tuple(scores.shape)}")
    return scores.detach().to("cpu", torch.float64)


# --------------------------------------------------------------------------------------------------
# perturbation curves


@dataclass(frozen=True)
class Curve:
    """One perturbation curve; plain lists so that it serialises to JSON.

    Attributes:
        fractions: ``[S]`` fraction of the candidate tokens removed at each step.
        probability: ``[S]`` the target's softmax probability.
        score: ``[S]`` the explained score, the label contrast (:func:`contrast`).
        correct: ``[S]`` whether the prediction (argmax) is still the target.
        counts: ``[S]`` the number of tokens removed.
        most_relevant_first: the positive (``True``) or negative (``False``) order.
    """

    fractions: list[float]
    probability: list[float]
    score: list[float]
    correct: list[bool]
    counts: list[int]
    most_relevant_first: bool

    def __post_init__(self) -> None:
        lengths = {len(self.fractions), len(self.probability), len(self.score), len(self.correct), len(self.counts)}
        if len(lengths) != 1:
            raise ValueError("a curve's fractions, probability, score, correct and counts must have one length")

    def values(self, key: str) -> list[float]:
        """The values of ``key`` (``"probability"``, ``"score"`` or ``"correct"``, the accuracy) as floats."""
        if key not in ("probability", "score", "correct"):
            raise ValueError(f"key must be 'probability', 'score' or 'correct', got {key!r}")
        return [float(v) for v in getattr(self, key)]

    def auc(self, key: str = "probability") -> float:
        """:func:`auc` of the values of ``key`` over the fractions."""
        return auc(self.fractions, self.values(key))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Curve:
        return cls(fractions=[float(v) for v in data["fractions"]],
                   probability=[float(v) for v in data["probability"]],
                   score=[float(v) for v in data["score"]],
                   correct=[bool(v) for v in data["correct"]],
                   counts=[int(v) for v in data["counts"]],
                   most_relevant_first=bool(data["most_relevant_first"]))


def auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal area under ``values`` over ``fractions``.

    ``fractions`` (increasing) span ``[0, 1]`` in the perturbation test, so the area is a mean-like
    number in the values' own unit. Published perturbation numbers are the AUC of the accuracy in
    percent; we keep ``[0, 1]`` floats and the report multiplies by 100.
    """
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"auc needs two 1-D sequences of one length >= 2, got {x.shape} and {y.shape}")
    if not np.all(np.diff(x) > 0):
        raise ValueError("auc needs strictly increasing fractions")
    if not np.all(np.isfinite(y)):
        raise ValueError("auc needs finite values")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def perturbation_curve(scorer: Scorer, input_ids: torch.Tensor, relevance: torch.Tensor, positions: torch.Tensor,
                       target: int, *, mode: Mode, pad_id: int | None = None, most_relevant_first: bool,
                       fractions: Sequence[float] = FRACTIONS) -> Curve:
    """The perturbation test of one explanation: remove candidate tokens in order of relevance.

    At each fraction ``f`` the first :func:`count_for_fraction` ``(n, f)`` positions of
    :func:`ranking` (most or least relevant first) are removed; the scorer is called once with every
    step's sequence.

    Args:
        scorer: the batched classifier (:class:`Scorer`).
        input_ids: ``[L]`` token ids.
        relevance: ``[L]`` the explanation.
        positions: ``[n]`` candidate positions (``n >= 1``).
        target: the explained label.
        mode, pad_id: how tokens are removed (:func:`perturbed_inputs`).
        most_relevant_first: positive (``True``, lower AUC is better) or negative order.
        fractions: increasing fractions in ``[0, 1]``.
    """
    input_ids = _ids(input_ids)
    _mode(mode, pad_id)
    fractions = [float(f) for f in fractions]
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError("fractions must be strictly increasing")
    order = _order(input_ids, relevance, positions, descending=most_relevant_first)
    counts = [count_for_fraction(order.numel(), f) for f in fractions]
    scores = _score(scorer, perturbed_inputs(input_ids, order, counts, mode=mode, pad_id=pad_id))
    _check_target(target, scores.shape[1])
    return Curve(fractions=fractions,
                 probability=scores.softmax(dim=1)[:, target].tolist(),
                 score=contrast(scores, target).tolist(),
                 correct=(scores.argmax(dim=1) == target).tolist(),
                 counts=counts,
                 most_relevant_first=most_relevant_first)


def delta_auc(curve_least_first: Curve, curve_most_first: Curve, key: str = "probability") -> float:
    """MambaLRP's ``dA = AUC(least relevant first) - AUC(most relevant first)`` (higher is better).

    ``key``: ``"probability"``, ``"score"`` or ``"correct"`` (accuracy). The curves must share their
    fractions and come in this order (checked with their ``most_relevant_first``).
    """
    if curve_least_first.most_relevant_first or not curve_most_first.most_relevant_first:
        raise ValueError("delta_auc takes the least-relevant-first curve, then the most-relevant-first curve")
    if list(curve_least_first.fractions) != list(curve_most_first.fractions):
        raise ValueError("the two curves have different fractions")
    return curve_least_first.auc(key) - curve_most_first.auc(key)


# --------------------------------------------------------------------------------------------------
# ERASER


def eraser(scorer: Scorer, input_ids: torch.Tensor, relevance: torch.Tensor, positions: torch.Tensor, target: int,
           *, mode: Mode, pad_id: int | None = None, fractions: Sequence[float] = ERASER_FRACTIONS) -> dict[str, Any]:
    """ERASER comprehensiveness and sufficiency of the top-k% candidate tokens, on the target's probability.

    For each fraction the rationale ``r`` is the first :func:`eraser_count` ``(n, f)`` positions of
    :func:`ranking` (rounded up, at least one token);
    comprehensiveness ``p(y|x) - p(y|x \\ r)`` removes ``r`` (higher is better), sufficiency
    ``p(y|x) - p(y|r)`` keeps only ``r`` among the candidates (lower is better; template and BOS
    stay). One scorer call with ``1 + 2 * len(fractions)`` sequences.

    Returns:
        ``{"fractions", "counts", "probability"`` (``p(y|x)``)``, "comprehensiveness",
        "sufficiency"`` (lists aligned with ``fractions``)``, "comprehensiveness_mean",
        "sufficiency_mean"}`` (means over the fractions, AOPC-style).
    """
    input_ids = _ids(input_ids)
    _mode(mode, pad_id)
    fractions = [float(f) for f in fractions]
    if not fractions:
        raise ValueError("eraser needs at least one fraction")
    order = _order(input_ids, relevance, positions, descending=True)
    counts = [eraser_count(order.numel(), f) for f in fractions]
    sequences = ([input_ids] + perturbed_inputs(input_ids, order, counts, mode=mode, pad_id=pad_id)
                 + kept_inputs(input_ids, order, counts, mode=mode, pad_id=pad_id))
    scores = _score(scorer, sequences)
    _check_target(target, scores.shape[1])
    probability = scores.softmax(dim=1)[:, target]
    full, without, only = probability[0], probability[1:1 + len(counts)], probability[1 + len(counts):]
    comprehensiveness = (full - without).tolist()
    sufficiency = (full - only).tolist()
    return {"fractions": fractions, "counts": counts, "probability": float(full),
            "comprehensiveness": comprehensiveness, "sufficiency": sufficiency,
            "comprehensiveness_mean": float(np.mean(comprehensiveness)),
            "sufficiency_mean": float(np.mean(sufficiency))}


# --------------------------------------------------------------------------------------------------
# localisation


def average_ranks(values: np.ndarray) -> np.ndarray:
    """``[n]`` 1-based ranks of ``values`` ``[n]``, tied values sharing their mean rank; O(n log n)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1))
    ends = np.concatenate((starts[1:], [values.size]))
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` ``[n]`` for the boolean ``labels`` ``[n]``: the Mann-Whitney statistic.

    The probability that a positive scores above a negative, ties counting 1/2:
    ``(sum of the positives' average ranks - P (P + 1) / 2) / (P N)``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"roc_auc needs 1-D scores and labels of one length, got {scores.shape} and {labels.shape}")
    if np.isnan(scores).any():
        raise ValueError("roc_auc: the scores hold NaN values")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"roc_auc needs positives and negatives, got {positives} positives and {negatives} negatives")
    u = average_ranks(scores)[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def localisation(relevance: torch.Tensor, positions: torch.Tensor, planted: torch.Tensor) -> dict[str, float]:
    """How well the relevance finds the planted ground-truth tokens, among the candidate positions.

    Args:
        relevance: ``[L]``.
        positions: ``[n]`` the candidate positions.
        planted: ``[p]`` the planted positions, a subset of ``positions`` (at least one, and not all).

    Returns:
        ``{"roc_auc": ..., "pointing": ...}``: the token-level ROC AUC of the candidates' relevance
        against planted / not planted (:func:`roc_auc`; 1 = every planted token above every other,
        0.5 = chance), and the pointing game: 1.0 if the most relevant candidate is planted, else
        0.0; when several candidates tie at the top, the fraction of them that are planted (the
        expected hit of a random tie-break).
    """
    relevance = _vector(relevance, "relevance")
    positions = _positions(positions, relevance.numel())
    planted = _positions(planted, relevance.numel(), "planted")
    is_planted = torch.isin(positions, planted)
    if int(is_planted.sum()) != planted.numel():
        raise ValueError("every planted position must be one of the candidate positions")
    if planted.numel() == 0:
        raise ValueError("localisation needs at least one planted candidate position, got none")
    if planted.numel() == positions.numel():
        raise ValueError("localisation needs at least one candidate position that is not planted, got none")
    values = relevance[positions].numpy()
    labels = is_planted.numpy()
    top = values == values.max()
    return {"roc_auc": roc_auc(values, labels), "pointing": float(labels[top].mean())}
