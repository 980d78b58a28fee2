"""Per-client privacy ledger: every DP-SGD step a client ever took, on disk.

Opacus's ``PrivacyEngine`` forgets its history when a new one is made (each round, each
process restart), so the ledger is the source of truth. It records the calibrated noise
multiplier once (sigma is fixed for the run) and appends one entry per round (sigma,
sample rate, steps). Epsilon is always recomputed from the whole ledger by the
accountant in :mod:`privacy.accounting`.

Storage: a JSON file written atomically (write to a temporary file, fsync, rename), so a
crash never leaves a half-written ledger; a copy also lives in the Flower
``Context.state`` of the node. On load the longer of the two histories wins, so neither a
new round, a restarted client process nor a lost state resets the budget.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from privacy.accounting import HistoryEntry, epsilon_for

__all__ = ["BudgetExceeded", "Ledger", "LedgerEntry", "atomic_write", "atomic_write_text"]


class BudgetExceeded(RuntimeError):
    """The next round would take the client past its epsilon budget."""


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync it, rename it over ``path``.

    Readers see the old or the new file, never a mix; a crash mid-write leaves the old one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))


@dataclass
class LedgerEntry:
    """One round of DP-SGD by one client."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    replay_key: str = ""  # hash of everything the round's update was computed from (see record)
    output_hash: str = ""  # hash of the update the client released


@dataclass
class Ledger:
    """The whole DP history of one client (unit: one training example of that client)."""

    client: str
    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    planned_steps: int = 0
    entries: list[LedgerEntry] = field(default_factory=list)

    # ---- accounting -------------------------------------------------------------------
    @property
    def history(self) -> list[HistoryEntry]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def epsilon(self) -> tuple[float, str]:
        """(epsilon spent so far, accountant) from the whole history."""
        return epsilon_for(self.history, self.delta, self.accountant)

    def epsilon_if(self, steps: int) -> tuple[float, str]:
        """Epsilon the client would have spent after ``steps`` more steps at its sigma."""
        extra = [(self.noise_multiplier, self.sample_rate, steps)]
        return epsilon_for(self.history + extra, self.delta, self.accountant)

    def check_budget(self, steps: int) -> float:
        """Raise BudgetExceeded if ``steps`` more would exceed the target; else the new epsilon."""
        eps, acc = self.epsilon_if(steps)
        if math.isfinite(self.target_epsilon) and eps > self.target_epsilon:
            spent, _ = self.epsilon()
            raise BudgetExceeded(
                f"client {self.client}: next round ({steps} steps) would reach epsilon={eps:.3f} > "
                f"budget {self.target_epsilon:g} (example-level, delta={self.delta:g}, {acc}); "
                f"spent so far {spent:.3f} over {self.total_steps} steps"
            )
        return eps

    def replay_of(self, server_round: int, replay_key: str) -> LedgerEntry | None:
        """The recorded entry of ``server_round`` computed from the same inputs, if any."""
        if not replay_key:
            return None
        return next((e for e in self.entries if e.round == server_round and e.replay_key == replay_key), None)

    def record(self, server_round: int, steps: int, replay_key: str = "", output_hash: str = "") -> float:
        """Append a finished round and return the epsilon spent in total.

        A round can be re-run (a retry after too few replies, a resume after a server
        crash). If it was computed from the same inputs (``replay_key``: global state,
        local state, seed, configuration) and produced bit-for-bit the same update
        (``output_hash``), releasing it again reveals nothing new: nothing is added and
        the current epsilon is returned. Any other re-run is new privacy spending and is
        appended. Without a ``replay_key`` a round is never recorded twice.
        """
        previous = self.replay_of(server_round, replay_key)
        if previous is not None and output_hash and previous.output_hash == output_hash:
            return self.epsilon()[0]
        if not replay_key and any(e.round == server_round for e in self.entries):
            raise ValueError(f"round {server_round} is already in the ledger of client {self.client}")
        entry = LedgerEntry(server_round, self.noise_multiplier, self.sample_rate, steps, 0.0, replay_key, output_hash)
        self.entries.append(entry)
        entry.epsilon_after = self.epsilon()[0]
        return entry.epsilon_after

    # ---- persistence ------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        raw: dict[str, Any] = json.loads(text)
        entries = [LedgerEntry(**e) for e in raw.pop("entries", [])]
        return cls(**raw, entries=entries)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load_or_new(cls, path: Path, state_json: str | None, **new_kwargs: Any) -> Ledger:
        """The longest history found on disk or in the node state; a new ledger if none."""
        found = []
        if path.is_file():
            found.append(cls.from_json(path.read_text(encoding="utf-8")))
        if state_json:
            found.append(cls.from_json(state_json))
        if not found:
            return cls(**new_kwargs)
        return max(found, key=lambda led: (led.total_steps, len(led.entries)))
