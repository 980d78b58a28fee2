"""Replace-one accounting, the ledger's plan and merge, malformed ledgers, the audit's bounds
and run-directory reuse (issue 16: privacy must hold against the server, which sees n)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation

from fedpeft.privacy.accounting import calibrate_noise, epsilon_for
from fedpeft.privacy.audit import audit_run, pld_bounds
from fedpeft.privacy.ledger import BudgetExceeded, Ledger, LedgerConflict, LedgerEntry, PlanMismatch
from fedpeft.privacy.plan import sample_rate_for

DELTA = 1e-5


def _dpa(history: list[tuple[float, float, int]], relation: NeighboringRelation) -> float:
    """Independent figure: dp-accounting's PLDAccountant on the unmerged (sigma, q, steps) list."""
    acc = PLDAccountant(neighboring_relation=relation)
    for s, q, n in history:
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n))
    return float(acc.get_epsilon(DELTA))


# ---- accounting ----------------------------------------------------------------------------------
def test_replace_one_is_the_default_and_opacus_accountants_are_refused_under_it() -> None:
    hist = [(0.7907, 1 / 13, 39)]
    eps, used = epsilon_for(hist, DELTA)
    assert used == "pld" and eps == pytest.approx(7.255, abs=2e-3)  # the lead's reference figure
    assert epsilon_for(hist, DELTA, "pld", "add-remove")[0] == pytest.approx(5.985, abs=2e-3)
    for name in ("prv", "rdp"):
        with pytest.raises(ValueError, match="pld"):
            epsilon_for(hist, DELTA, name)
        with pytest.raises(ValueError, match="pld"):
            calibrate_noise(6.0, DELTA, 0.1, 10, name)
    assert epsilon_for(hist, DELTA, "prv", "add-remove")[1] == "prv"


def test_q1_replace_one_is_a_gaussian_of_sensitivity_two() -> None:
    """dp-accounting's PoissonSampled(1, Gaussian(sigma)) under REPLACE_ONE equals Gaussian(sigma/2)
    under add-remove: substituting one example moves the clipped sum by up to 2C."""
    for sigma in (1.0, 3.0, 5.0):
        replace, _ = epsilon_for([(sigma, 1.0, 1)], DELTA, "pld", "replace-one")
        half, _ = epsilon_for([(sigma / 2, 1.0, 1)], DELTA, "pld", "add-remove")
        assert replace == pytest.approx(half, rel=1e-6)
        assert replace > epsilon_for([(sigma, 1.0, 1)], DELTA, "pld", "add-remove")[0] * 1.5


def test_accountant_name_is_the_one_that_produced_the_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedpeft.privacy.accounting as accounting

    def broken(*_a: object, **_k: object) -> float:
        raise ValueError("numerically broken")

    monkeypatch.setattr(accounting.GridPRVAccountant, "get_epsilon", broken)
    accounting._epsilon_of.cache_clear()
    calibrate_noise.cache_clear()
    eps, used = epsilon_for([(1.0, 0.1, 20)], DELTA, "prv", "add-remove")
    assert used == "rdp" and eps > 0  # never "prv" after the fallback
    assert calibrate_noise(4.0, DELTA, 0.1, 20, "prv", relation="add-remove").accountant == "rdp"
    monkeypatch.setattr(accounting, "pld_epsilon", broken)
    with pytest.raises(ValueError, match="numerically broken"):  # replace-one: pld only, no fallback
        epsilon_for([(1.0, 0.1, 21)], DELTA)
    accounting._epsilon_of.cache_clear()
    calibrate_noise.cache_clear()


# ---- the plan ------------------------------------------------------------------------------------
def test_changed_batch_size_is_accounted_at_the_q_that_ran(tmp_path: Path) -> None:
    """Stale-q regression: one round at batch 64 then three at batch 512 on one ledger. The
    recorded epsilon is that of the real (sigma, q, steps) list, never the stale-q figure."""
    n, rounds, target = 1024, 4, 6.0
    led = Ledger.load_or_new(tmp_path / "client-0.json", None, client="0", target_epsilon=target, delta=DELTA)
    ran = []
    for r in range(1, rounds + 1):
        batch = 64 if r == 1 else 512
        q = sample_rate_for(n, batch)
        steps = round(1 / q)  # one epoch
        led.ensure_plan(target_epsilon=target, delta=DELTA, sample_rate=q, planned_steps=steps * (rounds - r + 1),
                        accountant="pld")
        led.check_budget(steps)
        eps = led.record(r, steps, f"k{r}", f"o{r}", noise_multiplier=led.noise_multiplier, sample_rate=q)
        ran.append((led.noise_multiplier, q, steps))
        led.save(tmp_path / "client-0.json")
    true = _dpa(ran, NeighboringRelation.REPLACE_ONE)
    stale = _dpa([(s, 1 / 16, k) for s, _, k in ran], NeighboringRelation.REPLACE_ONE)
    assert eps == pytest.approx(true, rel=1e-6) and led.epsilon()[0] == pytest.approx(true, rel=1e-6)
    assert abs(stale - true) > 0.05 * true
    assert eps <= target and eps > 0.97 * target  # re-planned, not wasted
    assert [e.sample_rate for e in led.entries] == [1 / 16, 0.5, 0.5, 0.5]
    assert all(e.accountant == "pld" for e in led.entries)


