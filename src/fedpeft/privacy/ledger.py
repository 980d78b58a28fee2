"""Per-client privacy ledger: every DP-SGD step a client ever took, on disk.

Opacus's ``PrivacyEngine`` forgets its history when a new one is made (each round, each
process restart), so the ledger is the source of truth. Each entry records what really
ran -- the noise multiplier and sample rate of the optimizer and loader of that round and
its step count -- and the accountant that produced its ``epsilon_after``. Epsilon is always
recomputed from the whole history by :mod:`fedpeft.privacy.accounting`, under the ledger's
neighbouring relation (``replace-one``: a client's example count is public).

The *plan* (``noise_multiplier``, ``sample_rate``, ``planned_steps``, ``plan_offset``) is
the sigma calibrated for the steps the client still intends to take -- and for the one-off
releases it still intends to make (``reserved``: ``(sigma, 1, 1)`` entries of a release not yet
recorded, e.g. FedSA-LoRA's personalised evaluation in the last round,
:mod:`fedpeft.client.personal_eval`), so that those releases fit the target too. The client calls
:meth:`Ledger.ensure_plan` every round with its current parameters; a changed sample rate,
budget or step plan re-calibrates sigma with the recorded history as prior, so a stale
plan can never make the budget check (or a recorded epsilon) use a q that did not run.
A ledger's delta, accountant and relation are fixed for its life.

Storage: a JSON file written atomically (write to a temporary file, fsync, rename), so a
crash never leaves a half-written ledger; a copy also lives in the Flower
``Context.state`` of the node. On load divergent copies are merged as the union of their
entries, so neither a new round, a restarted client process nor a lost state ever drops
a charged entry. Malformed ledgers are rejected with a one-line ValueError.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpeft.io import atomic_write_text
from fedpeft.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    DEFAULT_RELATION,
    RELATIONS,
    HistoryEntry,
    calibrate_noise,
    check_accountant,
    epsilon_for,
)

__all__ = ["BudgetExceeded", "Ledger", "LedgerConflict", "LedgerEntry", "PlanMismatch"]

log = logging.getLogger("fedpeft.ledger")

OLD_RELATION = "add-remove"  # a ledger written before the relation was recorded was accounted add/remove


class BudgetExceeded(RuntimeError):
    """The next round would take the client past its epsilon budget."""


class PlanMismatch(BudgetExceeded):
    """This run's privacy parameters cannot continue the ledger (fixed delta / accountant /
    relation differ, or the recorded history alone already spends the target)."""


class LedgerConflict(ValueError):
    """Two copies of a ledger (disk, Context.state) belong to different clients or accountings."""


def _valid_mechanism(sigma: Any, q: Any, steps: Any, where: str) -> None:
    """ValueError unless sigma > 0 finite, q in (0, 1] and steps a non-negative integer."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{where}: steps must be a non-negative integer, got {steps!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{where}: noise_multiplier must be a finite number > 0, got {sigma!r}")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise ValueError(f"{where}: sample_rate must be in (0, 1], got {q!r}")


