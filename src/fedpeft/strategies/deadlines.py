"""Per-round deadline policies and seeded availability / crash draws.

Policies (a server's choice for each round):

* ``wait-all`` -- aggregate every client that was selected and finished; the round lasts
  until the slowest survivor is done (the deadline is ignored).
* ``drop-late`` -- aggregate the clients that finish within ``deadline_s``; if anyone is
  late the round lasts exactly the deadline.
* ``over-select`` -- select ``ceil(k * over_select)`` clients and aggregate the first k to
  finish (within the deadline, if one is set); the round ends when the k-th arrives.

Every policy notices a crashed client when it crashes (a lost connection) and an offline
client at once; neither contributes. Draws are a pure function of (seed, round, client):
the same scenario and seed give the same offline and crashed clients in every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpeft.config import ConfigError

__all__ = ["POLICIES", "Candidate", "DeadlinePolicy", "Outcome", "RoundDraws", "draw_round", "resolve_round"]

POLICIES = ("wait-all", "drop-late", "over-select")


@dataclass(frozen=True)
class DeadlinePolicy:
    """A scenario's ``[deadline]`` table."""

    policy: str = "wait-all"
    deadline_s: float = math.inf
    over_select: float = 1.0

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError("deadline.policy", self.policy, f"allowed: {', '.join(POLICIES)}")
        if not self.deadline_s > 0:
            raise ConfigError("deadline.seconds", self.deadline_s, "must be > 0 (inf = none)")
        if not (1.0 <= self.over_select <= 10.0):
            raise ConfigError("deadline.over_select", self.over_select, "must be in [1, 10]")
        if self.policy == "drop-late" and not math.isfinite(self.deadline_s):
            raise ConfigError("deadline.seconds", self.deadline_s, "drop-late needs a finite deadline")

    def selection(self, k: int, available: int) -> int:
        """How many clients to select for ``k`` wanted among ``available``."""
        if self.policy != "over-select":
            return min(k, available)
        return min(available, math.ceil(k * self.over_select))


@dataclass(frozen=True)
class RoundDraws:
    """Which clients are offline / will crash this round, and when a crash happens."""

    offline: np.ndarray  # bool per client
    crash: np.ndarray  # bool per client
    crash_point: np.ndarray  # fraction of its round time after which a crashing client fails


def draw_round(seed: int, server_round: int, availability: Sequence[float], crash_rate: Sequence[float]) -> RoundDraws:
    """Independent draws for every client (index = client id), reproducible from the seed."""
    rng = np.random.default_rng([seed, server_round, 0x4E7])
    u = rng.random((len(availability), 3))
    offline = u[:, 0] >= np.asarray(availability, dtype=float)
    crash = (u[:, 1] < np.asarray(crash_rate, dtype=float)) & ~offline
    return RoundDraws(offline, crash, u[:, 2])


@dataclass(frozen=True)
class Candidate:
    """A selected client as the server sees it at the end of the round."""

    client: str
    finish_s: float  # simulated finish time (inf when it never ran)
    status: str = "ran"  # ran | offline | declined | crashed
    crash_s: float = 0.0  # when a crashed client's connection is lost


@dataclass(frozen=True)
class Outcome:
    client: str
    status: str  # accepted | late | surplus | crashed | offline | declined
    end_s: float  # when the server stopped waiting for this client


def resolve_round(cands: Sequence[Candidate], k: int, policy: DeadlinePolicy) -> tuple[list[Outcome], float]:
    """Apply ``policy``; return each candidate's outcome and the simulated round time."""
    deadline = policy.deadline_s if policy.policy != "wait-all" else math.inf
    ran = sorted((c for c in cands if c.status == "ran"), key=lambda c: (c.finish_s, c.client))
    out: list[Outcome] = [Outcome(c.client, c.status, 0.0) for c in cands if c.status in ("offline", "declined")]
    crashes = [c for c in cands if c.status == "crashed"]
    out += [Outcome(c.client, "crashed", min(c.crash_s, deadline)) for c in crashes]
    want = k if policy.policy == "over-select" else len(ran)
    accepted = [c for c in ran if c.finish_s <= deadline][:want]
    done = {c.client for c in accepted}
    for c in ran:
        if c.client in done:
            out.append(Outcome(c.client, "accepted", c.finish_s))
        elif c.finish_s > deadline:
            out.append(Outcome(c.client, "late", deadline))
        else:
            out.append(Outcome(c.client, "surplus", accepted[-1].finish_s))
    if policy.policy == "over-select" and len(accepted) >= want and accepted:
        round_s = accepted[-1].finish_s
    else:
        ends = [c.finish_s for c in ran] + [c.crash_s for c in crashes]
        round_s = min(deadline, max(ends)) if ends else 0.0
    for i, o in enumerate(out):  # a surplus / late client is cut off when the round ends
        if o.status in ("late", "surplus"):
            out[i] = Outcome(o.client, o.status, round_s)
    return out, round_s
