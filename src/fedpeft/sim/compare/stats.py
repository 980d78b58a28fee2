"""Paired significance tests of a compare sweep: each method against a reference, per epsilon.

Two methods run with the same seed share the data split, the clients' partitions and the
seeded randomness, so their final metrics are *paired* by seed; the test is on the per-seed
differences ``d_i = method_i - reference_i``:

* **exact sign-flip permutation test** (two-sided, dependency-free): under the null the sign
  of every ``d_i`` is a fair coin, so p is the share of the ``2**n`` sign patterns whose mean
  is at least as far from 0 as the observed mean. Its smallest possible p is ``2 / 2**n``:
  0.25 with 3 seeds, 0.0625 with 5, 0.031 with 6 -- with few seeds it cannot reject anything;
* **paired t-test** (scipy's Student t, ``n - 1`` degrees of freedom): more power with few
  seeds, but it assumes roughly normal differences, which 3 seeds cannot check.

Neither is corrected for the number of comparisons (methods x epsilons); a p above 0.05 is
not evidence that the methods are equal, only that these seeds cannot tell them apart.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["EXACT_MAX_PAIRS", "min_sign_flip_p", "paired_rows", "paired_t_p", "sign_flip_p"]

EXACT_MAX_PAIRS = 16  # 65,536 sign patterns; above this a fixed-seed Monte Carlo of 100,000


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the exact sign-flip permutation test of mean(diffs) = 0 (nan if empty)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan
    observed = abs(d.mean())
    if d.size <= EXACT_MAX_PAIRS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        signs = np.random.default_rng(0).choice((1.0, -1.0), size=(100_000, d.size))
    means = np.abs(signs @ d) / d.size
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def min_sign_flip_p(n: int) -> float:
    """The smallest p the exact sign-flip test can give with ``n`` pairs."""
    return min(1.0, 2.0 / 2**n) if n > 0 else math.nan


def paired_t_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the paired t-test of mean(diffs) = 0 (nan with fewer than 2 pairs;
    identical differences: 1 if they are all 0, else 0)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d.mean() == 0 else 0.0
    t = d.mean() / (sd / math.sqrt(d.size))
    return float(2 * stats.t.sf(abs(t), df=d.size - 1))


def paired_rows(results: Sequence[dict[str, Any]], metric: str, reference: str,
                higher_is_better: bool = True) -> list[dict[str, Any]]:
    """One row per (epsilon, method other than ``reference``): the seeds both finished, the
    mean and std of the paired difference (method - reference, in the metric's own
    direction), both p-values and the smallest p the sign-flip test could give."""
    by: dict[tuple[str, float], dict[int, float]] = {}
    for r in results:
        by.setdefault((r["method"], r["epsilon_target"]), {})[int(r["seed"])] = float(r[f"final_{metric}"])
    rows = []
    epsilons = sorted({e for _, e in by}, reverse=True)
    methods = sorted({m for m, _ in by if m != reference})
    for eps in epsilons:
        ref = by.get((reference, eps), {})
        for method in methods:
            mine = by.get((method, eps), {})
            seeds = sorted(set(ref) & set(mine))
            if not seeds:
                continue
            d = [mine[s] - ref[s] for s in seeds]
            better = float(np.mean(d)) * (1 if higher_is_better else -1)
            rows.append({"epsilon_target": eps, "method": method, "reference": reference, "pairs": len(seeds),
                         "diff_mean": float(np.mean(d)), "diff_std": float(np.std(d, ddof=1)) if len(d) > 1 else math.nan,
                         "p_t": paired_t_p(d), "p_sign_flip": sign_flip_p(d), "p_sign_flip_min": min_sign_flip_p(len(d)),
                         "better": method if better > 0 else (reference if better < 0 else "tie")})
    return rows
