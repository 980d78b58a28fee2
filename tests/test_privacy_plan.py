"""``fedpeft privacy plan``'s arithmetic and refusals (src/fedpeft/privacy/plan.py), exactly.

The plan against the clients' ledgers is tests/test_privacy_audit.py; these pin the sample
rate's rounding, every refusal's boundary, and the table a user reads (found by `make mutation`).
"""

from __future__ import annotations

import math

import pytest

from fedpeft.privacy import plan as plan_mod
from fedpeft.privacy.accounting import calibrate_noise, epsilon_for
from fedpeft.privacy.plan import PrivacyPlan, make_plan, sample_rate_for


def test_sample_rate_is_one_over_the_number_of_batches() -> None:
    assert sample_rate_for(1, 1) == 1.0
    assert sample_rate_for(5, 10) == 1.0  # a batch larger than the data: one batch
    assert sample_rate_for(96, 32) == 1 / 3
    assert sample_rate_for(97, 32) == 1 / 4  # the last, partial batch counts
    for examples, batch in [(0, 1), (1, 0), (-3, 4)]:
        with pytest.raises(ValueError, match=rf"^examples and batch size must be >= 1, got {examples} and {batch}$"):
            sample_rate_for(examples, batch)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epsilon": 0.0}, "epsilon must be a positive finite number, got 0.0"),
    ({"epsilon": -1.0}, "epsilon must be a positive finite number, got -1.0"),
    ({"epsilon": math.inf}, "epsilon must be a positive finite number, got inf"),
    ({"delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"),
    ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
    ({"rounds": 0}, "rounds and steps per round must be >= 1, got 0 and 1"),
    ({"steps_per_round": 0}, "rounds and steps per round must be >= 1, got 1 and 0"),
])
def test_plan_refuses_what_is_out_of_range(kwargs: dict[str, float], message: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any calibration (a delta of 1 let through makes the calibration run for
    minutes: the mutation run's delta <= 1 mutant timed out instead of failing)."""
    def no_calibration(*_: object, **__: object) -> None:
        raise AssertionError("an out-of-range plan reached the calibration")

    monkeypatch.setattr(plan_mod, "calibrate_noise", no_calibration)
    args = {"epsilon": 2.0, "delta": 1e-5, "rounds": 1, "sample_rate": 0.5, "steps_per_round": 1, **kwargs}
    with pytest.raises(ValueError, match=f"^{message}$"):
        make_plan(**args)  # type: ignore[arg-type]


def test_one_round_of_one_step_is_a_valid_plan() -> None:
    plan = make_plan(1.0, 1e-5, rounds=1, sample_rate=0.5, steps_per_round=1)  # epsilon <= 1 is allowed
    assert plan.rounds == 1 and plan.steps_per_round == 1 and plan.total_steps == 1
    assert len(plan.epsilon_per_round) == 1 and 0 < plan.epsilon_per_round[0] <= 1.0
    assert plan.sample_rate == 0.5 and plan.delta == 1e-5 and plan.target_epsilon == 1.0


def test_plan_calibrates_and_accounts_with_the_accountant_and_relation_it_is_given() -> None:
    """Not the defaults (pld, replace-one): rdp under add/remove neighbours, the calibration's
    sigma and every round's epsilon under exactly that pair, and the pair in the plan's table. Full
    batches (q = 1): the defaults' PLD calibration, which a mutant falls back to, takes seconds, not
    the minutes that made such a mutant time out instead of fail."""
    plan = make_plan(2.0, 1e-5, rounds=2, sample_rate=1.0, steps_per_round=1, accountant="rdp", relation="add-remove")
    assert (plan.accountant, plan.relation) == ("rdp", "add-remove")
    assert plan.noise_multiplier == calibrate_noise(2.0, 1e-5, 1.0, 2, "rdp", relation="add-remove").noise_multiplier
    sigma = plan.noise_multiplier
    assert plan.epsilon_per_round == [epsilon_for([(sigma, 1.0, 1)] * r, 1e-5, "rdp", "add-remove")[0] for r in (1, 2)]
    assert "add-remove neighbours, rdp accountant" in plan.lines()[0]


def test_plan_table_states_every_figure_with_its_unit() -> None:
    plan = PrivacyPlan(3.0, 1e-5, 2, 0.25, 4, 1.23456, "pld", [1.5, 2.75])
    assert plan.total_steps == 8
    assert plan.lines() == [
        "target epsilon=3 delta=1e-05 (example-level, per client, replace-one neighbours, pld accountant)",
        "sample rate q=0.25, 4 steps per round x 2 rounds = 8 DP-SGD steps",
        "noise multiplier sigma=1.2346 (calibrated once for the whole run)",
        " round    steps   epsilon spent",
        "     1        4          1.5000",
        "     2        8          2.7500",
    ]
