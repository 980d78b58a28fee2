"""The accounting module's own logic with the accountant replaced by closed forms: the sigma
search and its bracket, the re-check loop, the PRV fallback, argument checks and the history
merge (``fedpeft.privacy.accounting``). The figures of the real accountants against Opacus and
dp-accounting are in tests/test_privacy.py and tests/test_ledger.py; these run in a second, so
the mutation run can afford them per mutant."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.prv import Domain, PoissonSubsampledGaussianPRV

import fedpeft.privacy.accounting as accounting
from fedpeft.privacy.accounting import (
    EPSILON_TOLERANCE,
    Calibration,
    GridPRVAccountant,
    calibrate_noise,
    check_accountant,
    epsilon_for,
    merge_history,
)

DELTA = 1e-5


@pytest.fixture
def closed_form(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """``accounting.epsilon_for`` replaced by eps = scale * q * sqrt(steps) / sigma of the last
    entry (plus ``prior_eps`` if a prior is composed): monotone in sigma like the real ones."""
    state: dict[str, Any] = {"scale": 1.0, "calls": [], "prior_eps": 0.0}

    def fake(history: list[tuple[float, float, int]], delta: float, accountant: str = "pld",
             relation: str = "replace-one") -> tuple[float, str]:
        state["calls"].append((list(history), delta, accountant, relation))
        sigma, q, steps = history[-1]
        extra = state["prior_eps"] if len(history) > 1 else 0.0
        return extra + state["scale"] * q * math.sqrt(steps) / sigma, accountant + "-used"

    monkeypatch.setattr(accounting, "epsilon_for", fake)
    yield state
    calibrate_noise.cache_clear()


@pytest.mark.parametrize("sigma_star", [0.02, 0.3, 1.0, 1.7, 3.7, 40.0, 900.0])
def test_search_finds_the_smallest_sigma_within_the_tolerance(closed_form: dict[str, Any], sigma_star: float) -> None:
    target = 2.0
    closed_form["scale"] = target * sigma_star / (0.5 * math.sqrt(16))  # eps(sigma_star) = target at q=0.5, 16 steps
    sigma = accounting._search_sigma(target, DELTA, 0.5, 16, "pld")
    eps = closed_form["scale"] * 0.5 * 4 / sigma
    assert target - EPSILON_TOLERANCE <= eps <= target, (sigma, eps)
    assert sigma >= sigma_star * (1 - 1e-12)
    bracket = math.ceil(abs(math.log2(sigma_star))) + 2
    assert len(closed_form["calls"]) <= bracket + 8  # regula falsi: a handful past the bracket


def test_search_hands_the_prior_and_the_run_to_the_accountant(closed_form: dict[str, Any]) -> None:
    prior = ((3.0, 1.0, 1),)
    closed_form["prior_eps"] = 0.5
    accounting._search_sigma(2.0, 1e-6, 0.25, 9, "prv", prior, "add-remove")
    for history, delta, accountant, relation in closed_form["calls"]:
        assert history[:-1] == [(3.0, 1.0, 1)] and history[-1][1:] == (0.25, 9)
        assert (delta, accountant, relation) == (1e-6, "prv", "add-remove")


def test_search_survives_infinite_and_zero_epsilons(closed_form: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def steep(history: list[tuple[float, float, int]], *_a: object) -> tuple[float, str]:
        sigma = history[-1][0]
        return (math.inf if sigma < 10.0 else 11.0 / sigma), "pld"  # the bracket's low end is infinite

    monkeypatch.setattr(accounting, "epsilon_for", steep)
    sigma = accounting._search_sigma(1.0, DELTA, 0.1, 10, "pld")
    assert 1.0 - EPSILON_TOLERANCE <= 11.0 / sigma <= 1.0, sigma
    monkeypatch.setattr(accounting, "epsilon_for", lambda *_a: (0.0, "pld"))  # noise never matters
    with pytest.raises(RuntimeError, match="found no bracket"):
        accounting._search_sigma(1.0, DELTA, 0.1, 10, "pld")
    monkeypatch.setattr(accounting, "epsilon_for", lambda *_a: (math.inf, "pld"))  # no noise is enough
    with pytest.raises(RuntimeError, match=r"no bracket for epsilon=1\.0 \(q=0\.1, steps=10\)"):
        accounting._search_sigma(1.0, DELTA, 0.1, 10, "pld")


def accountant_curve(monkeypatch: pytest.MonkeyPatch, curve: Callable[[float], float]) -> list[float]:
    """``accounting.epsilon_for`` replaced by eps = curve(sigma of the last entry); returns the sigmas asked."""
    asked: list[float] = []

    def fake(history: list[tuple[float, float, int]], *_a: object) -> tuple[float, str]:
        asked.append(history[-1][0])
        return curve(history[-1][0]), "pld"

    monkeypatch.setattr(accounting, "epsilon_for", fake)
    return asked


# eps(sigma) curves, the target, and how many accountant evaluations the search takes on them (each is
# ~0.5-1 s with PLD, so a search that needs more is a slower first round for every client).
@pytest.mark.parametrize(("curve", "target", "evaluations"), [
    pytest.param(lambda s: math.exp(3 / s**3) - 1, 4.0, 6, id="steep"),
    pytest.param(lambda s: math.exp(3 / s**3) - 1, 0.5, 4, id="steep-small-target"),
    pytest.param(lambda s: math.exp(0.5 - math.log(s) - math.log(s) ** 3), 0.5, 6, id="log-cubic"),
    pytest.param(lambda s: 0.3 / s + 0.1 * math.exp(-s) / s, 0.5, 4, id="inverse-and-a-bump"),
    pytest.param(lambda s: 0.7 / s**3, 2.0, 3, id="power-law"),
    pytest.param(lambda s: 0.5 / s, 2.0, 4, id="exactly-the-target-at-a-bracket-end"),  # eps(0.25) == 2.0
    # Here the Illinois step once halved g_hi and the old test of the tolerance read that halved
    # weight: it returned sigma = 4 with eps = 0.4916, below target - tolerance.
    pytest.param(lambda s: 30 / s**3 + 5 * math.exp(-s) / s, 0.5, 6, id="near-the-bracket-end"),
])
def test_search_ends_within_the_tolerance_in_few_evaluations(monkeypatch: pytest.MonkeyPatch,
                                                             curve: Callable[[float], float], target: float,
                                                             evaluations: int) -> None:
    asked = accountant_curve(monkeypatch, curve)
    sigma = accounting._search_sigma(target, DELTA, 0.5, 16, "pld")
    assert target - EPSILON_TOLERANCE <= curve(sigma) <= target, (sigma, curve(sigma))
    assert sigma in asked and len(asked) <= evaluations, asked
    first = list(asked)
    assert accounting._search_sigma(target, DELTA, 0.5, 16, "pld") == sigma and asked[len(first):] == first


def test_search_stops_at_a_figure_exactly_the_tolerance_below_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = accountant_curve(monkeypatch, lambda s: 3.604 / s)
    # eps(1) = 3.604 is the tolerance below 3.609 in the search's own arithmetic: the interval's closed end
    shortfall = 3.609 * (1 - math.exp(math.log(3.604 / 3.609)))
    assert shortfall == EPSILON_TOLERANCE
    assert accounting._search_sigma(3.609, DELTA, 0.5, 16, "pld") == 1.0 and asked == [1.0, 0.5]


def test_search_treats_a_nan_epsilon_as_too_little_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    accountant_curve(monkeypatch, lambda s: math.nan if s < 10.0 else 11.0 / s)
    sigma = accounting._search_sigma(1.0, DELTA, 0.1, 10, "pld")
    assert 1.0 - EPSILON_TOLERANCE <= 11.0 / sigma <= 1.0, sigma


@pytest.mark.parametrize(("log2_sigma", "found"), [(38.5, True), (39.5, False), (-38.5, True), (-39.5, False)])
def test_search_brackets_sigma_within_two_to_the_39_and_refuses_beyond(monkeypatch: pytest.MonkeyPatch,
                                                                      log2_sigma: float, found: bool) -> None:
    sigma_star = 2.0**log2_sigma
    asked = accountant_curve(monkeypatch, lambda s: 2.0 * sigma_star / s)
    if found:
        sigma = accounting._search_sigma(2.0, DELTA, 0.5, 16, "pld")
        assert 2.0 - EPSILON_TOLERANCE <= 2.0 * sigma_star / sigma <= 2.0
    else:
        with pytest.raises(RuntimeError, match="found no bracket"):
            accounting._search_sigma(2.0, DELTA, 0.5, 16, "pld")
        assert len(asked) == 41  # sigma = 1, then 40 doublings or halvings, and no more


def test_search_over_a_jump_past_the_tolerance_ends_at_the_jump(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = accountant_curve(monkeypatch, lambda s: 4.0 if s < 3.0 else 1.0)  # no sigma has eps in [1.995, 2]
    sigma = accounting._search_sigma(2.0, DELTA, 0.5, 16, "pld")
    assert 3.0 <= sigma <= 3.0 * (1 + 1e-8) and len(asked) <= 40


def test_search_gives_up_after_a_hundred_refinements_on_the_noisier_side(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pathological accountant: just above the target below sigma = 3, nothing above it. The false
    # position creeps along the flat side, so only the cap on refinements ends the search.
    asked = accountant_curve(monkeypatch, lambda s: math.nextafter(2.0, 3.0) if s < 3.0 else 1e-300)
    sigma = accounting._search_sigma(2.0, DELTA, 0.5, 16, "pld")
    assert sigma >= 3.0 and len(asked) <= 3 + 100  # the bracket [2, 4], then at most 100 refinements


def test_search_on_a_plateau_at_the_target_stays_on_the_plateau(monkeypatch: pytest.MonkeyPatch) -> None:
    # eps is exactly the target for sigma in [2.5, 3.5): enough noise, and the least there is
    asked = accountant_curve(monkeypatch, lambda s: 4.0 if s < 2.5 else 2.0 if s < 3.5 else 1.0)
    sigma = accounting._search_sigma(2.0, DELTA, 0.5, 16, "pld")
    assert 2.5 <= sigma < 3.5 and len(asked) <= 4


def test_calibrate_raises_sigma_until_the_accountant_agrees(closed_form: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounting, "_search_sigma", lambda *a, **k: 1.0)
    closed_form["scale"] = 2.0 * 1.012 / (0.5 * 4)  # eps(1.0) = 1.012 * target: three 0.5 % steps needed
    plan = accounting._calibrate(2.0, DELTA, 0.5, 16, "pld", (), "add-remove")
    assert plan.noise_multiplier == pytest.approx(1.005 ** 3)
    assert plan == Calibration(plan.noise_multiplier, 0.5, 16, plan.epsilon, "pld-used", "add-remove")
    assert plan.epsilon <= 2.0
    closed_form["scale"] = 1e6  # never within the target
    with pytest.raises(RuntimeError, match=r"could not calibrate sigma for epsilon=2\.0"):
        accounting._calibrate(2.0, DELTA, 0.5, 16, "pld", (), "replace-one")
    assert len(closed_form["calls"]) == 4 + 200


def test_only_a_failing_prv_calibration_falls_back_to_rdp(closed_form: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def search(target: float, delta: float, q: float, steps: int, accountant: str, *_a: object) -> float:
        asked.append(accountant)
        if accountant != "rdp":
            raise OverflowError("numerically broken")
        return 10.0

    monkeypatch.setattr(accounting, "_search_sigma", search)
    plan = accounting._calibrate(2.0, DELTA, 0.5, 16, "prv", (), "add-remove")
    assert asked == ["prv", "rdp"] and plan.accountant == "rdp-used"
    with pytest.raises(OverflowError):  # pld has no fallback
        accounting._calibrate(2.0, DELTA, 0.5, 16, "pld", (), "add-remove")
    assert asked == ["prv", "rdp", "pld"]


def test_calibrate_keeps_a_sigma_whose_epsilon_is_exactly_the_target(closed_form: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounting, "_search_sigma", lambda *a, **k: 1.0)
    plan = accounting._calibrate(2.0, DELTA, 0.5, 16, "pld", (), "replace-one")  # eps(1.0) = 0.5 * 4 / 1.0 = 2.0
    assert (plan.noise_multiplier, plan.epsilon) == (1.0, 2.0) and len(closed_form["calls"]) == 1


def test_a_failing_prv_calibration_searches_rdp_for_the_same_plan_and_says_why(
        closed_form: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    closed = accounting.epsilon_for

    def prv_breaks(history: list[tuple[float, float, int]], delta: float, accountant: str = "pld",
                   relation: str = "replace-one") -> tuple[float, str]:
        if accountant == "prv":
            raise OverflowError("PRV domain overflow")
        return closed(history, delta, accountant, relation)

    monkeypatch.setattr(accounting, "epsilon_for", prv_breaks)
    closed_form["prior_eps"] = 0.5
    closed_form["scale"] = 3.0  # eps = 0.5 + 3 * 0.25 * 3 / sigma: sigma* = 1.5 for a target of 2
    with caplog.at_level(logging.WARNING, logger="fedpeft.privacy.accounting"):
        plan = accounting._calibrate(2.0, 1e-6, 0.25, 9, "prv", ((3.0, 1.0, 1),), "add-remove")
    assert plan.accountant == "rdp-used" and (plan.sample_rate, plan.planned_steps) == (0.25, 9)
    assert 2.0 - EPSILON_TOLERANCE <= plan.epsilon <= 2.0 and plan.noise_multiplier >= 1.5
    assert closed_form["calls"]
    for history, delta, accountant, relation in closed_form["calls"]:
        assert history[:-1] == [(3.0, 1.0, 1)] and history[-1][1:] == (0.25, 9)
        assert (delta, accountant, relation) == (1e-6, "rdp", "add-remove")
    [record] = [r for r in caplog.records if r.name == "fedpeft.privacy.accounting"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "PRV domain overflow" in message and "calibrating with rdp" in message.lower()


def test_calibrate_noise_checks_its_arguments_and_hands_them_on(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, ...]] = []

    def fake(*args: Any) -> Calibration:
        seen.append(args)
        return Calibration(1.5, args[2], args[3], args[0] - 0.001, args[4], args[6])

    monkeypatch.setattr(accounting, "_calibrate", fake)
    calibrate_noise.cache_clear()
    try:
        for q, steps, word in ((0.0, 3, "sample_rate"), (1.5, 3, "sample_rate"), (0.5, 0, "steps must be >= 1")):
            with pytest.raises(ValueError, match=word):
                calibrate_noise(3.25, DELTA, q, steps)
        with pytest.raises(ValueError, match="replace-one needs 'pld'"):
            calibrate_noise(3.25, DELTA, 0.5, 3, "prv")
        plan = calibrate_noise(3.25, DELTA, 1.0, 1, "pld", ((2.0, 1.0, 1),), "add-remove")  # the boundaries
        assert seen == [(3.25, DELTA, 1.0, 1, "pld", ((2.0, 1.0, 1),), "add-remove")]
        assert plan == Calibration(1.5, 1.0, 1, 3.249, "pld", "add-remove")
        assert calibrate_noise(3.25, DELTA, 0.5, 2) == Calibration(1.5, 0.5, 2, 3.249, "pld", "replace-one")
    finally:
        calibrate_noise.cache_clear()


def test_check_accountant_names_what_is_allowed() -> None:
    check_accountant("pld", "replace-one")
    for accountant in ("pld", "prv", "rdp"):
        check_accountant(accountant, "add-remove")
    with pytest.raises(ValueError, match=r"unknown neighbouring relation 'add-one'; allowed: replace-one, add-remove"):
        check_accountant("pld", "add-one")
    with pytest.raises(ValueError, match=r"unknown accountant 'moments'; allowed: pld, prv, rdp"):
        check_accountant("moments", "add-remove")
    for accountant in ("prv", "rdp"):
        with pytest.raises(ValueError, match=rf"accountant '{accountant}' \(Opacus\) accounts add/remove neighbours "
                                             r"only; replace-one needs 'pld'"):
            check_accountant(accountant, "replace-one")


def test_merge_history_sums_the_steps_of_one_mechanism_and_drops_empty_phases() -> None:
    merged = merge_history([(1, 0.5, 2), (1.0, 0.5, 3), (2.0, 0.5, 0), (2.0, 0.25, 1), (2.0, 0.25, -1)])
    assert merged == [(1.0, 0.5, 5), (2.0, 0.25, 1)]
    assert all(type(s) is float and type(q) is float and type(n) is int for s, q, n in merged)
    assert merge_history([(1.0, 0.5, 2.0)]) == [(1.0, 0.5, 2)]  # type: ignore[list-item]


def test_an_empty_history_spends_nothing() -> None:
    assert epsilon_for([], DELTA) == (0.0, "pld")
    assert epsilon_for([(1.0, 0.5, 0)], DELTA, "rdp", "add-remove") == (0.0, "rdp")
    assert accounting.pld_epsilon([(1.0, 0.5, 0)], DELTA) == 0.0
    with pytest.raises(ValueError, match=r"unknown neighbouring relation 'add-one'; allowed: replace-one, add-remove"):
        accounting.pld_epsilon([(1.0, 0.5, 1)], DELTA, "add-one")


def test_pld_epsilon_is_dp_accountings_figure_at_the_asked_discretisation() -> None:
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.privacy_accountant import NeighboringRelation

    figures = {}
    for relation, rel in (("replace-one", NeighboringRelation.REPLACE_ONE),
                          ("add-remove", NeighboringRelation.ADD_OR_REMOVE_ONE)):
        for interval in (0.01, 0.05):  # coarse, so fast; the default (1e-4) is what clients use
            direct = PLDAccountant(neighboring_relation=rel, value_discretization_interval=interval)
            direct.compose(dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.0)), 3))
            figures[relation, interval] = accounting.pld_epsilon([(1.0, 0.5, 1), (1.0, 0.5, 2)], DELTA, relation,
                                                                 value_discretization_interval=interval)
            assert figures[relation, interval] == direct.get_epsilon(DELTA)
    assert figures["add-remove", 0.05] > figures["add-remove", 0.01]  # the pessimistic bound loosens with the grid
    assert figures["replace-one", 0.01] > figures["add-remove", 0.01]


def _accountants_figure(history: list[tuple[float, float, int]], relation: str, interval: float) -> float:
    """What dp-accounting's own ``PLDAccountant`` says, one event per entry as given."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.privacy_accountant import NeighboringRelation

    rel = NeighboringRelation.REPLACE_ONE if relation == "replace-one" else NeighboringRelation.ADD_OR_REMOVE_ONE
    direct = PLDAccountant(neighboring_relation=rel, value_discretization_interval=interval)
    direct.compose(dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n) for s, q, n in history]))
    return float(direct.get_epsilon(DELTA))


