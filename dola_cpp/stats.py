"""Intervals and paired tests for evaluation metrics: how sure a score, or a difference between
two decoders on the same items, is.

- :func:`bootstrap_ci`: the percentile bootstrap over items (seeded; 10,000 resamples by default)
  of a metric that is the mean of per-item values (MC1, MC2, MC3, FACTOR accuracy).
- :func:`paired_bootstrap`: the difference of two runs' means over the same items, its interval
  from resampling the items (both runs together), and a two-sided p-value.
- :func:`mcnemar`: McNemar's exact test for two accuracies on the same items (only the items where
  the runs disagree count).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

N_RESAMPLES = 10_000
LEVEL = 0.95
FEW_ITEMS = 20  # fewer items than this: the interval is wide, and bootstrap intervals too narrow
_CHUNK = 1_000  # resamples drawn at a time (memory: _CHUNK * n_items indices)


class FewItemsWarning(UserWarning):
    """An interval over fewer than FEW_ITEMS items."""


@dataclass(frozen=True)
class Interval:
    """A metric's value over the items and its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float = LEVEL
    n: int = 0

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level, "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class PairedDifference:
    """``b - a`` over the same items: the difference of means, its paired interval, the test's
    p-value (two-sided) and which test gave it."""

    diff: Interval
    p_value: float
    test: str

    @property
    def distinguishable(self) -> bool:
        """Whether the test rejects "no difference" at the interval's level (p < 1 - level). For
        accuracies that is McNemar's exact test, which can keep a difference whose bootstrap
        interval leaves out zero: with few items on which the runs disagree, that interval is too
        narrow."""
        return self.p_value < 1.0 - self.diff.level

    def as_dict(self) -> dict:
        return {**self.diff.as_dict(), "p_value": self.p_value, "test": self.test,
                "distinguishable": self.distinguishable}


def _values(values: Sequence[float], what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what}: need a non-empty sequence of per-item values, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: per-item values must be finite (a NaN or inf item has no mean)")
    return a


def few_items_message(n: int) -> str:
    """What :class:`FewItemsWarning` says for ``n`` items."""
    return (f"an interval over {n} items (< {FEW_ITEMS}) is wide and the bootstrap's too narrow; "
            "use more items to compare settings")


def warn_few_items(n: int, stacklevel: int = 3) -> None:
    """Issue :class:`FewItemsWarning` for an interval over ``n`` items (whatever ``n``)."""
    warnings.warn(few_items_message(n), FewItemsWarning, stacklevel=stacklevel)


def _check_args(n: int, n_resamples: int, level: float, warn: bool) -> None:
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if warn and n < FEW_ITEMS:
        warn_few_items(n, stacklevel=4)


def resample_means(values: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """The means of ``n_resamples`` bootstrap resamples of the rows of ``values`` ([n] or [n, k]:
    the k columns are resampled together, item by item), [n_resamples] or [n_resamples, k]. The
    resamples are ``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))`` drawn
    ``_CHUNK`` rows at a time."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    out = []
    for start in range(0, n_resamples, _CHUNK):
        idx = rng.integers(0, n, size=(min(_CHUNK, n_resamples - start), n))
        out.append(values[idx].mean(axis=1))
    return np.concatenate(out)


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], n_resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = 0,
                 warn: bool = True) -> Interval:
    """The mean of per-item ``values`` and its percentile-bootstrap interval."""
    a = _values(values, "bootstrap_ci")
    _check_args(a.size, n_resamples, level, warn)
    lo, hi = _percentiles(resample_means(a, n_resamples, seed), level)
    return Interval(float(a.mean()), lo, hi, level, int(a.size))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                     seed: int = 0, warn: bool = True) -> PairedDifference:
    """``mean(b) - mean(a)`` over the same items, with the interval of the resampled differences
    and the two-sided p-value ``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` over the resamples (the
    share of resamples on the other side of zero, doubled)."""
    x, y = _values(a, "paired_bootstrap (a)"), _values(b, "paired_bootstrap (b)")
    if x.size != y.size:
        raise ValueError(f"paired_bootstrap: the runs have {x.size} and {y.size} items; a paired comparison "
                         "needs the same items in both")
    _check_args(x.size, n_resamples, level, warn)
    d = y - x
    means = resample_means(d, n_resamples, seed)
    lo, hi = _percentiles(means, level)
    if np.all(d == 0):
        p = 1.0
    else:
        p = min(1.0, 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return PairedDifference(Interval(float(d.mean()), lo, hi, level, int(d.size)), p, "paired bootstrap")


def mcnemar_p(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value for ``b`` items only the first run got right and ``c``
    only the second did: ``min(1, 2 * P(X <= min(b, c)))``, X ~ Binomial(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # in log space: n may be in the thousands
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def mcnemar(a_correct: Sequence[float], b_correct: Sequence[float], n_resamples: int = N_RESAMPLES,
            level: float = LEVEL, seed: int = 0, warn: bool = True) -> PairedDifference:
    """The difference of two accuracies over the same items (``b - a``), its paired bootstrap
    interval, and McNemar's exact p-value. Items are right (1) or wrong (0)."""
    x, y = _values(a_correct, "mcnemar (a)"), _values(b_correct, "mcnemar (b)")
    for arr, name in ((x, "a"), (y, "b")):
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"mcnemar ({name}): items must be right (1) or wrong (0)")
    boot = paired_bootstrap(x, y, n_resamples, level, seed, warn)
    only_a = int(np.sum((x == 1) & (y == 0)))
    only_b = int(np.sum((x == 0) & (y == 1)))
    return PairedDifference(boot.diff, mcnemar_p(only_a, only_b), "McNemar exact")


def compare(a: Sequence[float], b: Sequence[float], binary: Optional[bool] = None, **kw) -> PairedDifference:
    """McNemar for right/wrong items (``binary``: None = when every value is 0 or 1), else the paired
    bootstrap."""
    if binary is None:
        binary = all(v in (0, 1) for v in list(a) + list(b))
    return mcnemar(a, b, **kw) if binary else paired_bootstrap(a, b, **kw)
