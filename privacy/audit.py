"""``fedpeft privacy audit RUN_DIR``: recompute every client's epsilon independently.

A run directory holds each client's privacy ledger (``ledger/client-*.json``: every
round's noise multiplier, sample rate and step count) and the epsilon the run reported
(``metrics.jsonl``: ``epsilon_per_client`` of the last round; the ledger's own
``epsilon_after``). The audit recomputes the epsilon of every ledger's whole history with
four accountants from two independent code bases:

* Opacus PRV and Opacus RDP (the library the clients used);
* Google's ``dp-accounting`` PLD and RDP (an independent implementation), each history
  entry composed as ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)``.

It fails (non-zero exit in the CLI) when a reported figure is more than ``tolerance``
(default 2 %) away from the independent reference: the PLD figure for ledgers accounted
with PRV (both are near-exact, within ~0.6 % here); for ledgers accounted with RDP the
dp-accounting RDP figure (RDP is ~15 % looser than PLD by design), and an RDP report must
in addition never be below PLD. Every epsilon is example-level, per client, at the ledger's delta.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.accounting import HistoryEntry, epsilon_for
from privacy.ledger import Ledger

__all__ = ["AuditRow", "AuditResult", "audit_run", "dp_accounting_epsilon"]

DEFAULT_TOLERANCE = 0.02


def dp_accounting_epsilon(history: Sequence[HistoryEntry], delta: float, method: str) -> float:
    """Epsilon of a DP-SGD history by Google's dp-accounting (``method``: ``pld`` or ``rdp``)."""
    from dp_accounting import dp_event, pld, rdp

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
        if method == "pld":
            acc: Any = pld.PLDAccountant()
        elif method == "rdp":
            acc = rdp.RdpAccountant()
        else:
            raise ValueError(f"unknown dp-accounting method {method!r}; allowed: pld, rdp")
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
    accountant: str  # the accountant the client reported with
    delta: float
    steps: int
    rounds: int
    reported_metrics: float  # metrics.jsonl, last row's epsilon_per_client (nan if absent)
    reported_ledger: float  # the ledger's last epsilon_after
    opacus_prv: float
    opacus_rdp: float
    dpa_pld: float
    dpa_rdp: float
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
        head = (f"{'client':>8} {'acct':>5} {'delta':>8} {'steps':>6} {'reported':>9} {'ledger':>9} "
                f"{'opacus PRV':>11} {'opacus RDP':>11} {'dpa PLD':>9} {'dpa RDP':>9}  verdict")
        lines = [f"privacy audit of {self.run_dir} (example-level epsilon per client; tolerance "
                 f"{self.tolerance:.1%} against the independent dp-accounting figure)", head]
        for r in self.rows:
            verdict = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
            lines.append(f"{r.client:>8} {r.accountant:>5} {r.delta:>8.1e} {r.steps:>6} {r.reported_metrics:>9.4f} "
                         f"{r.reported_ledger:>9.4f} {r.opacus_prv:>11.4f} {r.opacus_rdp:>11.4f} {r.dpa_pld:>9.4f} "
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


def _audit_ledger(ledger: Ledger, reported: float | None, tolerance: float) -> AuditRow:
    hist = ledger.history
    prv, prv_used = epsilon_for(hist, ledger.delta, "prv")
    rdp_opacus, _ = epsilon_for(hist, ledger.delta, "rdp")
    pld = dp_accounting_epsilon(hist, ledger.delta, "pld")
    rdp_dpa = dp_accounting_epsilon(hist, ledger.delta, "rdp")
    led_eps = ledger.entries[-1].epsilon_after if ledger.entries else 0.0
    row = AuditRow(ledger.client, ledger.accountant, ledger.delta, ledger.total_steps, len(ledger.entries),
                   math.nan if reported is None else reported, led_eps,
                   prv if prv_used == "prv" else math.nan, rdp_opacus, pld, rdp_dpa,
                   "dpa PLD" if ledger.accountant == "prv" else "dpa RDP")
    ref = pld if ledger.accountant == "prv" else rdp_dpa
    for name, value in (("metrics.jsonl", reported), ("ledger epsilon_after", led_eps)):
        if value is None:
            row.problems.append(f"client missing from {name}")
            continue
        if _rel(value, ref) > tolerance:
            row.problems.append(f"{name} epsilon {value:.4f} differs from {row.reference} {ref:.4f} by "
                                f"{_rel(value, ref):.1%} > {tolerance:.0%}")
        if value < pld * (1 - tolerance):
            row.problems.append(f"{name} epsilon {value:.4f} is below the PLD figure {pld:.4f} (under-reported)")
    if ledger.entries and any(e.noise_multiplier <= 0 or not 0 < e.sample_rate <= 1 for e in ledger.entries):
        row.problems.append("ledger has an entry with sigma <= 0 or a sample rate outside (0, 1]")
    rounds = [e.round for e in ledger.entries]
    if rounds != sorted(set(rounds)):
        row.problems.append(f"ledger rounds are not strictly increasing: {rounds}")
    return row


def audit_run(run_dir: Path | str, tolerance: float = DEFAULT_TOLERANCE) -> AuditResult:
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
        result.rows.append(_audit_ledger(ledger, reported.get(ledger.client), tolerance))
    extra = sorted(set(reported) - seen)
    if extra:
        result.problems.append(f"metrics.jsonl reports epsilon for clients without a ledger: {', '.join(extra)}")
    return result
