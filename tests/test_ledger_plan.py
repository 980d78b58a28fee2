"""The ledger's arithmetic, plan and refusals without calibrating (``fedpeft.privacy.ledger``):
a recorder stands in for ``calibrate_noise``, so what a plan asks and installs, the boundaries of
its refusals, ``check_budget``, ``record``'s replay rule, ``from_json``'s one-line reasons and
the merge's base copy are checked in seconds (the mutation run's covering tests)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest

from fedpeft.privacy.accounting import epsilon_for
from fedpeft.privacy.ledger import BudgetExceeded, Ledger, LedgerConflict, LedgerEntry, PlanMismatch

DELTA = 1e-5


def _entry(r: int, key: str, steps: int = 4) -> LedgerEntry:
    return LedgerEntry(r, 1.2, 0.25, steps, 0.0, key, "out" + key)


def _good() -> dict:  # type: ignore[type-arg]
    return json.loads(Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8,
                             entries=[_entry(1, "a")]).to_json())


@pytest.fixture
def fake_calibration(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """``ledger.calibrate_noise`` replaced by a recorder (sigma 2.0, 3.0, ... per call): what
    :meth:`Ledger.ensure_plan` asks and installs, checked without tens of PLD evaluations."""
    import fedpeft.privacy.ledger as ledger_module
    from fedpeft.privacy.accounting import Calibration

    calls: list[tuple[object, ...]] = []

    def fake(target: float, delta: float, q: float, steps: int, accountant: str, prior: tuple[object, ...],
             relation: str) -> Calibration:
        calls.append((target, delta, q, steps, accountant, prior, relation))
        return Calibration(1.0 + len(calls), q, steps, target - 0.01, accountant, relation)

    monkeypatch.setattr(ledger_module, "calibrate_noise", fake)
    return calls


def _plan(**kwargs: object) -> dict[str, object]:
    return {"target_epsilon": 6.0, "delta": DELTA, "sample_rate": 0.25, "planned_steps": 8, "accountant": "pld"} | kwargs


def test_plan_steps_left_counts_only_the_steps_after_the_plan() -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=16, plan_offset=4,
                 entries=[_entry(1, "a", 4), _entry(2, "b", 6)])
    assert led.total_steps == 10 and led.plan_steps_left == 16 - 6
    assert led.history == [(1.2, 0.25, 4), (1.2, 0.25, 6)]
    assert led.entries[0].key == (1, "a", "outa")
    assert led._unit() == "example-level, replace-one, delta=1e-05"
    assert led.epsilon_if(0) == led.epsilon()
    assert led.epsilon_if(6) == epsilon_for([(1.2, 0.25, 16)], DELTA)


def test_a_new_ledger_is_calibrated_with_what_the_run_asks(fake_calibration: list[tuple[object, ...]]) -> None:
    led = Ledger("0", 6.0, DELTA, relation="add-remove", accountant="prv")
    msg = led.ensure_plan(**_plan(target_epsilon=5.0, accountant="prv", relation="add-remove"))  # type: ignore[arg-type]
    assert fake_calibration == [(5.0, DELTA, 0.25, 8, "prv", (), "add-remove")]
    assert (led.target_epsilon, led.noise_multiplier, led.sample_rate, led.planned_steps, led.plan_offset) == \
        (5.0, 2.0, 0.25, 8, 0)
    assert msg.startswith("client 0: sigma=2.0000 calibrated for 8 steps at q=0.25 after 0 recorded (new ledger)")


def test_a_plan_holds_exactly_while_it_covers_the_steps(fake_calibration: list[tuple[object, ...]]) -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.5, sample_rate=0.25, planned_steps=8, plan_offset=4,
                 entries=[_entry(1, "a", 4), _entry(2, "b", 4)])  # 4 steps of the plan spent, 4 left
    assert led.ensure_plan(**_plan(planned_steps=4)) == \
        "client 0: plan holds (sigma=1.5000, q=0.25, 4 steps left)"
    assert led.ensure_plan(**_plan(planned_steps=1)).startswith("client 0: plan holds")
    assert fake_calibration == []
    msg = led.ensure_plan(**_plan(planned_steps=5))  # one more than it covers: re-planned with the history
    assert fake_calibration == [(6.0, DELTA, 0.25, 5, "pld", ((1.2, 0.25, 4), (1.2, 0.25, 4)), "replace-one")]
    assert "(planned steps 5 > 4 the plan still covers)" in msg and "after 8 recorded" in msg
    assert (led.noise_multiplier, led.planned_steps, led.plan_offset, led.plan_steps_left) == (2.0, 5, 8, 5)


@pytest.mark.parametrize(("change", "why"), [({"sample_rate": 0.5}, "q 0.25 -> 0.5"),
                                             ({"target_epsilon": 7.0}, "target epsilon 6 -> 7")])
def test_a_changed_q_or_target_re_plans(fake_calibration: list[tuple[object, ...]], change: dict[str, float],
                                        why: str) -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.5, sample_rate=0.25, planned_steps=8,
                 entries=[_entry(1, "a", 2)])
    msg = led.ensure_plan(**_plan(planned_steps=2, **change))
    assert f"({why})" in msg and len(fake_calibration) == 1
    assert led.target_epsilon == change.get("target_epsilon", 6.0) and led.sample_rate == change.get("sample_rate", 0.25)


def test_a_plan_needs_a_rate_and_steps(fake_calibration: list[tuple[object, ...]]) -> None:
    for bad in ({"sample_rate": 0.0}, {"sample_rate": 1.01}, {"planned_steps": 0}):
        with pytest.raises(ValueError, match=r"plan needs q in \(0, 1\] and planned steps >= 1"):
            Ledger("0", 6.0, DELTA).ensure_plan(**_plan(**bad))
    Ledger("0", 6.0, DELTA).ensure_plan(**_plan(sample_rate=1.0, planned_steps=1))  # the boundaries plan
    assert len(fake_calibration) == 1


def test_a_history_that_spends_exactly_the_target_cannot_plan_more(fake_calibration: list[tuple[object, ...]]) -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=4,
                 entries=[_entry(1, "a", 4)])
    spent, _ = led.epsilon()
    with pytest.raises(PlanMismatch, match=r"already spends epsilon=\d\.\d{3} >= target"):
        led.ensure_plan(**_plan(target_epsilon=spent, planned_steps=8))
    led.ensure_plan(**_plan(target_epsilon=spent * 1.01, planned_steps=8))
    assert [c[0] for c in fake_calibration] == [spent * 1.01]


def test_check_budget_refuses_without_a_plan_and_only_above_the_target() -> None:
    with pytest.raises(BudgetExceeded, match="no privacy plan"):
        Ledger("0", 6.0, DELTA).check_budget(1)
    assert Ledger("0", 6.0, DELTA).check_budget(0) == 0.0  # no steps: nothing to plan
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8,
                 entries=[_entry(1, "a", 4)])
    at_target, _ = led.epsilon_if(4)
    led.target_epsilon = at_target
    assert led.check_budget(4) == at_target  # exactly the target is within it
    led.target_epsilon = at_target * 0.999
    with pytest.raises(BudgetExceeded, match=r"next round \(4 steps\) would reach epsilon=.* spent so far .* over 4 "
                                             r"steps"):
        led.check_budget(4)
    led.target_epsilon = math.inf  # an unbounded run is never refused
    assert led.check_budget(400) > at_target


def test_record_stores_what_ran_and_replays_only_identical_releases() -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8)
    eps = led.record(3, 4, "k", "", noise_multiplier=1, sample_rate=1)
    (entry,) = led.entries
    assert (entry.round, entry.steps, entry.replay_key, entry.output_hash, entry.accountant) == (3, 4, "k", "", "pld")
    assert type(entry.noise_multiplier) is float and type(entry.sample_rate) is float
    assert entry.epsilon_after == eps == epsilon_for([(1.0, 1.0, 4)], DELTA)[0]
    led.record(3, 4, "k", "", noise_multiplier=1, sample_rate=1)  # no output hash: not a known release
    assert len(led.entries) == 2
    led.record(3, 0, "k2", "o", noise_multiplier=1.2, sample_rate=0.25)  # zero steps are a valid round
    assert led.replay_of(3, "k2") is led.entries[2] and led.replay_of(4, "k2") is None
    assert led.replay_of(3, "") is None
    unkeyed = Ledger("0", 6.0, DELTA, entries=[LedgerEntry(5, 1.2, 0.25, 4, 0.0, "", "o")])
    assert unkeyed.replay_of(5, "") is None  # an entry without a key is never a replay


@pytest.mark.parametrize(("sigma", "q", "steps", "word"), [
    (True, 0.25, 4, "noise_multiplier"), (1.2, True, 4, "sample_rate"), (1.2, 0.25, True, "steps"),
    (-1.0, 0.25, 4, "noise_multiplier"), (1.2, -0.1, 4, "sample_rate"), (1.2, 0.25, -1, "steps"),
    ("1.2", 0.25, 4, "noise_multiplier"), (1.2, "0.25", 4, "sample_rate"), (1.2, 0.25, 4.0, "steps"),
])
def test_record_refuses_a_mechanism_that_cannot_have_run(sigma: object, q: object, steps: object, word: str) -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8)
    with pytest.raises(ValueError, match=rf"ledger of client 0, round 1: {word} must be"):
        led.record(1, steps, noise_multiplier=sigma, sample_rate=q)  # type: ignore[arg-type]
    assert led.entries == []


def test_from_json_names_what_is_wrong() -> None:
    def bad(raw: object, pattern: str) -> None:
        with pytest.raises(ValueError, match=pattern):
            Ledger.from_json(json.dumps(raw))

    with pytest.raises(ValueError, match="ledger is not JSON"):
        Ledger.from_json("{")
    bad([], "ledger is not a JSON object")
    good = _good()
    bad({k: v for k, v in good.items() if k != "delta"}, r"ledger: missing fields \['delta'\], unknown fields \[\]")
    bad(good | {"colour": 1}, r"unknown fields \['colour'\]")
    for key, value, word in (("target_epsilon", 0.0, "target_epsilon must be > 0"), ("target_epsilon", "6", "target"),
                             ("delta", "1e-5", "delta must be in"), ("noise_multiplier", -0.1, "plan sigma"),
                             ("noise_multiplier", math.inf, "plan sigma"), ("sample_rate", 1.5, "plan sigma"),
                             ("sample_rate", -0.5, "plan sigma"), ("noise_multiplier", "1", "plan sigma"),
                             ("planned_steps", -1, "planned_steps must be"), ("planned_steps", True, "planned_steps"),
                             ("plan_offset", 1.5, "plan_offset must be"), ("entries", {}, "entries must be a list"),
                             ("accountant", "prv", "accounts add/remove neighbours only")):
        bad(good | {key: value}, rf"ledger of client '0'.*{word}")
    bad(good | {"entries": [1]}, "entry 0 is not an object")
    for key, value, word in (("round", True, "round must be an integer"), ("round", 1.0, "round"),
                             ("accountant", "moments", "unknown accountant 'moments'")):
        bad(good | {"entries": [good["entries"][0] | {key: value}]}, rf"ledger of client '0', entry 0: .*{word}")
    bad(good | {"entries": [{"round": 1}]}, r"entry 0: missing fields \['noise_multiplier'")
    # the boundaries load: q = 1, sigma = 0 (no plan yet), zero planned steps, an entry's "" and named accountant
    for change in ({"sample_rate": 1.0}, {"sample_rate": 0.0, "noise_multiplier": 0.0}, {"planned_steps": 0},
                   {"entries": [good["entries"][0] | {"accountant": "pld"}, good["entries"][0] | {"accountant": ""}]}):
        Ledger.from_json(json.dumps(good | change))
    new = {k: v for k, v in good.items() if k not in ("noise_multiplier", "sample_rate", "planned_steps",
                                                       "plan_offset")}
    loaded = Ledger.from_json(json.dumps(new))
    assert (loaded.noise_multiplier, loaded.sample_rate, loaded.planned_steps, loaded.plan_offset) == (0.0, 0.0, 0, 0)
    assert Ledger.from_json(Ledger("0", math.inf, DELTA).to_json()).target_epsilon == math.inf


def test_load_or_new_takes_a_single_copy_or_a_new_ledger(tmp_path: Path) -> None:
    path = tmp_path / "client-0.json"
    state = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8, entries=[_entry(1, "a")])
    only_state = Ledger.load_or_new(path, state.to_json(), client="0", target_epsilon=6.0, delta=DELTA)
    assert only_state.to_json() == state.to_json()
    new = Ledger.load_or_new(path, None, client="0", target_epsilon=5.0, delta=1e-6, relation="add-remove",
                             accountant="rdp")
    assert new == Ledger("0", 5.0, 1e-6, "rdp", relation="add-remove")
    state.save(path)
    assert Ledger.load_or_new(path, "", client="0", target_epsilon=6.0, delta=DELTA).to_json() == state.to_json()
    assert Ledger.load_or_new(path, None, target_epsilon=6.0, delta=DELTA).client == "0"  # no client named: any
    with pytest.raises(LedgerConflict, match=r"belongs to client '0', not '1'"):
        Ledger.load_or_new(path, None, client="1", target_epsilon=6.0, delta=DELTA)
    with pytest.raises(LedgerConflict, match="belongs to client '0', not '1'"):
        Ledger.load_or_new(tmp_path / "none.json", state.to_json(), client="1", target_epsilon=6.0, delta=DELTA)


def test_a_merge_keeps_the_plan_of_the_longer_copy_and_only_adds_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "client-0.json"
    disk = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=16,
                  entries=[_entry(1, "a"), _entry(3, "c")])
    state = Ledger("0", 6.0, DELTA, noise_multiplier=1.7, sample_rate=0.5, planned_steps=9, plan_offset=4,
                   entries=[_entry(2, "b", 12)])  # more steps: its plan is the current one
    disk.save(path)
    merged = Ledger.load_or_new(path, state.to_json(), client="0", target_epsilon=6.0, delta=DELTA)
    assert (merged.noise_multiplier, merged.sample_rate, merged.planned_steps, merged.plan_offset) == (1.7, 0.5, 9, 4)
    assert [e.key for e in merged.entries] == [(1, "a", "outa"), (2, "b", "outb"), (3, "c", "outc")]
    assert merged.entries[-1].epsilon_after == epsilon_for(merged.history, DELTA)[0]
    assert merged.entries[-1].accountant == "pld" and merged.entries[0].epsilon_after == 0.0
    # equal steps and entries: the disk copy is the base; a copy with nothing new changes nothing
    twin = Ledger.from_json(disk.to_json())
    twin.noise_multiplier = 9.0
    same = Ledger.load_or_new(path, twin.to_json(), client="0", target_epsilon=6.0, delta=DELTA)
    assert same.noise_multiplier == 1.2 and same.entries[-1].epsilon_after == 0.0
    # equal steps, more entries in the state copy: the state copy is the base
    split = Ledger.from_json(disk.to_json())
    split.entries = [_entry(1, "a", 2), _entry(1, "a2", 2), _entry(3, "c")]
    split.noise_multiplier = 2.5
    based = Ledger.load_or_new(path, split.to_json(), client="0", target_epsilon=6.0, delta=DELTA)
    assert based.noise_multiplier == 2.5 and [e.key[1] for e in based.entries] == ["a", "a2", "c"]


def _exactly(message: str) -> str:
    """A ``match=`` pattern for the whole one-line message, nothing before or after it."""
    return "^" + re.escape(message) + "$"


def test_a_ledger_needs_delta_strictly_between_0_and_1() -> None:
    for delta in (0.0, 1.0, 1.5, -DELTA):
        with pytest.raises(ValueError, match=_exactly(f"ledger of client 0: delta must be in (0, 1), got {delta!r}")):
            Ledger("0", 6.0, delta)


def test_from_json_refusals_say_what_is_wrong_and_what_is_allowed() -> None:
    def refused(raw: object, message: str) -> None:
        with pytest.raises(ValueError, match=_exactly(message)):
            Ledger.from_json(json.dumps(raw))

    good = _good()
    entry = good["entries"][0]
    refused([], "ledger is not a JSON object")
    refused(good | {"relation": "add-one"},
            "ledger of client '0': unknown relation 'add-one'; allowed: replace-one, add-remove")
    refused(good | {"accountant": "moments"},
            "ledger of client '0': unknown accountant 'moments'; allowed: pld, prv, rdp")
    for delta in (0.0, 1.0, 1.5):  # refused by from_json itself, not only by the constructor
        refused(good | {"delta": delta}, f"ledger of client '0': delta must be in (0, 1), got {delta!r}")
    refused(good | {"entries": [entry | {"noise_multiplier": 0.0}]},
            "ledger of client '0', entry 0: noise_multiplier must be a finite number > 0, got 0.0")
    shapes: tuple[object, ...] = ({}, "x", [[1.2, 0.5]], [[1.2, 0.5, 1, 1]], [(1.2, 0.5, 1), 3])
    for reserved in shapes:
        refused(good | {"reserved": reserved}, "ledger of client '0': reserved must be a list of [sigma, q, steps]")
    for bad, word in (([0.0, 1.0, 1], "noise_multiplier must be a finite number > 0, got 0.0"),
                      ([2.0, 1.5, 1], "sample_rate must be in (0, 1], got 1.5"),
                      ([2.0, 1.0, -1], "steps must be a non-negative integer, got -1")):
        refused(good | {"reserved": [[2.0, 1.0, 1], bad]}, f"ledger of client '0', reserved 1: {word}")
    # the boundaries load: a target below 1, round 0, reserved releases (which round-trip)
    assert Ledger.from_json(json.dumps(good | {"target_epsilon": 0.5})).target_epsilon == 0.5
    assert Ledger.from_json(json.dumps(good | {"entries": [entry | {"round": 0}]})).entries[0].round == 0
    led = Ledger.from_json(json.dumps(good | {"reserved": [[2.0, 1.0, 1], [3.0, 0.5, 2]]}))
    assert led.reserved == [[2.0, 1.0, 1], [3.0, 0.5, 2]]
    assert Ledger.from_json(led.to_json()) == led


def test_the_fixed_parameters_are_named_in_the_refusal() -> None:
    led = Ledger("0", 6.0, DELTA, "prv", relation="add-remove")
    for change, name, stored, asked in (({"delta": 1e-6}, "delta", "1e-05", "1e-06"),
                                        ({"accountant": "rdp"}, "accountant", "'prv'", "'rdp'"),
                                        ({"relation": "replace-one", "accountant": "prv"}, "relation",
                                         "'add-remove'", "'replace-one'")):
        with pytest.raises(PlanMismatch, match=_exactly(
                f"client 0: ledger {name}={stored} is fixed for its life, this run asks {name}={asked}; "
                "use a new ledger directory")):
            led.ensure_plan(**_plan(**({"accountant": "prv", "relation": "add-remove"} | change)))


def test_a_plan_below_sigma_one_is_a_plan(fake_calibration: list[tuple[object, ...]]) -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=0.8, sample_rate=0.25, planned_steps=8)
    assert led.ensure_plan(**_plan()) == "client 0: plan holds (sigma=0.8000, q=0.25, 8 steps left)"
    assert fake_calibration == []
    led.target_epsilon = math.inf
    assert led.check_budget(2) == epsilon_for([(0.8, 0.25, 2)], DELTA)[0]


def test_reserved_releases_are_planned_for_and_a_change_of_them_re_plans(
        fake_calibration: list[tuple[object, ...]]) -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.5, sample_rate=0.25, planned_steps=8,
                 entries=[_entry(1, "a", 2)])
    msg = led.ensure_plan(**_plan(planned_steps=4, reserved=[(2, 1, 1)]))  # type: ignore[arg-type]
    assert "(reserved releases 0 -> 1)" in msg
    assert led.reserved == [[2.0, 1.0, 1]] and [type(v) for v in led.reserved[0]] == [float, float, int]
    assert fake_calibration[-1][5] == ((1.2, 0.25, 2), (2.0, 1.0, 1))
    for same in ([(2, 1, 1)], [(2.0, 1.0, 1)]):  # the same releases, however spelled, keep the plan
        assert led.ensure_plan(**_plan(planned_steps=4, reserved=same)).startswith(  # type: ignore[arg-type]
            "client 0: plan holds (sigma=2.0000")
    assert led.epsilon_if(0) == epsilon_for([(1.2, 0.25, 2), (2.0, 1.0, 1)], DELTA)
    msg = led.ensure_plan(**_plan(planned_steps=4, sample_rate=0.5, target_epsilon=7.0))  # all changed at once
    assert "(q 0.25 -> 0.5; target epsilon 6 -> 7; reserved releases 1 -> 0)" in msg
    assert led.reserved == [] and len(fake_calibration) == 2 and fake_calibration[-1][5] == ((1.2, 0.25, 2),)


def test_a_calibration_is_logged_as_it_is_returned(fake_calibration: list[tuple[object, ...]],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedpeft.ledger"):
        msg = Ledger("0", 6.0, DELTA).ensure_plan(**_plan())
    assert [(r.name, r.levelno) for r in caplog.records] == [("fedpeft.ledger", logging.INFO)]
    assert caplog.messages == [msg]


def test_epsilon_if_adds_even_one_step_under_the_ledgers_relation() -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8, relation="add-remove",
                 entries=[_entry(1, "a", 4)])
    assert led.epsilon_if(1) == epsilon_for([(1.2, 0.25, 5)], DELTA, "pld", "add-remove")


def test_record_without_an_output_hash_is_never_a_replay() -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8)
    for _ in range(2):
        led.record(3, 4, "k", noise_multiplier=1.2, sample_rate=0.25)
    assert [(e.replay_key, e.output_hash) for e in led.entries] == [("k", ""), ("k", "")]


def test_diverged_copies_are_merged_with_a_warning_naming_the_file(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "client-0.json"
    Ledger("0", 6.0, DELTA, entries=[_entry(1, "a"), _entry(2, "b")]).save(path)
    state = Ledger("0", 6.0, DELTA, entries=[_entry(1, "a"), _entry(3, "c")])
    with caplog.at_level(logging.WARNING, logger="fedpeft.ledger"):
        merged = Ledger.load_or_new(path, state.to_json(), client="0", target_epsilon=6.0, delta=DELTA)
    assert [e.round for e in merged.entries] == [1, 2, 3]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"ledger {path}: disk and node-state copies diverged; merged 2 + 1 entries into 3")]
    other = Ledger("0", 6.0, 1e-6, entries=[_entry(1, "a")])
    with pytest.raises(LedgerConflict, match=_exactly(
            f"copies of ledger {path} disagree on delta: disk 1e-05, node state 1e-06")):
        Ledger.load_or_new(path, other.to_json(), client="0", target_epsilon=6.0, delta=DELTA)


def test_a_tampered_epsilon_after_is_refused() -> None:
    """The reported figure of an entry (the audit compares it with its bounds) must be a number."""
    good = _good()
    entry = good["entries"][0]
    for value in (-0.1, math.nan, "0.5", True, None, [0.5]):
        with pytest.raises(ValueError, match=_exactly(
                f"ledger of client '0', entry 0: epsilon_after must be a number >= 0, got {value!r}")):
            Ledger.from_json(json.dumps(good | {"entries": [entry | {"epsilon_after": value}]}))
    for value in (0, 0.0, 7.5, math.inf):  # the boundaries load
        led = Ledger.from_json(json.dumps(good | {"entries": [entry | {"epsilon_after": value}]}))
        assert led.entries[0].epsilon_after == value
