"""Privacy accounting behind one interface: calibrate sigma, compute epsilon from history.

History entries are Opacus-style triples ``(noise_multiplier, sample_rate, steps)``, each
one DP-SGD phase: ``steps`` Poisson-sampled Gaussian steps at rate ``q`` and noise
multiplier ``sigma`` on a sum of per-example gradients clipped to norm ``C``.

Neighbouring relation. Every figure is for a *relation* between datasets:

* ``replace-one`` (the default): the datasets differ in one substituted example. This is
  the relation fedpeft must use: every client's example count n is public (it is the
  FedAvg weight of its reply, and Opacus's rate q = 1/ceil(n/B) and the step count are
  functions of n), and add/remove neighbours differ in n. Under replace-one the clipped
  sum has sensitivity 2C; the accountant handles that, sigma keeps multiplying C.
* ``add-remove``: one example added or removed (Opacus's PRV and RDP). Kept only to
  account the old ledgers written under it, honestly, as what they were.

Accountants. ``pld`` is Google's dp-accounting ``PLDAccountant(neighboring_relation=...)``
composing ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)`` per merged entry (its
steps done here, with each one-step PLD built once: :func:`pld_epsilon`); its figure is the
pessimistic estimate (an upper bound on the true epsilon). It is the only accountant for
replace-one (Opacus has no replace-one analysis; dp-accounting's RDP does
not support ``PoissonSampledDpEvent`` under replace-one), and it has no fallback: if it
fails the error propagates. Under add-remove ``prv`` (Opacus PRV, with Opacus RDP as a
fallback where PRV cannot evaluate a history) and ``rdp`` remain; the returned name is
always the accountant that produced the figure (``rdp`` after a fallback, never ``prv``).

q = 1 under replace-one (a one-off release, :mod:`fedpeft.privacy.releases`): dp-accounting's
``PoissonSampled(1, Gaussian(sigma))`` under REPLACE_ONE is exactly a Gaussian mechanism of
sensitivity 2, i.e. ``Gaussian(sigma / 2)`` under add-remove (checked in
tests/test_ledger.py): substituting an example moves the clipped sum by up to 2C.
"""

from __future__ import annotations

import dataclasses
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

from fedpeft.privacy.calibration_cache import cached

__all__ = ["ACCOUNTANTS", "DEFAULT_ACCOUNTANT", "DEFAULT_RELATION", "RELATIONS", "Calibration",
           "calibrate_noise", "check_accountant", "epsilon_for", "HistoryEntry", "merge_history",
           "pld_epsilon"]

log = logging.getLogger(__name__)

HistoryEntry = tuple[float, float, int]

RELATIONS = ("replace-one", "add-remove")
DEFAULT_RELATION = "replace-one"
ACCOUNTANTS = ("pld", "prv", "rdp")
DEFAULT_ACCOUNTANT = "pld"
ADD_REMOVE_ONLY = ("prv", "rdp")  # Opacus's accountants: add/remove neighbours only


def check_accountant(accountant: str, relation: str) -> None:
    """ValueError (one line) unless ``accountant`` can account neighbours under ``relation``."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown neighbouring relation {relation!r}; allowed: {', '.join(RELATIONS)}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
    if relation == "replace-one" and accountant in ADD_REMOVE_ONLY:
        raise ValueError(f"accountant {accountant!r} (Opacus) accounts add/remove neighbours only; "
                         f"replace-one needs 'pld' (dp-accounting PLD)")


@dataclass(frozen=True)
class Calibration:
    """Result of calibrating the noise multiplier for a planned run."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    epsilon: float  # epsilon the plan spends (with its prior), by ``accountant``
    accountant: str
    relation: str = DEFAULT_RELATION


