"""``fedpeft privacy audit RUN_DIR``: recompute every client's epsilon independently.

A run directory holds each client's privacy ledger (``ledger/client-*.json``: every
round's noise multiplier, sample rate and step count) and the epsilon the run reported
(``metrics.jsonl``: ``epsilon_per_client`` of the last round; the ledger's own
``epsilon_after``). The audit recomputes every ledger's whole history and holds both
reported figures to an independent reference, under the ledger's neighbouring relation:

* ``replace-one`` ledgers (fedpeft's relation: a client's example count is public): Google's
  dp-accounting privacy loss distributions built directly (not through the clients'
  ``PLDAccountant`` path) at a finer value discretisation (``FINE_DISCRETIZATION``), once
  pessimistic (an upper bound on the true epsilon) and once optimistic (a lower bound).
  A figure is rejected when it is below the lower bound (under-reported: no tolerance) or
  more than ``tolerance`` above the upper bound (wastefully over-reported).
* old ``add-remove`` ledgers: the four-accountant comparison -- Opacus PRV and RDP (the
  library those clients used), dp-accounting PLD and RDP -- against the dp-accounting PLD
  figure (PRV ledgers) or the dp-accounting RDP figure (RDP ledgers), within
  ``tolerance``; and, as for replace-one, never below the optimistic PLD lower bound.

Every epsilon is example-level, per client, at the ledger's delta. Rounds must be
non-decreasing; a round recorded twice (a retried or replayed round with other inputs or
output) is legitimate new spending and accepted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedpeft.privacy.accounting import HistoryEntry, epsilon_for, merge_history
from fedpeft.privacy.ledger import Ledger

__all__ = ["AuditRow", "AuditResult", "audit_run", "dp_accounting_epsilon", "pld_bounds"]

DEFAULT_TOLERANCE = 0.02
# The clients' accountant uses dp-accounting's default grid, 1e-4. Half of it is fine enough:
# the lower and upper bounds it gives differ by ~1e-5 relative on fedpeft's histories, while
# 1e-5 costs ~5x more (~15 s per bound and client on a loaded 2-core CPU, mostly building the PLD).
FINE_DISCRETIZATION = 5e-5


def pld_bounds(history: Sequence[HistoryEntry], delta: float, relation: str,
               value_discretization_interval: float = FINE_DISCRETIZATION) -> tuple[float, float]:
    """(lower, upper) bounds on the true epsilon of a DP-SGD history by dp-accounting PLDs.

    Each merged entry is ``from_gaussian_mechanism(sigma, sampling_prob=q,
    neighboring_relation=...)`` self-composed ``steps`` times, all composed; built once with
    ``pessimistic_estimate=False`` (rounding and truncation in the mechanism's favour: a
    lower bound) and once with ``True`` (an upper bound). Memoised per process.
    """
    steps = tuple((float(s), float(q), int(n)) for s, q, n in merge_history(history))
    if not steps:
        return 0.0, 0.0
    return _pld_bounds(steps, float(delta), relation, float(value_discretization_interval))


@lru_cache(maxsize=64)
def _pld_bounds(steps: tuple[HistoryEntry, ...], delta: float, relation: str,
                value_discretization_interval: float) -> tuple[float, float]:
    from dp_accounting.pld import privacy_loss_distribution as pld
    from dp_accounting.privacy_accountant import NeighboringRelation

    rel = NeighboringRelation.REPLACE_ONE if relation == "replace-one" else NeighboringRelation.ADD_OR_REMOVE_ONE
    out = []
    for pessimistic in (False, True):
        total = None
        for s, q, n in steps:
            one = pld.from_gaussian_mechanism(s, pessimistic_estimate=pessimistic, sampling_prob=q,
                                              value_discretization_interval=value_discretization_interval,
                                              neighboring_relation=rel, use_connect_dots=pessimistic).self_compose(n)
            total = one if total is None else total.compose(one)
        assert total is not None
        out.append(float(total.get_epsilon_for_delta(delta)))
    return out[0], out[1]


def dp_accounting_epsilon(history: Sequence[HistoryEntry], delta: float, method: str,
                          relation: str = "add-remove") -> float:
    """Epsilon of a DP-SGD history by Google's dp-accounting accountants (``method``: ``pld``
    or ``rdp``; ``rdp`` supports only add-remove for Poisson-sampled Gaussians)."""
    from dp_accounting import dp_event, pld, rdp
    from dp_accounting.privacy_accountant import NeighboringRelation

    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
              for s, q, n in steps]
    event = dp_event.ComposedDpEvent(events)
    absl = logging.getLogger("absl")  # RDP warns for every fractional order it drops
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        rel = NeighboringRelation.REPLACE_ONE if relation == "replace-one" else NeighboringRelation.ADD_OR_REMOVE_ONE
        if method == "pld":
            acc: Any = pld.PLDAccountant(neighboring_relation=rel)
        elif method == "rdp" and relation == "add-remove":
            acc = rdp.RdpAccountant()
        else:
            raise ValueError(f"unknown dp-accounting method {method!r} under {relation}; allowed: pld, rdp "
                             f"(add-remove only)")
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def _rel(a: float, b: float) -> float:
    """Relative difference of ``a`` from reference ``b`` (0 when both are 0)."""
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


@dataclass
class AuditRow:
    """One client's recomputed figures next to what the run reported."""

    client: str
    accountant: str  # the accountant the client reported with (of its last entry, else the ledger's)
    relation: str  # the ledger's neighbouring relation
    delta: float
    steps: int
    rounds: int
    reported_metrics: float  # metrics.jsonl, last row's epsilon_per_client (nan if absent)
    reported_ledger: float  # the ledger's last epsilon_after
    opacus_prv: float
    opacus_rdp: float
    dpa_pld: float
    dpa_rdp: float
    pld_lower: float  # dp-accounting PLD, optimistic, fine grid: the true epsilon is >= this
    pld_upper: float  # dp-accounting PLD, pessimistic, fine grid: the true epsilon is <= this
    reference: str  # which independent figure the reported ones are held to
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class AuditResult:
    """All clients of one run directory."""

    run_dir: Path
    tolerance: float
    rows: list[AuditRow]
    problems: list[str] = field(default_factory=list)  # run-level (missing files, ...)

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.rows)

    def table(self) -> str:
        """Side-by-side table (example-level epsilon per client, at each ledger's delta)."""
        head = (f"{'client':>8} {'relation':>11} {'acct':>5} {'delta':>8} {'steps':>6} {'reported':>9} "
                f"{'ledger':>9} {'PLD lower':>10} {'PLD upper':>10} {'opacus PRV':>11} {'opacus RDP':>11} "
                f"{'dpa PLD':>9} {'dpa RDP':>9}  verdict")
        lines = [f"privacy audit of {self.run_dir} (unit: example-level epsilon per client, at each ledger's "
                 f"delta, relation and accountant; never below the PLD lower bound, at most {self.tolerance:.1%} "
                 f"above the reference)", head]
        for r in self.rows:
            verdict = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
            lines.append(f"{r.client:>8} {r.relation:>11} {r.accountant:>5} {r.delta:>8.1e} {r.steps:>6} "
                         f"{r.reported_metrics:>9.4f} {r.reported_ledger:>9.4f} {r.pld_lower:>10.4f} "
                         f"{r.pld_upper:>10.4f} {r.opacus_prv:>11.4f} {r.opacus_rdp:>11.4f} {r.dpa_pld:>9.4f} "
                         f"{r.dpa_rdp:>9.4f}  {verdict}")
        lines.extend(f"FAIL: {p}" for p in self.problems)
        lines.append("audit: " + ("PASSED" if self.ok else "FAILED"))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"run_dir": str(self.run_dir), "tolerance": self.tolerance, "ok": self.ok,
                "problems": self.problems, "clients": [asdict(r) | {"ok": r.ok} for r in self.rows]}


