"""Statistics: accuracy estimators, bootstrap intervals, McNemar exact test (against scipy)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stepflow_ext.eval import accuracy, bootstrap_ci, mcnemar_exact, paired_bootstrap

scipy_stats = pytest.importorskip("scipy.stats")


def test_accuracy_pass1_avgk_passk():
    correct = np.array([[1, 1, 0, 0],   # 0.5
                        [0, 0, 0, 0],   # 0
                        [1, 1, 1, 1],   # 1
                        [0, 0, 0, 1]], dtype=bool)  # 0.25
    acc = accuracy(correct)
    assert acc["n_items"] == 4 and acc["samples"] == 4
    assert acc["pass@1"] == pytest.approx((0.5 + 0 + 1 + 0.25) / 4) == acc["avg@K"]
    assert acc["pass@K"] == pytest.approx(0.75)
    lo, hi = acc["ci95"]
    assert 0 <= lo <= acc["pass@1"] <= hi <= 1


def test_accuracy_one_sample_per_item_and_empty():
    acc = accuracy(np.array([True, False, True, True]))
    assert acc["samples"] == 1 and acc["pass@1"] == 0.75 == acc["pass@K"]
    empty = accuracy(np.zeros((0, 3), dtype=bool))
    assert empty["n_items"] == 0 and empty["pass@1"] is None
    with pytest.raises(ValueError, match="booleans"):
        accuracy(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        accuracy(np.zeros((2, 2, 2), dtype=bool))


def test_bootstrap_ci_matches_the_normal_interval_of_a_proportion():
    # 400 items with 60% correct: the bootstrap distribution of the mean ~ N(p, p(1-p)/n).
    values = np.array([1.0] * 240 + [0.0] * 160)
    lo, hi = bootstrap_ci(values, n_boot=20000, seed=1)
    half = 1.959964 * math.sqrt(0.6 * 0.4 / 400)
    assert lo == pytest.approx(0.6 - half, abs=0.006)
    assert hi == pytest.approx(0.6 + half, abs=0.006)


def test_bootstrap_ci_is_seeded_and_level_widens_it():
    values = np.random.default_rng(0).random(50)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    lo90, hi90 = bootstrap_ci(values, level=0.90)
    lo99, hi99 = bootstrap_ci(values, level=0.99)
    assert lo99 < lo90 < values.mean() < hi90 < hi99
    assert bootstrap_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))


def test_bootstrap_ci_coverage_on_known_data():
    # Repeated experiments from Bernoulli(0.3), n=100: the 95% interval should cover 0.3 about 95% of the time.
    rng = np.random.default_rng(123)
    covered = 0
    trials = 200
    for t in range(trials):
        sample = (rng.random(100) < 0.3).astype(float)
        lo, hi = bootstrap_ci(sample, n_boot=2000, seed=t)
        covered += lo <= 0.3 <= hi
    assert 0.88 <= covered / trials <= 0.99


@pytest.mark.parametrize("b01, b10, both_right, both_wrong", [
    (0, 0, 5, 5), (3, 0, 10, 2), (10, 2, 30, 8), (7, 7, 1, 1), (1, 12, 0, 0), (25, 40, 100, 35), (0, 9, 0, 0),
])
def test_mcnemar_exact_matches_scipy_binomtest(b01, b10, both_right, both_wrong):
    a = np.array([False] * b01 + [True] * b10 + [True] * both_right + [False] * both_wrong)
    b = np.array([True] * b01 + [False] * b10 + [True] * both_right + [False] * both_wrong)
    perm = np.random.default_rng(b01 * 100 + b10).permutation(len(a))  # order of items must not matter
    result = mcnemar_exact(a[perm], b[perm])
    assert (result["b01"], result["b10"], result["n_discordant"]) == (b01, b10, b01 + b10)
    expected = 1.0 if b01 + b10 == 0 else scipy_stats.binomtest(b01, b01 + b10, 0.5).pvalue
    assert result["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_mcnemar_known_value():
    # 1 vs 9 discordant: p = 2 * (1 + 10) / 2^10
    a = np.array([False] * 1 + [True] * 9)
    result = mcnemar_exact(a, ~a)
    assert result["p_value"] == pytest.approx(22 / 1024)


def test_paired_bootstrap_difference_interval_and_p_value():
    rng = np.random.default_rng(7)
    n = 300
    a = (rng.random(n) < 0.5).astype(float)
    flips = rng.random(n) < 0.2           # B fixes 20% of items A got wrong, breaks none
    b = np.where(flips, 1.0, a)
    result = paired_bootstrap(a, b, n_boot=5000, seed=0)
    diff = b.mean() - a.mean()
    assert result["diff"] == pytest.approx(diff)
    d = b - a
    half = 1.959964 * d.std(ddof=0) / math.sqrt(n)  # analytic normal interval of a mean difference
    assert result["ci95"][0] == pytest.approx(diff - half, abs=0.01)
    assert result["ci95"][1] == pytest.approx(diff + half, abs=0.01)
    assert result["p_value"] < 0.001 and result["n_items"] == n
    same = paired_bootstrap(a, a.copy())
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0


def test_paired_bootstrap_p_value_is_calibrated_under_the_null():
    # A and B are independent draws with the same accuracy: p < 0.05 should happen about 5% of the time.
    rng = np.random.default_rng(11)
    small = 0
    trials = 150
    for t in range(trials):
        a = (rng.random(120) < 0.5).astype(float)
        b = (rng.random(120) < 0.5).astype(float)
        result = paired_bootstrap(a, b, n_boot=2000, seed=t)
        assert 0 <= result["p_value"] <= 1
        small += result["p_value"] < 0.05
    assert 0.01 <= small / trials <= 0.12  # seeded; not "never significant" either


def test_paired_inputs_are_validated():
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact(np.array([True, False]), np.array([True]))
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="1-D"):
        mcnemar_exact(np.ones((2, 2), dtype=bool), np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="correctness"):
        mcnemar_exact(np.array([0.5, 1.0]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="no items"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap([1.0, float("nan")], [1.0, 0.0])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 0.0], n_boot=0)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