def merge_history(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Entries with the same (sigma, q) merged into one with the summed steps.

    Composition is commutative and k steps then m steps of one mechanism are k + m steps of
    it, so epsilon is unchanged; but the PLD and PRV accountants' cost grows with the number of
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


def _opacus(name: str, history: Sequence[HistoryEntry]) -> PRVAccountant | RDPAccountant:
    acc = GridPRVAccountant() if name == "prv" else RDPAccountant()
    acc.history = merge_history(history)
    return acc


def pld_epsilon(history: Sequence[HistoryEntry], delta: float, relation: str = DEFAULT_RELATION,
                value_discretization_interval: float = 1e-4) -> float:
    """Epsilon by dp-accounting's PLD accounting (pessimistic estimate: an upper bound).

    The computation ``PLDAccountant(neighboring_relation=...)`` does for one
    ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)`` per merged entry, step by step
    and bit for bit (the tests compare the two): start from the identity PLD, compose each
    entry's one-step PLD self-composed ``steps`` times, read epsilon at ``delta``; a never
    sampled entry (q = 0) is skipped and a noiseless one (sigma = 0) makes epsilon infinite,
    as the accountant does. The one-step PLD comes from :func:`_step_pld`, built once per
    process: discretising the privacy loss is ~85 % of a figure's cost (0.9 s of ~1 s on a
    CPU), and every round's budget check of a plan asks for the same step again.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    if relation not in RELATIONS:
        raise ValueError(f"unknown neighbouring relation {relation!r}; allowed: {', '.join(RELATIONS)}")
    steps = merge_history(history)
    if not steps:
        return 0.0
    pld = pld_lib.identity(value_discretization_interval=value_discretization_interval)
    for sigma, q, n in steps:
        if q == 0:
            continue
        if sigma == 0:
            return math.inf
        pld = pld.compose(_step_pld(sigma, q, relation, value_discretization_interval).self_compose(n))
    return float(pld.get_epsilon_for_delta(delta))


def _build_step_pld(sigma: float, q: float, relation: str, interval: float) -> Any:
    """One DP-SGD step's PLD, ``PoissonSampled(q, Gaussian(sigma))``, as ``PLDAccountant`` builds it."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from dp_accounting.privacy_accountant import NeighboringRelation

    rel = NeighboringRelation.REPLACE_ONE if relation == "replace-one" else NeighboringRelation.ADD_OR_REMOVE_ONE
    return pld_lib.from_gaussian_mechanism(standard_deviation=sigma, value_discretization_interval=interval,
                                           sampling_prob=q, neighboring_relation=rel)


# A PLD object is immutable (compose and self_compose return new ones). ~3 MB each at the
# default grid; a worker's clients share a few plans, and the sigma search's trial values
# fall out first.
_step_pld = lru_cache(maxsize=8)(_build_step_pld)


def epsilon_for(history: Sequence[HistoryEntry], delta: float, accountant: str = DEFAULT_ACCOUNTANT,
                relation: str = DEFAULT_RELATION) -> tuple[float, str]:
    """(epsilon, accountant that produced it) for a DP-SGD history; 0 for an empty history.

    ``pld`` raises if it fails (no fallback). ``prv`` (add-remove only) falls back to Opacus
    RDP (looser, never tighter) if it fails numerically, and then returns ``"rdp"``.
    Results are memoised per process on the merged history: a client asks for the same
    figure twice a round (the budget check before training, the ledger entry after it).
    """
    check_accountant(accountant, relation)
    steps = tuple((float(s), float(q), int(n)) for s, q, n in merge_history(history))
    if not steps:
        return 0.0, accountant
    return _epsilon_of(steps, float(delta), accountant, relation)


@lru_cache(maxsize=256)
def _epsilon_of(steps: tuple[HistoryEntry, ...], delta: float, accountant: str, relation: str) -> tuple[float, str]:
    """Memoised per process and on disk (:mod:`fedpeft.privacy.calibration_cache`): a PLD figure
    costs ~1 s of CPU from scratch (~0.2 s once its step is built, :func:`pld_epsilon`), and
    every simulation worker asks for the same ones (its clients share the plan), as does every
    round's budget check."""
    args = {"epsilon_of": [list(s) for s in steps], "delta": delta, "accountant": accountant, "relation": relation}
    out = cached(args, lambda: dict(zip(("epsilon", "accountant"), _epsilon_uncached(steps, delta, accountant,
                                                                                     relation), strict=True)),
                 kind="epsilon")
    return float(out["epsilon"]), str(out["accountant"])


def _epsilon_uncached(steps: tuple[HistoryEntry, ...], delta: float, accountant: str,
                      relation: str) -> tuple[float, str]:
    """:func:`_epsilon_of` without its caches."""
    if accountant == "pld":
        return pld_epsilon(steps, delta, relation), "pld"
    if accountant == "prv":
        try:
            with warnings.catch_warnings(), np.errstate(divide="ignore"):
                if any(q >= 1.0 for _, q, _ in steps):  # Opacus's PRV takes log(1 - q): harmless at q = 1
                    warnings.simplefilter("ignore", RuntimeWarning)
                eps = float(_opacus("prv", steps).get_epsilon(delta=delta))
            if math.isfinite(eps) and eps >= 0:
                return eps, "prv"
            log.warning("PRV accountant gave epsilon=%s; falling back to RDP", eps)
        except (ValueError, RuntimeError, OverflowError) as exc:
            log.warning("PRV accountant failed (%s); falling back to RDP", exc)
    return float(_opacus("rdp", steps).get_epsilon(delta=delta)), "rdp"


@lru_cache(maxsize=256)  # pure and slow (seconds with PLD/PRV): a worker serving many clients calibrates each plan once
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = DEFAULT_ACCOUNTANT,
    prior: tuple[HistoryEntry, ...] = (), relation: str = DEFAULT_RELATION,
) -> Calibration:
    """Smallest noise multiplier whose planned ``steps`` at ``sample_rate`` stay within epsilon.

    ``prior`` is history already spent before the plan (a one-off release,
    :mod:`fedpeft.privacy.releases`, or the rounds a ledger recorded before a re-plan), composed in
    and counted in ``epsilon``. The result is re-checked with :func:`epsilon_for` (the
    figure clients will later report); if accountant noise puts it above the target, sigma
    is raised by 0.5 % steps until it is not. Under add-remove a failing PRV calibration
    falls back to RDP and the Calibration names ``rdp``; ``pld`` never falls back. Cached per
    process and on disk (:mod:`fedpeft.privacy.calibration_cache`): once per distinct plan.
    """
    check_accountant(accountant, relation)
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    args = {"target_epsilon": float(target_epsilon), "delta": float(delta), "sample_rate": float(sample_rate),
            "steps": int(steps), "accountant": accountant, "prior": [list(p) for p in prior], "relation": relation}
    return Calibration(**cached(args, lambda: dataclasses.asdict(
        _calibrate(target_epsilon, delta, sample_rate, steps, accountant, prior, relation))))