@pytest.mark.parametrize("relation", ["replace-one", "add-remove"])
def test_pld_epsilon_builds_each_step_once_and_still_gives_the_accountants_figure_bit_for_bit(relation: str) -> None:
    """The one-step PLD is cached per process (a round's budget check re-uses its plan's step):
    every figure, first or from the cache, in any order, equals the accountant's exactly,
    including an entry never sampled (q = 0, skipped) between two real ones, and a noiseless
    one (infinite epsilon)."""
    interval = 0.01  # coarse, so fast
    accounting._step_pld.cache_clear()
    histories = [[(1.0, 0.5, 2)], [(1.0, 0.5, 5)], [(1.0, 0.5, 2), (2.0, 0.25, 3)],
                 [(2.0, 0.25, 1), (1.0, 0.0, 4), (1.0, 0.5, 2)], [(1.0, 0.5, 2), (0.0, 0.5, 1)]]
    expected = [_accountants_figure(h, relation, interval) for h in histories]
    assert expected[-1] == math.inf and len(set(expected[:-1])) == 4
    for _ in range(2):  # the second pass reads every step from the cache
        assert [accounting.pld_epsilon(h, DELTA, relation, interval) for h in histories] == expected
    info = accounting._step_pld.cache_info()
    assert info.misses == 2 and info.hits >= 10  # (1.0, 0.5) and (2.0, 0.25), each built once
    assert accounting.pld_epsilon([(1.0, 0.5, 2)], DELTA, relation, interval) == expected[0]  # not mutated
    assert accounting.pld_epsilon([(1.0, 0.5, 2)], DELTA, relation, 0.05) > expected[0]  # the grid is part of the key


