"""``fedpeft privacy plan``: the noise a DP-SGD run needs, and what each round spends.

Before anything is trained, a user wants to know which noise multiplier a budget buys and
how the budget is used up over the rounds. This module answers with the same calibration
the clients run (:func:`fedpeft.privacy.accounting.calibrate_noise`: sigma calibrated once for
every step of the whole run, then ``epsilon_for`` over the growing history), so the plan
matches what the clients will later report in their ledgers. Every figure is under the
neighbouring relation the clients account with (``replace-one`` by default: a client's
example count is public, so neighbours substitute an example; accountant ``pld``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedpeft.privacy.accounting import DEFAULT_ACCOUNTANT, DEFAULT_RELATION, calibrate_noise, epsilon_for

__all__ = ["PrivacyPlan", "make_plan", "sample_rate_for"]


@dataclass(frozen=True)
class PrivacyPlan:
    """Noise multiplier for a planned run and epsilon after each round (example-level)."""

    target_epsilon: float
    delta: float
    rounds: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    accountant: str
    epsilon_per_round: list[float] = field(default_factory=list)
    relation: str = DEFAULT_RELATION

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def lines(self) -> list[str]:
        """Human-readable table, every epsilon with its unit, delta and accountant."""
        out = [
            f"target epsilon={self.target_epsilon:g} delta={self.delta:g} (example-level, per client, "
            f"{self.relation} neighbours, {self.accountant} accountant)",
            f"sample rate q={self.sample_rate:.6g}, {self.steps_per_round} steps per round x {self.rounds} rounds "
            f"= {self.total_steps} DP-SGD steps",
            f"noise multiplier sigma={self.noise_multiplier:.4f} (calibrated once for the whole run)",
            f"{'round':>6}  {'steps':>7}  {'epsilon spent':>14}",
        ]
        for r, eps in enumerate(self.epsilon_per_round, start=1):
            out.append(f"{r:>6}  {r * self.steps_per_round:>7}  {eps:>14.4f}")
        return out


def sample_rate_for(examples: int, batch_size: int) -> float:
    """The Poisson sample rate a client uses: 1 / number of batches (Opacus's ``1/len(loader)``)."""
    if examples < 1 or batch_size < 1:
        raise ValueError(f"examples and batch size must be >= 1, got {examples} and {batch_size}")
    return 1.0 / math.ceil(examples / min(batch_size, examples))


def make_plan(
    epsilon: float, delta: float, rounds: int, sample_rate: float, steps_per_round: int,
    accountant: str = DEFAULT_ACCOUNTANT, relation: str = DEFAULT_RELATION,
) -> PrivacyPlan:
    """Calibrate sigma for ``rounds * steps_per_round`` steps and account each round's prefix."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds and steps per round must be >= 1, got {rounds} and {steps_per_round}")
    cal = calibrate_noise(epsilon, delta, sample_rate, rounds * steps_per_round, accountant, relation=relation)
    per_round = [
        epsilon_for([(cal.noise_multiplier, cal.sample_rate, steps_per_round)] * r, delta, cal.accountant,
                    relation)[0]
        for r in range(1, rounds + 1)
    ]
    return PrivacyPlan(epsilon, delta, rounds, cal.sample_rate, steps_per_round, cal.noise_multiplier,
                       cal.accountant, per_round, relation)
