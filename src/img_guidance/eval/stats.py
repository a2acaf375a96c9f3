"""Paired statistics for two systems judged on the same images (the same prompts and seeds).

- :func:`mcnemar_exact`: is one system right more often than the other? McNemar's exact test, from
  the images on which exactly one of the two is right;
- :func:`paired_bootstrap`: a 95% percentile interval of the accuracy difference, resampling images
  (or whole groups of them, e.g. all seeds of one prompt: a cluster bootstrap);
- :func:`compare_paired`: both, with the accuracies, as a :class:`PairedComparison`;
- :func:`bootstrap_mean_interval`: a 95% percentile interval of a mean (of per-prompt wins, or of
  score differences), resampling its values.

numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

# Up to this many discordant pairs the binomial tail is an exact integer sum (a few ms at this size);
# beyond it, a sum in log space.
_EXACT_MAX_N = 20_000
# Elements of one resamples x units index matrix (int64: 32 MiB), so memory stays flat for any n.
_CHUNK_ELEMENTS = 1 << 22


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` (only system A right) and
    ``c`` (only system B right): the binomial test of ``b`` out of ``n = b + c`` with p = 1/2,
    ``min(1, 2 * P(X <= min(b, c)))``; 1.0 when ``n == 0``. Exact for any ``n``: an integer sum
    up to 20,000 discordant pairs, a log-space sum beyond."""
    try:
        b, c = operator.index(b), operator.index(c)
    except TypeError as err:
        raise TypeError(f"mcnemar_exact expects integer counts, got b={b!r}, c={c!r}") from err
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact expects non-negative counts, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = _binomial_half_tail_exact(k, n) if n <= _EXACT_MAX_N else _binomial_half_tail_log(k, n)
    return min(1.0, 2.0 * tail)


def _binomial_half_tail_exact(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), as sum_{i<=k} C(n, i) / 2**n in integers."""
    term = total = 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i) -> C(n, i + 1), exact
        total += term
    return total / (1 << n)  # int / int is correctly rounded, however large both are


def _binomial_half_tail_log(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (logsumexp of log C(n, i) - n log 2)."""
    log_terms = np.array(
        [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]
    )
    peak = log_terms.max()
    return float(math.exp(peak + math.log(np.exp(log_terms - peak).sum()) - n * math.log(2.0)))


def paired_bootstrap(
    a: Sequence[bool],
    b: Sequence[bool],
    *,
    resamples: int = 10000,
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> tuple[float, float]:
    """The 95% percentile interval of ``mean(a) - mean(b)``, resampling the pairs ``(a[i], b[i])``
    with replacement; with ``groups`` (one key per pair), whole groups are resampled instead (a
    cluster bootstrap: e.g. all seeds of one prompt together, whose outcomes are not independent).
    Deterministic in ``seed``."""
    difference = _paired_differences(a, b, none_is_false=False)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    # Resampling units: single pairs, or groups carrying the sum of their differences and their size.
    if groups is None:
        sums, sizes = difference, np.ones_like(difference)
    else:
        if len(groups) != len(difference):
            raise ValueError(f"groups has {len(groups)} keys but there are {len(difference)} pairs")
        codes: dict[Hashable, int] = {}
        unit = np.array([codes.setdefault(key, len(codes)) for key in groups])
        sums = np.bincount(unit, weights=difference, minlength=len(codes))
        sizes = np.bincount(unit, minlength=len(codes)).astype(np.float64)
    rng = np.random.default_rng(seed)
    units = len(sums)
    rows = max(1, _CHUNK_ELEMENTS // units)
    estimates = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        picks = rng.integers(0, units, size=(stop - start, units))  # [rows, units] unit indices
        estimates[start:stop] = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    low, high = np.quantile(estimates, [0.025, 0.975])
    return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """System A against system B on the same ``n`` images.

    ``difference`` is ``accuracy_a - accuracy_b`` and ``ci95`` its paired-bootstrap interval;
    ``only_a`` / ``only_b`` count the images that only A / only B gets right (McNemar's b and c);
    ``p_value`` is McNemar's exact test and ``significant`` means ``p_value < 0.05``.
    """

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci95: tuple[float, float]
    only_a: int
    only_b: int
    p_value: float
    significant: bool

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``ci95`` a list)."""
        return {**dataclasses.asdict(self), "ci95": list(self.ci95)}


def compare_paired(
    a: Sequence[bool | None],
    b: Sequence[bool | None],
    *,
    groups: Sequence[Hashable] | None = None,
    resamples: int = 10000,
    seed: int = 0,
) -> PairedComparison:
    """Compare two systems' verdicts on the same images (``a[i]`` and ``b[i]`` judge the same prompt
    and seed); None (the judge could not decide) counts as not correct, as in accuracy. ``groups``,
    ``resamples`` and ``seed`` go to :func:`paired_bootstrap`."""
    # 1. Check inputs, None -> False
    x = _outcomes(a, "a", none_is_false=True)
    y = _outcomes(b, "b", none_is_false=True)
    _check_paired(x, y)
    # 2. Accuracies and discordant pairs
    only_a = int(np.count_nonzero(x & ~y))
    only_b = int(np.count_nonzero(~x & y))
    accuracy_a, accuracy_b = float(x.mean()), float(y.mean())
    # 3. Test and interval
    p_value = mcnemar_exact(only_a, only_b)
    ci95 = paired_bootstrap(x, y, resamples=resamples, seed=seed, groups=groups)
    return PairedComparison(
        n=len(x),
        accuracy_a=accuracy_a,
        accuracy_b=accuracy_b,
        difference=(only_a - only_b) / len(x),  # = accuracy_a - accuracy_b, without rounding error
        ci95=ci95,
        only_a=only_a,
        only_b=only_b,
        p_value=p_value,
        significant=p_value < 0.05,
    )


def _outcomes(values: Sequence[Any], name: str, *, none_is_false: bool) -> np.ndarray:
    """``values`` as a bool array; True / False / 1 / 0 (and None when ``none_is_false``) only."""
    out = np.empty(len(values), dtype=bool)
    for i, value in enumerate(values):
        if value is None and none_is_false:
            out[i] = False
        elif value is not None and not isinstance(value, str) and value in (0, 1):
            out[i] = bool(value)
        else:
            hint = " (compare_paired counts None as not correct)" if value is None else ""
            raise ValueError(f"{name}[{i}] is {value!r}, not a True/False outcome{hint}")
    return out


def _check_paired(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(
            f"a has {len(x)} outcomes but b has {len(y)}: a paired comparison needs both systems' "
            "verdicts on the same images"
        )
    if len(x) == 0:
        raise ValueError("a and b are empty: there is nothing to compare")


def _paired_differences(a: Sequence[Any], b: Sequence[Any], *, none_is_false: bool) -> np.ndarray:
    """``a[i] - b[i]`` as floats in {-1, 0, 1}, after checking both."""
    x = _outcomes(a, "a", none_is_false=none_is_false)
    y = _outcomes(b, "b", none_is_false=none_is_false)
    _check_paired(x, y)
    return x.astype(np.float64) - y.astype(np.float64)


def bootstrap_mean_interval(
    values: Sequence[float], *, resamples: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """The 95% percentile interval of ``mean(values)``, resampling the values with replacement
    (deterministic in ``seed``); (nan, nan) for no values."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if x.size == 0:
        return (math.nan, math.nan)
    if not np.isfinite(x).all():
        raise ValueError("values must be finite")
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // x.size)
    means = []
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        means.append(x[rng.integers(0, x.size, size=(count, x.size))].mean(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return (float(low), float(high))