@pytest.mark.parametrize("broken", [math.nan, -1.0, math.inf, RuntimeError("x"), OverflowError("x"), ValueError("x")])
def test_prv_falls_back_to_rdp_when_it_cannot_give_a_figure(monkeypatch: pytest.MonkeyPatch, broken: object,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def get_epsilon(self: object, delta: float) -> float:
        if isinstance(broken, BaseException):
            raise broken
        return broken  # type: ignore[return-value]

    monkeypatch.setattr(GridPRVAccountant, "get_epsilon", get_epsilon)
    accounting._epsilon_of.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="fedpeft.privacy.accounting"):
            eps, used = epsilon_for([(1.0, 0.1, 7)], DELTA, "prv", "add-remove")
        assert used == "rdp" and eps == epsilon_for([(1.0, 0.1, 7)], DELTA, "rdp", "add-remove")[0]
        why = (f"PRV accountant failed ({broken}); falling back to RDP" if isinstance(broken, BaseException)
               else f"PRV accountant gave epsilon={broken}; falling back to RDP")
        assert [r.getMessage() for r in caplog.records if r.name == "fedpeft.privacy.accounting"] == [why]
    finally:
        accounting._epsilon_of.cache_clear()


def test_prv_gives_its_own_figure_when_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GridPRVAccountant, "get_epsilon", lambda self, delta: 0.0)  # 0 is a valid figure
    accounting._epsilon_of.cache_clear()
    try:
        assert epsilon_for([(1.0, 0.1, 7)], DELTA, "prv", "add-remove") == (0.0, "prv")
        assert epsilon_for([(1.0, 1.0, 7)], DELTA, "prv", "add-remove") == (0.0, "prv")  # q = 1
    finally:
        accounting._epsilon_of.cache_clear()


