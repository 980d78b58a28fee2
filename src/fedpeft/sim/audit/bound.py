"""The one-run audit's statistics: guesses -> an empirical lower bound on epsilon.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023).
``m`` canaries are each included independently with probability 1/2 (S_i in {in, out}).
From the trained output the auditor guesses "in" for its ``k_pos`` highest-scoring canaries
and "out" for its ``k_neg`` lowest, abstaining on the rest (``r = k_pos + k_neg`` guesses);
``v`` of them are correct. If the mechanism is (epsilon, delta)-DP with respect to each
canary, then (their Theorem 5.2, Algorithm in Appendix D)

    P[V >= v] <= P[Binomial(r, p) >= v] + 2 m delta * max_{1<=i<=v} P[v-i <= Binomial(r, p) < v] / i,

with ``p = e^eps / (1 + e^eps)`` (the accuracy of eps-randomised response). The audit's
lower bound is the largest epsilon that this p-value still rejects at level beta: the
mechanism is not (epsilon, delta)-DP for any smaller epsilon, with confidence 1 - beta.

Choosing (k_pos, k_neg) after looking at the scores would void the guarantee, so the
guesses are tried on a fixed grid fixed in advance and the level is split across it
(Bonferroni: each grid point is tested at beta / len(grid)); the reported bound is the
largest over the grid, which holds at 1 - beta overall.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

__all__ = ["DEFAULT_GRID", "Guesses", "epsilon_lower_bound", "guess_from_scores", "p_value"]

# (fraction of m guessed "in" from the top, fraction guessed "out" from the bottom)
DEFAULT_GRID: tuple[tuple[float, float], ...] = (
    (0.01, 0.0), (0.02, 0.0), (0.05, 0.0), (0.1, 0.0), (0.2, 0.0), (0.4, 0.0),
    (0.05, 0.05), (0.1, 0.1), (0.2, 0.2), (0.5, 0.5),
)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of >= ``v`` correct out of ``r`` guesses on ``m`` canaries under (epsilon, delta)-DP.

    Theorem 5.2 of Steinke et al. (2023): the pure-epsilon binomial tail plus the delta term
    ``2 m delta alpha``, ``alpha = max_i P[v - i <= Binomial(r, p) < v] / i``.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v} r={r} m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Largest epsilon at which ``v`` correct of ``r`` guesses still has p-value < ``beta``.

    0 when even epsilon = 0 is not rejected. Bisection (the p-value rises with epsilon) to
    1e-6 relative: the result is rounded down, so it stays a lower bound.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf  # never happens for finite r (the tail tends to 1)
    while hi - lo > 1e-6 * max(hi, 1e-3):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Guesses:
    """The best grid point of a one-run audit."""

    epsilon: float  # lower bound at confidence 1 - beta (over the whole grid)
    k_pos: int
    k_neg: int
    correct: int
    beta: float
    grid_size: int
    canaries: int

    @property
    def guesses(self) -> int:
        return self.k_pos + self.k_neg


def guess_from_scores(scores: np.ndarray, included: np.ndarray, delta: float, beta: float = 0.05,
                      grid: Sequence[tuple[float, float]] = DEFAULT_GRID) -> Guesses:
    """Guess "in" for the top scores and "out" for the bottom ones; the largest Bonferroni bound.

    ``scores``: higher means "more likely in". ``included``: the true membership bits.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != scores.shape or m == 0:
        raise ValueError("scores and included must be non-empty and of one length")
    order = np.argsort(-scores, kind="stable")  # best "in" candidates first
    ranked = included[order]
    points = sorted({(max(1, round(fp * m)), round(fn * m)) for fp, fn in grid})
    points = [(kp, kn) for kp, kn in points if kp + kn <= m]
    level = beta / len(points)
    best = Guesses(0.0, 0, 0, 0, beta, len(points), m)
    for kp, kn in points:
        correct = int(ranked[:kp].sum()) + (int((~ranked[m - kn:]).sum()) if kn else 0)
        eps = epsilon_lower_bound(m, kp + kn, correct, delta, level)
        if eps > best.epsilon:
            best = Guesses(eps, kp, kn, correct, beta, len(points), m)
    if best.guesses == 0:  # nothing rejected: report the first grid point's counts
        kp, kn = points[0]
        correct = int(ranked[:kp].sum()) + (int((~ranked[m - kn:]).sum()) if kn else 0)
        best = Guesses(0.0, kp, kn, correct, beta, len(points), m)
    return best
