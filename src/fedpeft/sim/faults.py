"""Client faults and the server's minimum-replies policy (``[faults]``).

Two halves, both driven by the configuration so that every process agrees:

* **Injection (simulation only).** ``fail_rate`` P makes each sampled client, in each
  round attempt, fail with probability P: half of the failures are *crashes* (the
  ClientApp raises before training: Flower turns it into an error reply, nothing was
  spent), the other half *timeouts* (the client trains, spends its privacy budget, and its
  reply is lost: the server discards it as late). The draw is a pure function of
  ``(seed, round, attempt, client)`` (:func:`draw_fault`), so a run is reproducible and a
  retried round draws afresh. Real deployments get real faults instead: a SuperNode that
  dies returns an error or nothing before ``send_and_receive``'s timeout.
* **Policy (server).** A round needs ``min_clients`` valid replies. With fewer, nothing is
  averaged in (the global state is unchanged); ``on_too_few = "retry"`` re-sends the same
  global state up to ``max_retries`` times, ``"skip"`` moves on to the next round. Both are
  logged and recorded in the round's ``metrics.jsonl`` row (``attempts``, ``skipped``).

A retried client that already trained on the same global state with the same seed
produces the identical (already released) update again; its ledger records that as a
replay, not as new privacy spending (:meth:`fedpeft.privacy.ledger.Ledger.record`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - fedpeft.config imports this module
    from fedpeft.config import RunConfig

__all__ = ["FAULT_KINDS", "POLICIES", "FaultConfig", "InjectedCrash", "draw_fault", "validate_faults"]

POLICIES = ("retry", "skip")
FAULT_KINDS = ("crash", "timeout")


@dataclass(frozen=True)
class FaultConfig:
    """``fail_rate``: probability that a sampled client fails in a round attempt (simulation);
    ``min_clients``: fewest valid replies for a round to be averaged (0 = 1);
    ``on_too_few``: ``retry`` (same state, up to ``max_retries`` more attempts) or ``skip``."""

    fail_rate: float = 0.0
    min_clients: int = 0
    on_too_few: str = "retry"
    max_retries: int = 2

    def minimum(self) -> int:
        return max(1, self.min_clients)


class InjectedCrash(RuntimeError):
    """Raised by a simulated client whose fault draw says ``crash``."""


def validate_faults(cfg: RunConfig) -> None:
    """One-line :class:`~fedpeft.config.ConfigError` for an invalid ``[faults]`` table."""
    from fedpeft.config import ConfigError

    f = cfg.faults
    if not (math.isfinite(f.fail_rate) and 0.0 <= f.fail_rate < 1.0):
        raise ConfigError("faults.fail_rate", f.fail_rate, "must be a probability in [0, 1)")
    per_round = cfg.train.clients_per_round or cfg.train.clients
    if not 0 <= f.min_clients <= per_round:
        raise ConfigError("faults.min_clients", f.min_clients,
                          f"must be in [0, {per_round}] (clients per round; 0 = 1)")
    if f.on_too_few not in POLICIES:
        raise ConfigError("faults.on_too_few", f.on_too_few, f"allowed: {', '.join(POLICIES)}")
    if not 0 <= f.max_retries <= 100:
        raise ConfigError("faults.max_retries", f.max_retries, "must be an integer in [0, 100]")


def draw_fault(fail_rate: float, seed: int, server_round: int, attempt: int, client: str) -> str:
    """``""`` (no fault), ``"crash"`` or ``"timeout"``: a seeded, process-independent draw."""
    if fail_rate <= 0.0:
        return ""
    digest = hashlib.sha256(f"fedpeft-fault:{seed}:{server_round}:{attempt}:{client}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u >= fail_rate:
        return ""
    return FAULT_KINDS[0] if u < fail_rate / 2 else FAULT_KINDS[1]