@dataclass
class LedgerEntry:
    """One round (or one release) of DP by one client: what actually ran."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    replay_key: str = ""  # hash of everything the round's update was computed from (see record)
    output_hash: str = ""  # hash of the update the client released
    accountant: str = ""  # the accountant that produced epsilon_after ("" in old ledgers)

    @property
    def key(self) -> tuple[int, str, str]:
        return (self.round, self.replay_key, self.output_hash)


@dataclass
class Ledger:
    """The whole DP history of one client (unit: one training example of that client)."""

    client: str
    target_epsilon: float
    delta: float
    accountant: str = DEFAULT_ACCOUNTANT
    noise_multiplier: float = 0.0  # the plan's sigma (0: no plan yet)
    sample_rate: float = 0.0  # the plan's q
    planned_steps: int = 0  # steps the plan was calibrated for ...
    entries: list[LedgerEntry] = field(default_factory=list)
    relation: str = DEFAULT_RELATION
    plan_offset: int = 0  # ... after this many recorded steps
    # releases the plan also covers, not recorded yet ([sigma, q, steps] each; module doc)
    reserved: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_accountant(self.accountant, self.relation)
        if not 0 < self.delta < 1:
            raise ValueError(f"ledger of client {self.client}: delta must be in (0, 1), got {self.delta!r}")

    # ---- accounting -------------------------------------------------------------------
    @property
    def history(self) -> list[HistoryEntry]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries)

    @property
    def plan_steps_left(self) -> int:
        """Steps the current plan still covers (negative: more was spent than it planned)."""
        return self.planned_steps - (self.total_steps - self.plan_offset)

    def _unit(self) -> str:
        return f"example-level, {self.relation}, delta={self.delta:g}"

    def epsilon(self) -> tuple[float, str]:
        """(epsilon spent so far, accountant) from the whole history."""
        return epsilon_for(self.history, self.delta, self.accountant, self.relation)

    @property
    def reserved_history(self) -> list[HistoryEntry]:
        """The reserved (planned, not yet recorded) releases as history entries."""
        return [(float(s), float(q), int(n)) for s, q, n in self.reserved]

    def epsilon_if(self, steps: int) -> tuple[float, str]:
        """Epsilon the client would have spent after ``steps`` more steps at the plan's sigma and q
        and the reserved releases."""
        extra = [(self.noise_multiplier, self.sample_rate, steps)] if steps > 0 else []
        return epsilon_for(self.history + extra + self.reserved_history, self.delta, self.accountant, self.relation)

    def check_budget(self, steps: int) -> float:
        """Raise BudgetExceeded if ``steps`` more (and the reserved releases) would exceed the
        target; else the new epsilon."""
        if steps > 0 and self.noise_multiplier <= 0:
            raise BudgetExceeded(f"client {self.client}: no privacy plan (call ensure_plan before training)")
        eps, acc = self.epsilon_if(steps)
        if math.isfinite(self.target_epsilon) and eps > self.target_epsilon:
            spent, _ = self.epsilon()
            raise BudgetExceeded(
                f"client {self.client}: next round ({steps} steps) would reach epsilon={eps:.3f} > "
                f"budget {self.target_epsilon:g} ({self._unit()}, {acc}); "
                f"spent so far {spent:.3f} over {self.total_steps} steps"
            )
        return eps

    def ensure_plan(self, *, target_epsilon: float, delta: float, sample_rate: float, planned_steps: int,
                    accountant: str, relation: str = DEFAULT_RELATION,
                    reserved: Sequence[HistoryEntry] = ()) -> str:
        """Make the plan fit this run's parameters; a one-line description of what was done.

        Called every round before training with the run's budget, delta, accountant, the
        sample rate the loader will use and the steps the client still plans (remaining
        rounds x steps per round; for a round that replays a recorded entry, the steps
        after it). A new ledger is calibrated. A plan with the same q and target that still
        covers ``planned_steps`` holds (fewer steps than planned keep it: it is then only
        conservative). Otherwise -- q, target or ``reserved`` (the releases still to come, module
        doc) changed, or more steps than it covers -- sigma is re-calibrated for ``planned_steps``
        with the whole recorded history and the reserved releases as prior. PlanMismatch when
        delta / accountant / relation differ from the ledger's (fixed for its life) or the history alone already reaches the target.
        """
        fixed = (("delta", self.delta, delta), ("accountant", self.accountant, accountant),
                 ("relation", self.relation, relation))
        for name, stored, asked in fixed:
            if stored != asked:
                raise PlanMismatch(f"client {self.client}: ledger {name}={stored!r} is fixed for its life, this run "
                                   f"asks {name}={asked!r}; use a new ledger directory")
        if not 0 < sample_rate <= 1 or planned_steps < 1:
            raise ValueError(f"client {self.client}: plan needs q in (0, 1] and planned steps >= 1, got "
                             f"q={sample_rate!r}, steps={planned_steps!r}")
        if self.noise_multiplier > 0:
            changed = [f"{n} {old:g} -> {new:g}" for n, old, new in (
                ("q", self.sample_rate, sample_rate), ("target epsilon", self.target_epsilon, target_epsilon))
                if old != new]
            if [list(map(float, r)) for r in reserved] != [list(map(float, r)) for r in self.reserved]:
                changed.append(f"reserved releases {len(self.reserved)} -> {len(reserved)}")
            if planned_steps > self.plan_steps_left:
                changed.append(f"planned steps {planned_steps} > {self.plan_steps_left} the plan still covers")
            if not changed:
                return (f"client {self.client}: plan holds (sigma={self.noise_multiplier:.4f}, q={self.sample_rate:.6g},"
                        f" {self.plan_steps_left} steps left)")
            why = "; ".join(changed)
        else:
            why = "new ledger"
        prior = tuple(self.history)
        self.reserved = [[float(s), float(q), int(n)] for s, q, n in reserved]
        if prior:
            spent, acc = self.epsilon()
            if spent >= target_epsilon:
                raise PlanMismatch(f"client {self.client}: recorded history already spends epsilon={spent:.3f} >= "
                                   f"target {target_epsilon:g} ({self._unit()}, {acc}); cannot plan more steps")
        plan = calibrate_noise(target_epsilon, delta, sample_rate, planned_steps, accountant,
                               prior + tuple(self.reserved_history), relation)
        self.target_epsilon, self.noise_multiplier, self.sample_rate = target_epsilon, plan.noise_multiplier, sample_rate
        self.planned_steps, self.plan_offset = planned_steps, self.total_steps
        msg = (f"client {self.client}: sigma={plan.noise_multiplier:.4f} calibrated for {planned_steps} steps at "
               f"q={sample_rate:.6g} after {self.total_steps} recorded ({why}); plan epsilon={plan.epsilon:.3f} "
               f"({self._unit()}, {plan.accountant})")
        log.info("%s", msg)
        return msg

    def replay_of(self, server_round: int, replay_key: str) -> LedgerEntry | None:
        """The recorded entry of ``server_round`` computed from the same inputs, if any."""
        if not replay_key:
            return None
        return next((e for e in self.entries if e.round == server_round and e.replay_key == replay_key), None)

    def record(self, server_round: int, steps: int, replay_key: str = "", output_hash: str = "", *,
               noise_multiplier: float, sample_rate: float) -> float:
        """Append a finished round that ran at ``noise_multiplier`` / ``sample_rate`` (those of
        the optimizer and loader that really ran) and return the epsilon spent in total.

        A round can be re-run (a retry after too few replies, a resume after a server
        crash). If it was computed from the same inputs (``replay_key``: global state,
        local state, seed, configuration) and produced bit-for-bit the same update
        (``output_hash``), releasing it again reveals nothing new: nothing is added and
        the current epsilon is returned. Any other re-run is new privacy spending and is
        appended. Without a ``replay_key`` a round is never recorded twice.
        """
        _valid_mechanism(noise_multiplier, sample_rate, steps, f"ledger of client {self.client}, round {server_round}")
        previous = self.replay_of(server_round, replay_key)
        if previous is not None and output_hash and previous.output_hash == output_hash:
            return self.epsilon()[0]
        if not replay_key and any(e.round == server_round for e in self.entries):
            raise ValueError(f"round {server_round} is already in the ledger of client {self.client}")
        entry = LedgerEntry(server_round, float(noise_multiplier), float(sample_rate), steps, 0.0, replay_key,
                            output_hash)
        self.entries.append(entry)
        entry.epsilon_after, entry.accountant = self.epsilon()
        return entry.epsilon_after

    # ---- persistence ------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        """Parse and validate a ledger; ValueError (one line) if it is malformed.

        A ledger without ``relation`` predates it and was accounted add/remove: it is
        loaded as ``relation="add-remove"`` and keeps being accounted as such.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"ledger is not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError("ledger is not a JSON object")
        _check_keys(raw, cls, ("client", "target_epsilon", "delta", "accountant", "entries"), "ledger")
        raw.setdefault("relation", OLD_RELATION)
        where = f"ledger of client {raw['client']!r}"
        if raw["relation"] not in RELATIONS:
            raise ValueError(f"{where}: unknown relation {raw['relation']!r}; allowed: {', '.join(RELATIONS)}")
        if raw["accountant"] not in ACCOUNTANTS:
            raise ValueError(f"{where}: unknown accountant {raw['accountant']!r}; allowed: {', '.join(ACCOUNTANTS)}")
        delta, target = raw["delta"], raw["target_epsilon"]
        if not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"{where}: delta must be in (0, 1), got {delta!r}")
        if not isinstance(target, (int, float)) or not target > 0:
            raise ValueError(f"{where}: target_epsilon must be > 0, got {target!r}")
        sigma, q = raw.get("noise_multiplier", 0.0), raw.get("sample_rate", 0.0)
        if not (isinstance(sigma, (int, float)) and isinstance(q, (int, float)) and math.isfinite(sigma)
                and sigma >= 0 and 0 <= q <= 1):
            raise ValueError(f"{where}: plan sigma must be finite >= 0 and q in [0, 1], got {sigma!r}, {q!r}")
        for name in ("planned_steps", "plan_offset"):
            value = raw.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {name} must be a non-negative integer, got {value!r}")
        if not isinstance(raw["entries"], list):
            raise ValueError(f"{where}: entries must be a list")
        entries = []
        for i, e in enumerate(raw["entries"]):
            if not isinstance(e, dict):
                raise ValueError(f"{where}: entry {i} is not an object")
            _check_keys(e, LedgerEntry, ("round", "noise_multiplier", "sample_rate", "steps", "epsilon_after"),
                        f"{where}, entry {i}")
            rnd = e["round"]
            if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
                raise ValueError(f"{where}, entry {i}: round must be an integer >= 0, got {rnd!r}")
            _valid_mechanism(e["noise_multiplier"], e["sample_rate"], e["steps"], f"{where}, entry {i}")
            if e.get("accountant", "") not in ("", *ACCOUNTANTS):
                raise ValueError(f"{where}, entry {i}: unknown accountant {e['accountant']!r}")
            eps = e["epsilon_after"]
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
                raise ValueError(f"{where}, entry {i}: epsilon_after must be a number >= 0, got {eps!r}")
            entries.append(LedgerEntry(**e))
        raw["entries"] = entries
        reserved = raw.get("reserved", [])
        if not isinstance(reserved, list) or not all(isinstance(r, list) and len(r) == 3 for r in reserved):
            raise ValueError(f"{where}: reserved must be a list of [sigma, q, steps]")
        for i, (sig, q_r, n_r) in enumerate(reserved):
            _valid_mechanism(sig, q_r, n_r, f"{where}, reserved {i}")
        try:
            return cls(**raw)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load_or_new(cls, path: Path, state_json: str | None, **new_kwargs: Any) -> Ledger:
        """The union of the copies on disk and in the node state; a new ledger if none.

        Entries are keyed by (round, replay_key, output_hash); an entry in either copy is
        kept (a charged entry is never dropped), sorted by round. The plan is taken from
        the copy with the most steps (:meth:`ensure_plan` re-plans if the union spent more).
        LedgerConflict if the copies -- or a copy and ``new_kwargs`` -- name another client,
        or the copies differ in delta, relation or accountant.
        """
        found = []
        if path.is_file():
            found.append(cls.from_json(path.read_text(encoding="utf-8")))
        if state_json:
            found.append(cls.from_json(state_json))
        if not found:
            return cls(**new_kwargs)
        client = new_kwargs.get("client")
        for led in found:
            if client is not None and led.client != client:
                raise LedgerConflict(f"ledger {path} belongs to client {led.client!r}, not {client!r}")
        if len(found) == 1:
            return found[0]
        return _union(found[0], found[1], str(path))