def test_plan_holds_or_refuses_with_a_reason() -> None:
    led = Ledger("0", 4.0, DELTA)
    assert "new ledger" in led.ensure_plan(target_epsilon=4.0, delta=DELTA, sample_rate=0.25, planned_steps=8,
                                           accountant="pld")
    sigma = led.noise_multiplier
    led.record(1, 4, noise_multiplier=sigma, sample_rate=0.25)
    assert "plan holds" in led.ensure_plan(target_epsilon=4.0, delta=DELTA, sample_rate=0.25, planned_steps=4,
                                           accountant="pld")
    assert led.noise_multiplier == sigma
    for kwargs, word in (({"delta": 1e-6}, "delta"), ({"accountant": "prv"}, "accountant"),
                         ({"relation": "add-remove"}, "relation")):
        args = {"target_epsilon": 4.0, "delta": DELTA, "sample_rate": 0.25, "planned_steps": 4, "accountant": "pld"}
        with pytest.raises(PlanMismatch, match=word) as info:
            led.ensure_plan(**(args | kwargs))  # type: ignore[arg-type]
        assert isinstance(info.value, BudgetExceeded) and "\n" not in str(info.value)
    led.record(2, 400, noise_multiplier=sigma, sample_rate=0.25)  # spent beyond the budget
    with pytest.raises(PlanMismatch, match="already spends"):
        led.ensure_plan(target_epsilon=4.0, delta=DELTA, sample_rate=0.25, planned_steps=4, accountant="pld")


def test_old_ledger_without_relation_stays_add_remove() -> None:
    old = {"client": "3", "target_epsilon": 6.0, "delta": DELTA, "accountant": "prv", "noise_multiplier": 1.0,
           "sample_rate": 0.1, "planned_steps": 20,
           "entries": [{"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "epsilon_after": 1.0,
                        "replay_key": "", "output_hash": ""}]}
    led = Ledger.from_json(json.dumps(old))
    assert led.relation == "add-remove" and led.accountant == "prv"
    assert led.epsilon() == epsilon_for([(1.0, 0.1, 10)], DELTA, "prv", "add-remove")
    with pytest.raises(PlanMismatch, match="relation"):  # a new (replace-one) run cannot continue it
        led.ensure_plan(target_epsilon=6.0, delta=DELTA, sample_rate=0.1, planned_steps=10, accountant="prv")


# ---- merge and validation ------------------------------------------------------------------------
def _entry(r: int, key: str, steps: int = 4) -> LedgerEntry:
    return LedgerEntry(r, 1.2, 0.25, steps, 0.0, key, "out" + key)


def test_divergent_copies_merge_as_a_union(tmp_path: Path) -> None:
    path = tmp_path / "client-0.json"
    disk = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=16,
                  entries=[_entry(1, "a"), _entry(2, "b"), _entry(3, "c")])
    state = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=16,
                   entries=[_entry(1, "a"), _entry(2, "b2", steps=8)])  # round 2 retried elsewhere
    disk.save(path)
    merged = Ledger.load_or_new(path, state.to_json(), client="0", target_epsilon=6.0, delta=DELTA)
    assert sorted(e.key for e in merged.entries) == sorted(
        {e.key for e in disk.entries} | {e.key for e in state.entries})
    assert merged.total_steps == 20 and [e.round for e in merged.entries] == [1, 2, 2, 3]
    assert merged.entries[-1].epsilon_after == pytest.approx(epsilon_for([(1.2, 0.25, 20)], DELTA)[0])
    for name, value in (("delta", 1e-6), ("relation", "add-remove"), ("client", "9")):
        other = Ledger.from_json(state.to_json())
        setattr(other, name, value)
        if name == "relation":
            other.accountant = "prv"
        with pytest.raises(LedgerConflict, match=name if name != "client" else "client"):
            Ledger.load_or_new(path, other.to_json(), client="0", target_epsilon=6.0, delta=DELTA)


def _good() -> dict:  # type: ignore[type-arg]
    return json.loads(Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8,
                             entries=[_entry(1, "a")]).to_json())


@pytest.mark.parametrize(("where", "key", "value"), [
    ("entry", "steps", -1), ("entry", "steps", 2.5), ("entry", "noise_multiplier", 0.0),
    ("entry", "noise_multiplier", float("nan")), ("entry", "noise_multiplier", float("inf")),
    ("entry", "sample_rate", 0.0), ("entry", "sample_rate", 1.5), ("entry", "round", -1),
    ("ledger", "delta", 0.0), ("ledger", "delta", 1.0), ("ledger", "relation", "add-one"),
    ("ledger", "accountant", "moments"), ("ledger", "client", None), ("entry", "steps", None),
])
def test_malformed_ledgers_are_rejected(where: str, key: str, value: object) -> None:
    raw = _good()
    target = raw["entries"][0] if where == "entry" else raw
    if value is None:
        del target[key]
    else:
        target[key] = value
    with pytest.raises(ValueError) as info:
        Ledger.from_json(json.dumps(raw))
    assert "\n" not in str(info.value)
    Ledger.from_json(json.dumps(_good()))  # the unmodified ledger loads


