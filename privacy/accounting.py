"""Privacy accounting behind one interface: calibrate sigma, compute epsilon from history.

History entries are Opacus-style triples ``(noise_multiplier, sample_rate, steps)``. The
figures come from Opacus's accountants (PRV by default, RDP as fallback where PRV cannot
evaluate a history, e.g. extreme sample rates), never from an estimate. Every function
returns which accountant produced the number so that it can be printed alongside it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import Domain

__all__ = ["Calibration", "calibrate_noise", "epsilon_for", "HistoryEntry", "merge_history"]

log = logging.getLogger(__name__)

HistoryEntry = tuple[float, float, int]


@dataclass(frozen=True)
class Calibration:
    """Result of calibrating the noise multiplier for a planned run."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    epsilon: float  # epsilon the plan spends, by ``accountant``
    accountant: str


def merge_history(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Entries with the same (sigma, q) merged into one with the summed steps.

    Composition is commutative and k steps then m steps of one mechanism are k + m steps of
    it, so epsilon is unchanged; but the PRV accountant's cost grows with the number of
    entries (one per round in a ledger: ~1.5 s each on a CPU), which made a long run's
    rounds slower and slower. Merged, a run with a fixed sigma costs one entry forever.
    """
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if n > 0:
            key = (float(s), float(q))
            merged[key] = merged.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in merged.items()]


class GridPRVAccountant(PRVAccountant):
    """Opacus's PRV accountant on a grid of power-of-two size and power-of-two mesh.

    Why: the stock accountant sizes its grid from the history (mesh ~ 1/sqrt(steps), range
    from the safe domain size), so a ledger that grows by a round each time asks for an FFT of
    a new length every round; SciPy keeps the plans of its last 16 FFT lengths (large ones:
    Bluestein plans of ~10^5-10^6 points), which made every long-running worker's memory
    climb round after round. Here the mesh is rounded *down* to a power of two and the
    point count *up* to a power of two, so a whole run uses a handful of lengths (and fast
    radix-2 FFTs).

    Same guarantee: a finer mesh only lowers the discretisation error and a wider domain
    only lowers the truncation error (Gopi et al., NeurIPS 2021, the bounds Opacus uses),
    and ``get_epsilon`` still returns the upper bound estimate + ``eps_error``. Only the
    private ``_get_domain`` of Opacus 1.6 is overridden; the rest is Opacus's code.
    """

    def _get_domain(self, prvs: list[Any], num_self_compositions: list[int], eps_error: float,
                    delta_error: float) -> Domain:
        stock = super()._get_domain(prvs=prvs, num_self_compositions=num_self_compositions,
                                    eps_error=eps_error, delta_error=delta_error)
        mesh = 2.0 ** math.floor(math.log2(stock.dt))
        half = max(abs(stock.t_min), abs(stock.t_max)) + mesh
        size = 2 ** math.ceil(math.log2(2 * half / mesh + 2))
        return Domain.create_aligned(-(size / 2 - 1) * mesh, (size / 2 - 1) * mesh, mesh)


def _accountant(name: str, history: Sequence[HistoryEntry]) -> PRVAccountant | RDPAccountant:
    acc = GridPRVAccountant() if name == "prv" else RDPAccountant()
    acc.history = merge_history(history)
    return acc


def epsilon_for(history: Sequence[HistoryEntry], delta: float, accountant: str = "prv") -> tuple[float, str]:
    """(epsilon, accountant used) for a DP-SGD history; 0 for an empty history.

    PRV is tried first when asked for; if it fails numerically, RDP (looser, never
    tighter) answers and the returned name says so. Results are memoised per process on
    the merged history: a client asks for the same figure twice a round (the budget check
    before training, the ledger entry after it).
    """
    steps = tuple((float(s), float(q), int(n)) for s, q, n in merge_history(history))
    if not steps:
        return 0.0, accountant
    return _epsilon_of(steps, float(delta), accountant)


@lru_cache(maxsize=256)
def _epsilon_of(steps: tuple[HistoryEntry, ...], delta: float, accountant: str) -> tuple[float, str]:
    if accountant == "prv":
        try:
            with warnings.catch_warnings(), np.errstate(divide="ignore"):
                if any(q >= 1.0 for _, q, _ in steps):  # Opacus's PRV takes log(1 - q): harmless at q = 1
                    warnings.simplefilter("ignore", RuntimeWarning)
                eps = float(_accountant("prv", steps).get_epsilon(delta=delta))
            if math.isfinite(eps) and eps >= 0:
                return eps, "prv"
        except (ValueError, RuntimeError, OverflowError) as exc:
            log.warning("PRV accountant failed (%s); falling back to RDP", exc)
    return float(_accountant("rdp", steps).get_epsilon(delta=delta)), "rdp"


@lru_cache(maxsize=256)  # pure and slow (1-10 s with PRV): a worker serving many clients calibrates each plan once
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
    prior: tuple[HistoryEntry, ...] = (),
) -> Calibration:
    """Smallest noise multiplier whose planned ``steps`` at ``sample_rate`` stay within epsilon.

    Calibrated once for the whole run; ``prior`` is history already spent before it (e.g. a
    one-off release, :mod:`privacy.releases`), composed in and counted in ``epsilon``. The
    result is re-checked with :func:`epsilon_for` (the figure clients will later report); if
    accountant noise puts it above the target, sigma is raised by 0.5 % steps until it is not.
    """
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    used = accountant
    try:
        sigma = _search_sigma(target_epsilon, delta, sample_rate, steps, accountant, prior)
    except (ValueError, RuntimeError, OverflowError) as exc:
        if accountant != "prv":
            raise
        log.warning("PRV calibration failed (%s); calibrating with RDP", exc)
        used = "rdp"
        sigma = _search_sigma(target_epsilon, delta, sample_rate, steps, "rdp", prior)
    for _ in range(200):
        eps, used_now = epsilon_for([*prior, (sigma, sample_rate, steps)], delta, used)
        if eps <= target_epsilon:
            return Calibration(sigma, sample_rate, steps, eps, used_now)
        sigma *= 1.005
    raise RuntimeError(f"could not calibrate sigma for epsilon={target_epsilon}")


EPSILON_TOLERANCE = 0.005  # a calibrated epsilon lies in [target - this, target]


def _search_sigma(target: float, delta: float, q: float, steps: int, accountant: str,
                  prior: tuple[HistoryEntry, ...] = ()) -> float:
    """Smallest sigma (to ``EPSILON_TOLERANCE`` in epsilon) whose epsilon is at most ``target``.

    Opacus's ``get_noise_multiplier`` bisects from [0, 10]: ~15 accountant evaluations (PRV:
    ~0.25-0.5 s each on a CPU, and every fresh worker calibrates once, so this sat in every
    simulation's first round). log(epsilon) is nearly linear in log(sigma), so here the
    bracket grows by doubling from sigma = 1 and Illinois regula falsi on (log sigma,
    log epsilon) closes it: typically 4-7 evaluations. Same accountant, same tolerance,
    same guarantee (the returned sigma's epsilon is <= target).
    """

    def gap(sigma: float) -> float:  # log(epsilon / target): > 0 too little noise, <= 0 enough
        eps, _ = epsilon_for([*prior, (sigma, q, steps)], delta, accountant)
        return math.log(max(eps, 1e-300) / target) if math.isfinite(eps) else math.inf

    lo, g_lo = 1.0, gap(1.0)
    hi, g_hi = lo, g_lo
    for _ in range(40):  # grow the bracket until [lo, hi] has g(lo) > 0 >= g(hi)
        if g_hi > 0:
            lo, g_lo = hi, g_hi
            hi *= 2
            g_hi = gap(hi)
        elif g_lo <= 0:
            hi, g_hi = lo, g_lo
            lo /= 2
            g_lo = gap(lo)
        else:
            break
    else:
        raise RuntimeError(f"sigma calibration found no bracket for epsilon={target} (q={q}, steps={steps})")
    side = 0
    for _ in range(100):
        if target * (1 - math.exp(g_hi)) <= EPSILON_TOLERANCE or hi / lo - 1 < 1e-9:
            return hi
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = 0.5 * (x_lo + x_hi)
        if math.isfinite(g_lo):  # false position, kept 1 % inside the bracket
            x = x_hi - g_hi * (x_hi - x_lo) / (g_hi - g_lo)
            x = min(max(x, x_lo + 0.01 * (x_hi - x_lo)), x_hi - 0.01 * (x_hi - x_lo))
        mid = math.exp(x)
        g = gap(mid)
        if g > 0:
            lo, g_lo = mid, g
            if side == -1:  # Illinois: the end kept twice in a row has its weight halved
                g_hi /= 2
            side = -1
        else:
            hi, g_hi = mid, g
            if side == 1:
                g_lo /= 2
            side = 1
    return hi