def _check_keys(raw: dict[str, Any], cls: type, required: tuple[str, ...], where: str) -> None:
    names = {f.name for f in fields(cls)}
    missing = [k for k in required if k not in raw]
    unknown = sorted(set(raw) - names)
    if missing or unknown:
        raise ValueError(f"{where}: missing fields {missing}, unknown fields {unknown}")


def _union(a: Ledger, b: Ledger, where: str) -> Ledger:
    """Merge two copies of one client's ledger (see :meth:`Ledger.load_or_new`)."""
    for name in ("client", "delta", "relation", "accountant"):
        if getattr(a, name) != getattr(b, name):
            raise LedgerConflict(f"copies of ledger {where} disagree on {name}: disk {getattr(a, name)!r}, "
                                 f"node state {getattr(b, name)!r}")
    base, other = (a, b) if (a.total_steps, len(a.entries)) >= (b.total_steps, len(b.entries)) else (b, a)
    keys = {e.key for e in base.entries}
    extra = [e for e in other.entries if e.key not in keys]
    if not extra:
        return base
    entries = sorted([*base.entries, *extra], key=lambda e: e.round)  # stable: each copy's order kept
    merged = Ledger(**{**{f.name: getattr(base, f.name) for f in fields(Ledger)}, "entries": entries})
    last = merged.entries[-1]  # its epsilon_after must be the figure of the whole union
    last.epsilon_after, last.accountant = merged.epsilon()
    log.warning("ledger %s: disk and node-state copies diverged; merged %d + %d entries into %d", where,
                len(base.entries), len(extra), len(entries))
    return merged
