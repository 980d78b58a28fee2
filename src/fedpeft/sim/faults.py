"""Client faults and the server's minimum-replies policy (``[faults]``).

Two halves, both driven by the configuration (:class:`fedpeft.config.FaultConfig`, checked
in :mod:`fedpeft.config.checks`) so that every process agrees:

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

__all__ = ["FAULT_KINDS", "InjectedCrash", "draw_fault"]

FAULT_KINDS = ("crash", "timeout")


class InjectedCrash(RuntimeError):
    """Raised by a simulated client whose fault draw says ``crash``."""


def draw_fault(fail_rate: float, seed: int, server_round: int, attempt: int, client: str) -> str:
    """``""`` (no fault), ``"crash"`` or ``"timeout"``: a seeded, process-independent draw."""
    if fail_rate <= 0.0:
        return ""
    digest = hashlib.sha256(f"fedpeft-fault:{seed}:{server_round}:{attempt}:{client}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u >= fail_rate:
        return ""
    return FAULT_KINDS[0] if u < fail_rate / 2 else FAULT_KINDS[1]