def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
               prior: tuple[HistoryEntry, ...], relation: str) -> Calibration:
    """:func:`calibrate_noise` without its caches."""
    used = accountant
    try:
        sigma = _search_sigma(target_epsilon, delta, sample_rate, steps, accountant, prior, relation)
    except (ValueError, RuntimeError, OverflowError) as exc:
        if accountant != "prv":
            raise
        log.warning("PRV calibration failed (%s); calibrating with RDP", exc)
        used = "rdp"
        sigma = _search_sigma(target_epsilon, delta, sample_rate, steps, "rdp", prior, relation)
    for _ in range(200):
        eps, used_now = epsilon_for([*prior, (sigma, sample_rate, steps)], delta, used, relation)
        if eps <= target_epsilon:
            return Calibration(sigma, sample_rate, steps, eps, used_now, relation)
        sigma *= 1.005
    raise RuntimeError(f"could not calibrate sigma for epsilon={target_epsilon}")


EPSILON_TOLERANCE = 0.005  # a calibrated epsilon lies in [target - this, target]


def _search_sigma(target: float, delta: float, q: float, steps: int, accountant: str,
                  prior: tuple[HistoryEntry, ...] = (), relation: str = DEFAULT_RELATION) -> float:
    """Smallest sigma (to ``EPSILON_TOLERANCE`` in epsilon) whose epsilon is at most ``target``.

    Opacus's ``get_noise_multiplier`` bisects from [0, 10]: ~15 accountant evaluations (PLD:
    ~0.5-1 s each on a CPU, PRV ~0.25-0.5 s, and every fresh worker calibrates once, so this sat in every
    simulation's first round). log(epsilon) is nearly linear in log(sigma), so here the
    bracket grows by doubling from sigma = 1 and Illinois regula falsi on (log sigma,
    log epsilon) closes it: typically 4-7 evaluations. Same accountant, same tolerance,
    same guarantee (the returned sigma's epsilon is <= target).
    """

    def gap(sigma: float) -> float:  # log(epsilon / target): > 0 too little noise, <= 0 enough
        eps, _ = epsilon_for([*prior, (sigma, q, steps)], delta, accountant, relation)
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
    gap_hi = g_hi  # the gap at hi itself: g_hi is also the secant's weight, which Illinois halves
    for _ in range(100):
        if target * (1 - math.exp(gap_hi)) <= EPSILON_TOLERANCE or hi / lo - 1 < 1e-9:
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
            gap_hi = g
            if side == 1:
                g_lo /= 2
            side = 1
    return hi
