"""Statistics of the benchmark's per-example numbers: bootstrap intervals, paired tests, Wilson intervals.

Plain numpy, seeded (the same inputs and seed give the same numbers), no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

#: Random draws per bootstrap chunk (bounds the memory of a resample of many examples).
_CHUNK_DRAWS = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval.

    Attributes:
        mean: the sample mean (or proportion, for :func:`wilson_interval`).
        low, high: the interval's ends.
        n: the number of examples.
        confidence: the interval's level.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedResult:
    """The mean per-example difference ``a - b`` of two paired samples.

    Attributes:
        difference: ``mean(a - b)``.
        low, high: its bootstrap percentile interval.
        p_value: two-sided bootstrap p-value of ``difference != 0`` (:func:`paired_bootstrap`).
        n: the number of pairs.
        confidence: the interval's level.
    """

    difference: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sample(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """``values`` as a non-empty 1-D float64 array of finite numbers."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one number per example), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(x).any():
        raise ValueError(f"{name} holds NaN values (an example without a result?): drop or fix them first")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds infinite values")
    return x


def _check(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def bootstrap_means(values: np.ndarray, *, resamples: int, seed: int) -> np.ndarray:
    """``[resamples]`` means of ``values`` ``[n]`` resampled with replacement (seeded).

    A constant sample gives ``resamples`` copies of its value exactly.
    """
    values = _sample(values, "values")
    n = values.size
    if np.all(values == values[0]):
        return np.full(resamples, values[0])
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, _CHUNK_DRAWS // n)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        means[start:start + size] = values[rng.integers(0, n, size=(size, n))].mean(axis=1)
    return means


def _percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mean_ci(values: Sequence[float] | np.ndarray, *, confidence: float = 0.95, resamples: int = 10_000,
            seed: int = 0) -> Interval:
    """The mean of ``values`` ``[n]`` with its bootstrap percentile interval.

    Raises ValueError on an empty sample or NaN values. A constant sample gets the degenerate
    interval ``[v, v]``.
    """
    _check(confidence, resamples)
    x = _sample(values, "values")
    low, high = _percentiles(bootstrap_means(x, resamples=resamples, seed=seed), confidence)
    mean = float(x[0]) if np.all(x == x[0]) else float(x.mean())
    return Interval(mean=mean, low=low, high=high, n=int(x.size), confidence=confidence)


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, confidence: float = 0.95,
                     resamples: int = 10_000, seed: int = 0) -> PairedResult:
    """Paired comparison of ``a`` and ``b`` ``[n]`` (one number per example in each, same examples).

    The per-example differences ``d = a - b`` are resampled; their bootstrap means ``d*`` give the
    percentile interval. The two-sided p-value is a sign-flip permutation test of "no difference"
    (each ``d_i`` keeps or flips its sign at random; ``p = (1 + #{|mean(s d)| >= |mean(d)|}) / (1 + R)``),
    exact over all ``2^n`` sign patterns when ``n <= 16``: unlike the bootstrap's own tail, it stays
    honest for a handful of examples (two examples can never give p below 0.5).
    """
    _check(confidence, resamples)
    a, b = _sample(a, "a"), _sample(b, "b")
    if a.size != b.size:
        raise ValueError(f"paired_bootstrap compares paired samples (one value per example in each): got {a.size} "
                         f"values in a and {b.size} in b")
    d = a - b
    means = bootstrap_means(d, resamples=resamples, seed=seed)
    low, high = _percentiles(means, confidence)
    difference = float(d[0]) if np.all(d == d[0]) else float(d.mean())
    return PairedResult(difference=difference, low=low, high=high, p_value=sign_flip_p_value(d, resamples, seed),
                        n=int(d.size), confidence=confidence)


def sign_flip_p_value(d: np.ndarray, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of ``mean(d) = 0`` by flipping the signs of the paired differences ``d [n]``:
    exact (every pattern, the observed one included) for ``n <= 16``, else ``resamples`` random
    patterns with the +1 correction. 1.0 when every difference is 0."""
    observed = abs(float(d.mean()))
    if observed == 0.0:
        return 1.0
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if d.size <= 16:
        patterns = ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1) * 2 - 1     # [2^n, n]
        means = np.abs(patterns @ d) / d.size
        return float(np.mean(means >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 1000):
        signs = rng.choice((-1.0, 1.0), size=(min(1000, resamples - start), d.size))
        hits += int(np.sum(np.abs(signs @ d) / d.size >= observed - tolerance))
    return (1 + hits) / (1 + resamples)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The proportion ``successes / n`` with its Wilson score interval (an accuracy's interval).

    With ``z`` the normal quantile at ``1 - (1 - confidence) / 2`` and ``p = successes / n``:
    centre ``(p + z^2 / 2n) / (1 + z^2 / n)``, half-width
    ``z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)``; clipped to ``[0, 1]``, and exactly 0
    (1) at the low (high) end when ``successes`` is 0 (``n``), where the formula is 0 (1) up to rounding.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n < 1:
        raise ValueError(f"wilson_interval needs n >= 1 trials, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n] = [0, {n}], got {successes}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(mean=p, low=low, high=high, n=n, confidence=confidence)


def format_interval(interval: Interval | PairedResult, scale: float = 1.0, digits: int = 1) -> str:
    """``"17.3 [16.1, 18.5]"``: the estimate and its interval times ``scale`` (100 for percent)."""
    centre = interval.mean if isinstance(interval, Interval) else interval.difference
    return f"{centre * scale:.{digits}f} [{interval.low * scale:.{digits}f}, {interval.high * scale:.{digits}f}]"