def _last_reported(run_dir: Path) -> tuple[dict[str, float], list[str]]:
    """The last metrics row's per-client epsilon (the figure users were shown)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}, [f"{path} is missing"]
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not rows:
        return {}, [f"{path} has no rows"]
    per_client = rows[-1].get("epsilon_per_client", {}) or {}
    return {str(k): float(v) for k, v in per_client.items()}, []


def _audit_ledger(ledger: Ledger, reported: float | None, tolerance: float, grid: float) -> AuditRow:
    hist, delta, relation = ledger.history, ledger.delta, ledger.relation
    lower, upper = pld_bounds(hist, delta, relation, grid)
    used = next((e.accountant for e in reversed(ledger.entries) if e.accountant), ledger.accountant)
    led_eps = ledger.entries[-1].epsilon_after if ledger.entries else 0.0
    row = AuditRow(ledger.client, used, relation, delta, ledger.total_steps, len(ledger.entries),
                   math.nan if reported is None else reported, led_eps, math.nan, math.nan, math.nan, math.nan,
                   lower, upper, "PLD upper (fine grid)")
    if relation == "add-remove":  # an old ledger: the four-accountant comparison as it was made
        prv, prv_used = epsilon_for(hist, delta, "prv", relation)
        row.opacus_prv = prv if prv_used == "prv" else math.nan
        row.opacus_rdp = epsilon_for(hist, delta, "rdp", relation)[0]
        row.dpa_pld = dp_accounting_epsilon(hist, delta, "pld")
        row.dpa_rdp = dp_accounting_epsilon(hist, delta, "rdp")
        ref = row.dpa_rdp if used == "rdp" else row.dpa_pld
        row.reference = "dpa RDP" if used == "rdp" else "dpa PLD"
    else:
        row.dpa_pld = dp_accounting_epsilon(hist, delta, "pld", relation)
        ref = upper
        if used != "pld":
            row.problems.append(f"accountant {used!r} cannot account replace-one neighbours (only pld)")
    for name, value in (("metrics.jsonl", reported), ("ledger epsilon_after", led_eps)):
        if value is None:
            row.problems.append(f"client missing from {name}")
            continue
        if not value >= lower:  # no tolerance below the lower bound (nan fails too)
            row.problems.append(f"{name} epsilon {value:.4f} is below the PLD lower bound {lower:.4f} "
                                f"(under-reported)")
        elif relation == "add-remove" and _rel(value, ref) > tolerance:
            row.problems.append(f"{name} epsilon {value:.4f} differs from {row.reference} {ref:.4f} by "
                                f"{_rel(value, ref):.1%} > {tolerance:.0%}")
        elif relation != "add-remove" and value > ref * (1 + tolerance):
            row.problems.append(f"{name} epsilon {value:.4f} is above the PLD upper bound {ref:.4f} by "
                                f"{_rel(value, ref):.1%} > {tolerance:.0%} (differs: over-reported)")
    if ledger.entries and any(e.noise_multiplier <= 0 or not 0 < e.sample_rate <= 1 for e in ledger.entries):
        row.problems.append("ledger has an entry with sigma <= 0 or a sample rate outside (0, 1]")
    rounds = [e.round for e in ledger.entries]
    if rounds != sorted(rounds):
        row.problems.append(f"ledger rounds are not non-decreasing: {rounds}")
    return row


def audit_run(run_dir: Path | str, tolerance: float = DEFAULT_TOLERANCE,
              value_discretization_interval: float = FINE_DISCRETIZATION) -> AuditResult:
    """Recompute and compare every client's epsilon of the run in ``run_dir``."""
    path = Path(run_dir)
    result = AuditResult(path, tolerance, [])
    if not path.is_dir():
        result.problems.append(f"{path} is not a directory")
        return result
    reported, problems = _last_reported(path)
    result.problems.extend(problems)
    files = sorted((path / "ledger").glob("client-*.json"))
    if not files:
        result.problems.append(f"no ledgers in {path / 'ledger'} (a run without DP has nothing to audit)")
        return result
    seen = set()
    for f in files:
        try:
            ledger = Ledger.from_json(f.read_text(encoding="utf-8"))
        except (ValueError, TypeError, KeyError) as exc:
            result.problems.append(f"{f.name} is not a valid ledger ({exc})")
            continue
        seen.add(ledger.client)
        result.rows.append(_audit_ledger(ledger, reported.get(ledger.client), tolerance,
                                         value_discretization_interval))
    extra = sorted(set(reported) - seen)
    if extra:
        result.problems.append(f"metrics.jsonl reports epsilon for clients without a ledger: {', '.join(extra)}")
    return result
