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
the same scenario and seed give the same offline and crashed clients in every run (and a
resumed run, with no generator state to save).

:class:`DeadlineStrategy` is the Flower-style wrapper that applies a policy in a real run:
the base strategy samples ``policy.selection(k, clients)`` clients (the registry builds it so,
:mod:`fedpeft.strategies.registry`), every instruction carries the timer's directives for the
round, and of the replies only those the policy accepts reach the base strategy. When each
client *would* have finished is the :class:`RoundTimer`'s business -- the heterogeneous-device
emulator of a simulation (:class:`fedpeft.sim.hetero.hook.HeteroEmulator`), which also keeps
the simulated clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.config import ConfigError
from fedpeft.strategies.state import StateDict

__all__ = ["POLICIES", "Candidate", "DeadlinePolicy", "DeadlineStrategy", "Outcome", "RoundDraws", "RoundTimer",
           "TimedReplies", "draw_round", "resolve_round", "settle_round"]

log = logging.getLogger("fedpeft.server")

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


@dataclass
class TimedReplies:
    """A round's replies as a :class:`RoundTimer` sees them."""

    candidates: list[Candidate]  # every selected client, with when it would have finished
    replies: dict[str, Message] = field(default_factory=dict)  # client -> its reply (clients that ran)
    passthrough: list[Message] = field(default_factory=list)  # not emulated (errors, refusals): passed on


class RoundTimer(Protocol):
    """What :class:`DeadlineStrategy` needs from an emulation of client devices."""

    @property
    def policy(self) -> DeadlinePolicy: ...

    def round_directives(self, server_round: int) -> dict[str, str]:
        """Entries for every instruction's config this round (the clients' own emulation plan)."""
        ...

    def time_replies(self, server_round: int, replies: list[Message], bytes_down_each: int) -> TimedReplies:
        """When each selected client would have finished (or crashed), from public quantities."""
        ...

    def record_outcomes(self, server_round: int, outcomes: list[Outcome], round_s: float,
                        timed: TimedReplies) -> list[Message]:
        """Record the round (simulated clock, timeline); the accepted replies, ready to aggregate."""
        ...


def settle_round(timer: RoundTimer, server_round: int, replies: list[Message], bytes_down_each: int, k: int,
                 policy: DeadlinePolicy) -> list[Message]:
    """Time ``replies``, apply ``policy`` for ``k`` wanted clients; the replies to aggregate."""
    timed = timer.time_replies(server_round, replies, bytes_down_each)
    outcomes, round_s = resolve_round(timed.candidates, k, policy)
    return timer.record_outcomes(server_round, outcomes, round_s, timed) + timed.passthrough


def _nbytes(arrays: ArrayRecord) -> int:
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values()))


class DeadlineStrategy(Strategy):
    """Flower-style wrapper (``.strategy``) that applies a deadline policy with a round timer.

    ``wanted`` is k, the clients a round wants (``train.clients_per_round`` or all); the base
    strategy it wraps samples ``policy.selection(wanted, clients)`` (over-selection). Its state
    is the policy and k, checked on resume (a scenario is not part of the run configuration,
    so its hash does not cover it); the timer keeps the rest (it is a stateful round hook).
    """

    def __init__(self, strategy: Strategy, policy: DeadlinePolicy, wanted: int, timer: RoundTimer) -> None:
        self.strategy, self.policy, self.wanted, self.timer = strategy, policy, wanted, timer
        self._down = 0  # bytes sent to each client this round (the global state)

    def summary(self) -> None:
        log.info("deadlines: %s (%g s, over-select x%g), %d clients wanted per round", self.policy.policy,
                 self.policy.deadline_s, self.policy.over_select, self.wanted)
        self.strategy.summary()

    def state_dict(self) -> StateDict:
        return {"policy": asdict(self.policy), "wanted": self.wanted}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        policy, wanted = DeadlinePolicy(**dict(state["policy"])), int(state["wanted"])
        if (policy, wanted) != (self.policy, self.wanted):
            raise ValueError(f"the checkpoint's deadline policy {policy} for k={wanted} differs from this run's "
                             f"{self.policy} for k={self.wanted}; resume with the run's own scenario")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        directives = self.timer.round_directives(server_round)
        for msg in messages:
            for key, value in directives.items():
                msg.content.config_records["config"][key] = value
        self._down = _nbytes(arrays)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = settle_round(self.timer, server_round, list(replies), self._down, self.wanted, self.policy)
        return self.strategy.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
