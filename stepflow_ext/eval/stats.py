"""Accuracy with bootstrap intervals, and paired comparisons of two runs on the same items.

Conventions
  correct: bool array (items, K): K samples per item.
  pass@1  = mean over items of c_i / K (c_i correct samples of item i): the unbiased estimator of the chance
            that one sample is correct. avg@K is the same number under the name used in papers that average
            K samples; both keys are reported.
  pass@K  = fraction of items with at least one correct sample.
  ci95    = percentile bootstrap over items (items resampled with replacement, the K samples of an item stay
            together) of pass@1.
Paired tests compare per-item scores of run A and run B on the same items, in the same order.
  mcnemar_exact: two-sided exact binomial test on the discordant items (b01: A wrong, B right;
            b10: A right, B wrong): p = min(1, 2 * P[X <= min(b01, b10)]), X ~ Binomial(b01 + b10, 1/2).
  paired_bootstrap: resample items, recompute mean(b) - mean(a). ci95 is the percentile interval; p_value
            is the two-sided bootstrap p-value 2 * min(P*[diff* <= 0], P*[diff* >= 0]) (capped at 1), i.e. how
            often the resampled difference lands on the other side of zero. It is approximate: reported with
            the interval, not instead of it.
"""
from __future__ import annotations

import math

import numpy as np


def _bool_matrix(correct, name: str = "correct") -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape (items, samples), got {arr.shape}")
    if arr.size and arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name}: expected booleans (or 0/1)")
        arr = arr.astype(bool)
    return arr.astype(bool)


def accuracy(correct, *, n_boot: int = 10000, seed: int = 0) -> dict:
    """pass@1 / avg@K / pass@K with a 95% bootstrap interval of pass@1. correct: bool (items, K) or (items,)."""
    arr = _bool_matrix(correct)
    n_items, k = arr.shape
    if n_items == 0 or k == 0:
        return {"n_items": n_items, "samples": k, "pass@1": None, "avg@K": None, "pass@K": None,
                "ci95": [None, None]}
    per_item = arr.mean(axis=1)
    lo, hi = bootstrap_ci(per_item, n_boot=n_boot, seed=seed)
    mean = float(per_item.mean())
    return {"n_items": int(n_items), "samples": int(k), "pass@1": mean, "avg@K": mean,
            "pass@K": float(arr.any(axis=1).mean()), "ci95": [lo, hi]}


def _check_boot(n_boot: int, level: float = 0.95) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot: expected a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")


def _resample_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // max(n, 1)))  # bounded memory for large item counts
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def bootstrap_ci(values, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item `values` (items resampled with replacement)."""
    _check_boot(n_boot, level)
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"values: expected one value per item (1-D), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("values: empty")
    if not np.isfinite(arr).all():
        raise ValueError("values: contains NaN or infinity")
    means = _resample_means(arr, n_boot, seed)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"a, b: expected one value per item (1-D), got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"a, b: paired runs need the same items; got {a.shape[0]} and {b.shape[0]} values")
    if a.size == 0:
        raise ValueError("a, b: no items")
    return a, b


def mcnemar_exact(a, b) -> dict:
    """Exact McNemar test of paired per-item correctness (bool, items). Two-sided."""
    a, b = _paired(a, b)
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("a, b: McNemar needs per-item correctness (booleans or 0/1)")
    a, b = a.astype(bool), b.astype(bool)
    b01 = int(np.sum(~a & b))  # A wrong, B right
    b10 = int(np.sum(a & ~b))  # A right, B wrong
    n = b01 + b10
    if n == 0:
        p = 1.0
    else:
        tail = sum(math.comb(n, i) for i in range(min(b01, b10) + 1)) / 2 ** n  # exact: integers, then one division
        p = min(1.0, 2 * tail)
    return {"b01": b01, "b10": b10, "n_discordant": n, "p_value": float(p)}


def paired_bootstrap(a, b, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Bootstrap of mean(b) - mean(a) over items (per-item scores, e.g. c_i / K); see the module docstring."""
    _check_boot(n_boot, level)
    a, b = _paired(a, b)
    a, b = a.astype(float), b.astype(float)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a, b: contain NaN or infinity")
    diff = b - a
    boots = _resample_means(diff, n_boot, seed)
    alpha = (1 - level) / 2
    p = min(1.0, 2 * min(float(np.mean(boots <= 0)), float(np.mean(boots >= 0))))
    return {"diff": float(diff.mean()), "ci95": [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))],
            "p_value": p, "n_items": int(diff.size)}