def test_record_takes_what_ran_and_validates_it() -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.2, sample_rate=0.25, planned_steps=8)
    with pytest.raises(TypeError):
        led.record(1, 4)  # type: ignore[call-arg]  # sigma and q are keyword-only and required
    with pytest.raises(ValueError, match="sample_rate"):
        led.record(1, 4, noise_multiplier=1.2, sample_rate=0.0)
    e = led.record(1, 4, "k", "o", noise_multiplier=1.3, sample_rate=0.2)
    assert led.record(1, 4, "k", "o", noise_multiplier=1.3, sample_rate=0.2) == e and len(led.entries) == 1
    assert led.history == [(1.3, 0.2, 4)]


# ---- the audit -----------------------------------------------------------------------------------
def _run_dir(tmp_path: Path, ledger: Ledger, reported: float) -> Path:
    run = tmp_path / "run"
    (run / "ledger").mkdir(parents=True)
    ledger.save(run / "ledger" / f"client-{ledger.client}.json")
    (run / "metrics.jsonl").write_text(json.dumps({"round": 2, "epsilon_per_client": {ledger.client: reported}}) + "\n")
    return run


def test_audit_refuses_an_under_reported_replace_one_epsilon(tmp_path: Path) -> None:
    led = Ledger("0", 6.0, DELTA, noise_multiplier=1.1, sample_rate=0.25, planned_steps=12)
    led.record(1, 4, "a", "x", noise_multiplier=1.1, sample_rate=0.25)
    led.record(1, 4, "b", "y", noise_multiplier=1.1, sample_rate=0.25)  # a retried round: new spending
    eps = led.record(2, 4, "c", "z", noise_multiplier=1.1, sample_rate=0.25)
    lower, upper = pld_bounds(led.history, DELTA, "replace-one")
    assert lower <= eps <= upper * 1.001 and upper - lower < 0.01 * upper
    ok = audit_run(_run_dir(tmp_path / "ok", led, eps))
    assert ok.ok, ok.table()
    assert "replace-one" in ok.table() and "example-level" in ok.table() and "pld" in ok.table()
    low = audit_run(_run_dir(tmp_path / "low", led, lower * (1 - 1e-4)))
    assert not low.ok and "under-reported" in "; ".join(low.rows[0].problems)
    high = audit_run(_run_dir(tmp_path / "high", led, upper * 1.05))
    assert not high.ok and "above" in "; ".join(high.rows[0].problems)


def test_audit_of_an_old_add_remove_ledger_refuses_below_the_lower_bound(tmp_path: Path) -> None:
    led = Ledger("0", 6.0, DELTA, "prv", noise_multiplier=1.1, sample_rate=0.25, planned_steps=8,
                 relation="add-remove")
    eps = led.record(1, 8, noise_multiplier=1.1, sample_rate=0.25)
    lower, _ = pld_bounds(led.history, DELTA, "add-remove")
    assert audit_run(_run_dir(tmp_path / "ok", led, eps)).ok
    res = audit_run(_run_dir(tmp_path / "low", led, lower * 0.99))  # 1 % below: once accepted (2 % tolerance)
    assert not res.ok and "under-reported" in "; ".join(res.rows[0].problems)
    assert not math.isnan(res.rows[0].opacus_rdp) and res.rows[0].relation == "add-remove"


# ---- run directory reuse -------------------------------------------------------------------------
def test_run_dir_with_ledgers_of_another_config_is_not_reused(tmp_path: Path) -> None:
    from fedpeft.config import config_hash
    from fedpeft.load import parse_config
    from fedpeft.server.run_dir import RunDir, RunDirReused

    a, b = parse_config({"train.rounds": 2}), parse_config({"train.rounds": 3})
    rd = RunDir(tmp_path / "run")
    rd.write_config(a)
    rd.write_config(b)  # no ledgers yet: nothing was charged, the directory may be reconfigured
    rd.write_config(a)
    (rd.ledger_dir / "client-0.json").write_text(Ledger("0", 6.0, DELTA).to_json())
    rd.write_config(a)  # a resume of the same configuration
    with pytest.raises(RunDirReused) as info:
        rd.write_config(b)
    msg = str(info.value)
    assert config_hash(a) in msg and config_hash(b) in msg and "--output-dir" in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_config_refuses_add_remove_accountants() -> None:
    from fedpeft.config import ConfigError, PrivacyConfig
    from fedpeft.load import parse_config

    assert PrivacyConfig().accountant == "pld" and parse_config({}).privacy.accountant == "pld"
    for name in ("prv", "rdp"):
        with pytest.raises(ConfigError, match="add/remove neighbours.*example count.*allowed: pld") as info:
            parse_config({"privacy.accountant": name})
        assert "\n" not in str(info.value)
