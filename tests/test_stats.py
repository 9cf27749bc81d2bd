"""The interval and paired-test code against direct computations on small fixed samples."""

import itertools
import math
import warnings

import numpy as np
import pytest

from dola_cpp import stats

SAMPLE = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1]  # 24 items, 16 right


def test_bootstrap_ci_equals_a_direct_loop_over_the_same_draws():
    vals = np.array([0.2, 0.9, 0.4, 0.4, 0.7, 0.1, 0.8, 0.3, 0.5, 0.6] * 3)
    rng = np.random.default_rng(7)
    means = []
    for _ in range(3):  # the chunks of resample_means, drawn one resample at a time
        block = rng.integers(0, vals.size, size=(1000, vals.size))
        means.extend(float(np.mean([vals[i] for i in row])) for row in block)
    lo, hi = np.quantile(means, [0.025, 0.975])
    ci = stats.bootstrap_ci(vals, n_resamples=3000, seed=7)
    assert ci.value == pytest.approx(vals.mean())
    assert (ci.low, ci.high) == pytest.approx((lo, hi), abs=1e-12)
    assert ci.n == 30


def test_bootstrap_ci_approaches_the_exact_bootstrap_distribution():
    # n = 5: all 5^5 resamples enumerated give the bootstrap distribution of the mean exactly
    vals = np.array([0.0, 1.0, 1.0, 3.0, 5.0])
    exact = np.array([vals[list(idx)].mean() for idx in itertools.product(range(5), repeat=5)])
    lo, hi = np.quantile(exact, [0.025, 0.975])
    with pytest.warns(stats.FewItemsWarning):
        ci = stats.bootstrap_ci(vals, n_resamples=20000, seed=1)
    assert abs(ci.low - lo) <= 0.2 and abs(ci.high - hi) <= 0.2  # the mean moves in steps of 0.2
    assert ci.low < vals.mean() < ci.high


def test_the_interval_is_seeded_and_narrows_with_more_items():
    a = stats.bootstrap_ci(SAMPLE, seed=3)
    assert a == stats.bootstrap_ci(SAMPLE, seed=3)
    x = np.asarray(SAMPLE, dtype=float)
    assert np.array_equal(stats.resample_means(x, 500, seed=3), stats.resample_means(x, 500, seed=3))
    assert not np.array_equal(stats.resample_means(x, 500, seed=3), stats.resample_means(x, 500, seed=4))
    wide = a.high - a.low
    narrow = stats.bootstrap_ci(SAMPLE * 16, seed=3)
    assert narrow.value == pytest.approx(a.value)
    # the standard error falls as 1/sqrt(n): 16 times the items, about a quarter of the width
    assert 0.15 < (narrow.high - narrow.low) / wide < 0.35
    # and the width is what the normal approximation says for a proportion
    p, n = 16 / 24, 24 * 16
    assert narrow.high - narrow.low == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.1)


def test_constant_values_give_a_zero_width_interval_and_p_one():
    ci = stats.bootstrap_ci([0.5] * 30)
    assert (ci.low, ci.value, ci.high) == (0.5, 0.5, 0.5)
    d = stats.paired_bootstrap([0.1] * 30, [0.1] * 30)
    assert d.p_value == 1.0 and not d.distinguishable


@pytest.mark.parametrize("b,c,expected", [
    (1, 5, 2 * (1 + 6) / 64),                     # 2 * P(X <= 1), X ~ Bin(6, 1/2)
    (0, 10, 2 / 1024),
    (4, 4, 1.0),
    (3, 9, 2 * sum(math.comb(12, k) for k in range(4)) / 4096),
    (0, 0, 1.0),
])
def test_mcnemar_p_is_the_exact_binomial_tail(b, c, expected):
    assert stats.mcnemar_p(b, c) == pytest.approx(expected, rel=1e-12)
    assert stats.mcnemar_p(c, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_p_for_thousands_of_discordant_items():
    # large n in log space: no overflow, and a balanced split is not significant
    assert stats.mcnemar_p(2000, 2000) == 1.0
    assert 0 < stats.mcnemar_p(1900, 2100) < 0.01


def test_mcnemar_counts_only_the_items_where_the_runs_disagree():
    a = [1, 1, 1, 0, 0, 1, 0, 1] * 5
    b = [1, 0, 1, 1, 1, 1, 1, 1] * 5  # b gains 15, loses 5
    d = stats.mcnemar(a, b)
    assert d.test == "McNemar exact"
    assert d.diff.value == pytest.approx((sum(b) - sum(a)) / len(a))
    assert d.p_value == pytest.approx(stats.mcnemar_p(5, 15))
    assert d.distinguishable == (d.p_value < 0.05)
    # 0 right of 4 discordant items: the bootstrap interval leaves out zero, McNemar does not reject
    few = stats.mcnemar([0] * 4 + [1] * 36, [1] * 40)
    assert few.diff.low > 0 and few.p_value == pytest.approx(0.125) and not few.distinguishable
    with pytest.raises(ValueError, match="right \\(1\\) or wrong \\(0\\)"):
        stats.mcnemar([0.5] * 30, [1] * 30)


def test_paired_bootstrap_sees_a_consistent_small_gain_that_unpaired_intervals_miss():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    better = base + 0.02 + rng.normal(0, 0.005, 200)  # every item a little better
    ia, ib = stats.bootstrap_ci(base), stats.bootstrap_ci(better)
    assert ia.high > ib.low  # the intervals of each run overlap ...
    d = stats.paired_bootstrap(base, better)
    assert d.distinguishable and d.p_value < 0.001  # ... the paired difference does not include 0
    assert d.diff.value == pytest.approx(float(np.mean(better - base)))
    assert d.diff.low > 0.015 and d.diff.high < 0.025


def test_compare_picks_mcnemar_for_accuracies():
    assert stats.compare(SAMPLE, SAMPLE[::-1]).test == "McNemar exact"
    assert stats.compare([0.5] * 24, SAMPLE).test == "paired bootstrap"


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_ci([])
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_ci([0.1, float("nan")] * 20)
    with pytest.raises(ValueError, match="same items"):
        stats.paired_bootstrap([0.1] * 30, [0.1] * 29)
    with pytest.raises(ValueError, match="n_resamples"):
        stats.bootstrap_ci(SAMPLE, n_resamples=0)
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci(SAMPLE, level=1.0)


def test_fewer_than_20_items_warn_and_20_do_not():
    with pytest.warns(stats.FewItemsWarning, match="19 items"):
        stats.bootstrap_ci(SAMPLE[:19])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats.bootstrap_ci(SAMPLE[:20])


def test_selective_band_at_full_coverage_is_the_accuracys_bootstrap_interval():
    """coverage_bands draws its resamples as resample_means does: at full coverage the band is
    bootstrap_ci of the right/wrong items; at each coverage it holds the curve of the items."""
    from dola_cpp import selective as sel

    risk = [0.3, 0.1, 0.9, 0.5, 0.5, 0.2, 0.7, 0.4, 0.6, 0.8, 0.15, 0.35] * 2
    correct = SAMPLE
    low, high, auc = sel.coverage_bands(correct, risk, 3000, seed=5)
    ci = stats.bootstrap_ci(correct, 3000, seed=5)
    assert (low[-1], high[-1]) == pytest.approx((ci.low, ci.high), abs=1e-12)
    cov, acc = sel.coverage_curve(correct, risk)
    assert auc.value == pytest.approx(sel.area(cov, acc)) and auc.low <= auc.value <= auc.high
    assert np.all(low <= acc + 1e-12) and np.all(acc <= high + 1e-12)
    assert len(low) == len(high) == len(correct)
