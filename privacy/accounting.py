"""Privacy accounting behind one interface: calibrate sigma, compute epsilon from history.

History entries are Opacus-style triples ``(noise_multiplier, sample_rate, steps)``. The
figures come from Opacus's accountants (PRV by default, RDP as fallback where PRV cannot
evaluate a history, e.g. extreme sample rates), never from an estimate. Every function
returns which accountant produced the number so that it can be printed alongside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

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


def _accountant(name: str, history: Sequence[HistoryEntry]) -> PRVAccountant | RDPAccountant:
    acc = PRVAccountant() if name == "prv" else RDPAccountant()
    acc.history = merge_history(history)
    return acc


def epsilon_for(history: Sequence[HistoryEntry], delta: float, accountant: str = "prv") -> tuple[float, str]:
    """(epsilon, accountant used) for a DP-SGD history; 0 for an empty history.

    PRV is tried first when asked for; if it fails numerically, RDP (looser, never
    tighter) answers and the returned name says so.
    """
    steps = [h for h in history if h[2] > 0]
    if not steps:
        return 0.0, accountant
    if accountant == "prv":
        try:
            eps = float(_accountant("prv", steps).get_epsilon(delta=delta))
            if math.isfinite(eps) and eps >= 0:
                return eps, "prv"
        except (ValueError, RuntimeError, OverflowError) as exc:
            log.warning("PRV accountant failed (%s); falling back to RDP", exc)
    return float(_accountant("rdp", steps).get_epsilon(delta=delta)), "rdp"


@lru_cache(maxsize=256)  # pure and slow (1-10 s with PRV): a worker serving many clients calibrates each plan once
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> Calibration:
    """Smallest noise multiplier whose planned ``steps`` at ``sample_rate`` stay within epsilon.

    Calibrated once for the whole run. The result is re-checked with :func:`epsilon_for`
    (the figure clients will later report); if accountant noise puts it above the target,
    sigma is raised by 0.5 % steps until it is not.
    """
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    used = accountant
    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant, epsilon_tolerance=0.005,
            )
        )
    except (ValueError, RuntimeError, OverflowError) as exc:
        if accountant != "prv":
            raise
        log.warning("PRV calibration failed (%s); calibrating with RDP", exc)
        used = "rdp"
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant="rdp", epsilon_tolerance=0.005,
            )
        )
    for _ in range(200):
        eps, used_now = epsilon_for([(sigma, sample_rate, steps)], delta, used)
        if eps <= target_epsilon:
            return Calibration(sigma, sample_rate, steps, eps, used_now)
        sigma *= 1.005
    raise RuntimeError(f"could not calibrate sigma for epsilon={target_epsilon}")
