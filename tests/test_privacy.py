"""Calibration and the per-client ledger: honest, persistent, never reset."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpeft.privacy.accounting import calibrate_noise, epsilon_for
from fedpeft.privacy.ledger import BudgetExceeded, Ledger


def test_calibration_spends_at_most_the_target_and_close_to_it() -> None:
    plan = calibrate_noise(6.0, 1e-5, sample_rate=256 / 3000, steps=48, accountant="prv", relation="add-remove")
    assert plan.accountant == "prv"
    assert plan.epsilon <= 6.0
    assert plan.epsilon > 6.0 * 0.97  # not wastefully noisy
    # Independent check with Opacus's own accountant object.
    acc = PRVAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(plan.epsilon, rel=1e-3)


def test_more_steps_or_smaller_epsilon_need_more_noise() -> None:
    base = calibrate_noise(6.0, 1e-5, 0.1, 40, accountant="rdp", relation="add-remove").noise_multiplier
    assert calibrate_noise(6.0, 1e-5, 0.1, 160, accountant="rdp", relation="add-remove").noise_multiplier > base
    assert calibrate_noise(1.0, 1e-5, 0.1, 40, accountant="rdp", relation="add-remove").noise_multiplier > base


@pytest.mark.parametrize(("epsilon", "q", "steps", "accountant"), [
    (6.0, 1 / 3, 6, "prv"), (0.5, 0.01, 1000, "prv"), (20.0, 1.0, 3, "prv"), (3.0, 0.1, 20, "rdp"),
])
def test_calibration_agrees_with_opacus_bisection(epsilon: float, q: float, steps: int, accountant: str) -> None:
    """Our bracketed regula falsi finds the sigma Opacus's own bisection finds (same
    accountant, same tolerance): both epsilons lie in [target - 0.005, target]."""
    from opacus.accountants.utils import get_noise_multiplier

    calibrate_noise.cache_clear()
    plan = calibrate_noise(epsilon, 1e-5, q, steps, accountant, relation="add-remove")
    ref = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=q, steps=steps,
                               accountant=accountant, epsilon_tolerance=0.005)
    eps_ref, _ = epsilon_for([(ref, q, steps)], 1e-5, accountant, "add-remove")
    assert epsilon - 0.005 <= plan.epsilon <= epsilon
    assert epsilon - 0.005 <= eps_ref <= epsilon
    assert plan.noise_multiplier == pytest.approx(ref, rel=0.01)


def test_rdp_is_looser_than_prv() -> None:
    hist = [(1.0, 0.05, 200)]
    prv, _ = epsilon_for(hist, 1e-5, "prv", "add-remove")
    rdp, name = epsilon_for(hist, 1e-5, "rdp", "add-remove")
    assert name == "rdp" and rdp > prv
    acc = RDPAccountant()
    acc.history = hist
    assert rdp == pytest.approx(acc.get_epsilon(delta=1e-5))


def _ledger(tmp_path: Path) -> tuple[Ledger, Path]:
    plan = calibrate_noise(3.0, 1e-5, 0.1, 20)
    path = tmp_path / "client-0.json"
    led = Ledger.load_or_new(path, None, client="0", target_epsilon=3.0, delta=1e-5, accountant="pld")
    led.noise_multiplier, led.sample_rate, led.planned_steps = plan.noise_multiplier, plan.sample_rate, 20
    return led, path


def _ran(led: Ledger) -> dict[str, float]:
    """The sigma and q of the round that ran (the plan's, here)."""
    return {"noise_multiplier": led.noise_multiplier, "sample_rate": led.sample_rate}


def test_ledger_accumulates_and_survives_restarts(tmp_path: Path) -> None:
    led, path = _ledger(tmp_path)
    e1 = led.record(1, 10, **_ran(led))
    led.save(path)
    # A "restarted" client with an empty Context.state loads the disk ledger.
    again = Ledger.load_or_new(path, None, client="0", target_epsilon=3.0, delta=1e-5, accountant="pld")
    assert again.total_steps == 10 and again.noise_multiplier == led.noise_multiplier
    e2 = again.record(2, 10, **_ran(again))
    assert e2 > e1
    assert e2 == pytest.approx(epsilon_for([(led.noise_multiplier, led.sample_rate, 20)], 1e-5)[0], rel=1e-6)
    # The longer history wins over a stale copy in the node state.
    stale = led.to_json()
    again.save(path)
    merged = Ledger.load_or_new(path, stale, client="0", target_epsilon=3.0, delta=1e-5, accountant="pld")
    assert merged.total_steps == 20
    with pytest.raises(ValueError):
        merged.record(2, 10, **_ran(merged))  # a round is never counted twice


def test_budget_refusal_before_exceeding(tmp_path: Path) -> None:
    led, _ = _ledger(tmp_path)
    led.check_budget(10)
    led.record(1, 10, **_ran(led))
    led.record(2, 10, **_ran(led))  # the planned 20 steps: within budget
    assert led.epsilon()[0] <= 3.0
    with pytest.raises(BudgetExceeded) as info:
        led.check_budget(10)
    msg = str(info.value)
    assert "example-level" in msg and "replace-one" in msg and "delta=1e-05" in msg and "pld" in msg
    assert led.total_steps == 20  # refusing spends nothing


def test_merged_history_gives_the_same_epsilon() -> None:
    """Per-round ledger entries with the same (sigma, q) are merged before accounting (the PRV
    accountant's cost grows per entry); the epsilon must be that of the unmerged history."""
    from fedpeft.privacy.accounting import merge_history

    assert merge_history([(1.1, 0.25, 4), (0.9, 0.5, 2), (1.1, 0.25, 3), (0.9, 0.5, 0)]) == [(1.1, 0.25, 7),
                                                                                          (0.9, 0.5, 2)]
    history = [(1.1, 0.25, 4), (0.9, 0.5, 2), (1.1, 0.25, 3)]
    for acc_cls, name in ((PRVAccountant, "prv"), (RDPAccountant, "rdp")):
        raw = acc_cls()
        raw.history = [h for h in history if h[2] > 0]
        eps, used = epsilon_for(history, 1e-5, name, "add-remove")
        assert used == name
        assert eps == pytest.approx(raw.get_epsilon(delta=1e-5), rel=1e-6)


def test_grid_prv_accountant_matches_opacus_and_reuses_few_fft_lengths() -> None:
    """The ledger's PRV accountant (power-of-two grid, so long runs do not pile up FFT plans)
    gives Opacus's epsilon, on a grid at least as fine and as wide as Opacus's own."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    from fedpeft.privacy.accounting import GridPRVAccountant

    for hist in ([(3.26, 1 / 3, 30)], [(1.0, 0.1, 40)], [(0.86, 256 / 3000, 48), (1.2, 0.05, 10)]):
        stock, grid = PRVAccountant(), GridPRVAccountant()
        stock.history = grid.history = hist
        assert grid.get_epsilon(delta=1e-5) == pytest.approx(stock.get_epsilon(delta=1e-5), abs=1e-3)
    prvs = [PoissonSubsampledGaussianPRV(1 / 3, 3.26)]
    sizes = set()
    for steps in range(3, 153, 12):  # a ledger growing by 3 steps a round, every 4th of 50 rounds
        ours = GridPRVAccountant()._get_domain(prvs, [steps], 0.01, 1e-8)
        theirs = PRVAccountant()._get_domain(prvs, [steps], 0.01, 1e-8)
        assert ours.size & (ours.size - 1) == 0  # a power of two
        assert ours.dt <= theirs.dt and ours.t_min <= theirs.t_min and ours.t_max >= theirs.t_max
        sizes.add(ours.size)
    assert len(sizes) <= 4  # Opacus's own grid has a new length every round