def test_an_epsilon_is_kept_on_disk_under_its_plan_and_read_back_as_computed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The disk cache's record of a figure (``epsilon/``): the merged history, delta, accountant
    and relation it is for, and the figure and accountant that gave it; a fresh process reads
    it back instead of computing it again (tests/test_calibration_cache.py: damaged files)."""
    monkeypatch.setenv("FEDPEFT_CALIBRATION_CACHE", str(tmp_path))
    history = [(1.1, 0.25, 4), (1.1, 0.25, 4)]
    accounting._epsilon_of.cache_clear()
    try:
        first = epsilon_for(history, 1e-5, "rdp", "add-remove")
        (path,) = (tmp_path / "epsilon").glob("*.json")
        doc = json.loads(path.read_text())
        assert {k: v for k, v in doc["args"].items() if k != "versions"} == {
            "epsilon_of": [[1.1, 0.25, 8]], "delta": 1e-5, "accountant": "rdp", "relation": "add-remove", "format": 2}
        assert doc["result"] == {"epsilon": first[0], "accountant": "rdp"} and first[0] > 0
        accounting._epsilon_of.cache_clear()  # a fresh process
        monkeypatch.setattr(accounting, "_epsilon_uncached", lambda *a: pytest.fail("computed again"))
        again = epsilon_for(history, 1e-5, "rdp", "add-remove")
        assert again == first and type(again[0]) is float and type(again[1]) is str
    finally:
        accounting._epsilon_of.cache_clear()


@pytest.mark.parametrize("q", [0.1, 1.0])
def test_real_prv_gives_a_figure_without_a_warning_even_at_q_one(q: float) -> None:
    """Opacus's PRV takes log(1 - q), which numpy warns about (divide by zero) at q = 1 and
    which is harmless there; epsilon_for silences exactly that, so a run at sampling rate 1
    (every example every step) neither prints nor, under ``-W error``, fails."""
    import warnings

    accounting._epsilon_of.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eps, used = epsilon_for([(1.0, q, 3)], DELTA, "prv", "add-remove")
        assert used == "prv" and math.isfinite(eps) and eps > 0
    finally:
        accounting._epsilon_of.cache_clear()


def test_prv_is_handed_the_merged_history() -> None:
    acc = accounting._opacus("prv", [(1.0, 0.1, 3), (1.0, 0.1, 4), (2.0, 0.2, 0)])
    assert isinstance(acc, GridPRVAccountant) and acc.history == [(1.0, 0.1, 7)]
    rdp = accounting._opacus("rdp", [(1.0, 0.1, 3)])
    assert not isinstance(rdp, PRVAccountant) and rdp.history == [(1.0, 0.1, 3)]


def assert_grid_covers(ours: Domain, theirs: Domain) -> None:
    """A power-of-two grid with a power-of-two mesh, at least as fine and as wide as Opacus's, no wider
    than the next power of two above it."""
    assert ours.size & (ours.size - 1) == 0
    assert math.log2(ours.dt) == round(math.log2(ours.dt)) and ours.dt <= theirs.dt < 2 * ours.dt
    assert ours.t_min <= theirs.t_min and ours.t_max >= theirs.t_max
    widest = max(abs(theirs.t_min), abs(theirs.t_max))
    assert ours.t_max - ours.t_min <= 4 * widest + 6 * ours.dt  # rounded up to a power of two, no more


@pytest.mark.parametrize("steps", [3, 40, 151])
def test_grid_prv_domain_is_a_power_of_two_grid_at_least_as_fine_and_wide(steps: int) -> None:
    prvs = [PoissonSubsampledGaussianPRV(1 / 3, 3.26)]
    ours = GridPRVAccountant()._get_domain(prvs, [steps], 0.01, 1e-8)
    assert_grid_covers(ours, PRVAccountant()._get_domain(prvs, [steps], 0.01, 1e-8))


@pytest.mark.parametrize("stock", [
    Domain(-4.0, 3.9375, 128),  # widest on the left, 2 * widest / mesh a power of two
    Domain(-3.8125, 3.875, 124),  # 2 * widest / mesh + 4 a power of two: the bound is tight
    Domain(-1.0, 1.1, 22),  # a mesh (0.1) that is not a power of two
], ids=["left-widest", "tight", "mesh-0.1"])
def test_grid_prv_domain_covers_any_stock_domain(monkeypatch: pytest.MonkeyPatch, stock: Domain) -> None:
    monkeypatch.setattr(PRVAccountant, "_get_domain", lambda self, **_k: stock)
    assert_grid_covers(GridPRVAccountant()._get_domain([], [1], 0.01, 1e-8), stock)
