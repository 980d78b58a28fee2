"""The privacy audit recomputes a REAL run's epsilons independently, and catches tampering.

One real (tiny) Flower simulation with client-side DP-SGD *and* client-level central DP
provides real ledgers; the tampering tests edit copies of its run directory.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fedpeft.cli.main import main as cli_main
from fedpeft.privacy.audit import audit_run, dp_accounting_epsilon
from fedpeft.privacy.ledger import Ledger
from fedpeft.privacy.plan import make_plan, sample_rate_for


@pytest.fixture(scope="module")
def dp_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedpeft.load import parse_config
    from fedpeft.sim.simulate import simulate

    cfg = parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 24,
        "data.examples_per_client": 96, "data.test_size": 64,
        "train.rounds": 2, "train.batch_size": 32, "train.local_steps": 2,
        "privacy.epsilon": 4.0, "central.mode": "server", "central.noise_multiplier": 1.5,
    })
    path, _ = simulate(cfg, tmp_path_factory.mktemp("audit") / "run")
    return path


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_audit_of_a_real_run_agrees_with_independent_accountants(dp_run: Path) -> None:
    result = audit_run(dp_run)
    assert result.ok, result.table()
    assert len(result.rows) == 3
    for row in result.rows:
        assert row.rounds == 2 and row.steps > 0
        assert row.relation == "replace-one" and row.accountant == "pld"  # n is public: replace-one neighbours
        # the reported figure lies between the independent fine-grid PLD bounds (never below the
        # lower one) and agrees with Google's PLDAccountant under REPLACE_ONE
        assert row.pld_lower <= row.reported_metrics <= row.pld_upper * 1.02
        assert abs(row.reported_metrics - row.dpa_pld) <= 0.02 * row.dpa_pld
        assert 0 < row.reported_metrics <= 4.0
    assert "PASSED" in result.table()


def test_central_dp_reports_both_epsilons_with_units(dp_run: Path) -> None:
    rows = [json.loads(x) for x in (dp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["central_releases"] for r in rows] == [1, 2]
    for r in rows:
        assert r["epsilon_unit"].startswith("example-level")
        assert r["epsilon_client_level_unit"].startswith("client-level")
        # equal client sizes; replace-one sensitivity 2 * clip / m against std 1.5 * clip / m
        assert r["central_noise_multiplier_effective"] == pytest.approx(0.75)
    # client-level epsilon: 2 releases of the Gaussian mechanism at sigma_eff 0.75, recomputed by dp-accounting
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(0.75), 2)
    assert rows[-1]["epsilon_client_level"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
    assert rows[1]["epsilon_client_level"] > rows[0]["epsilon_client_level"]


def test_tampered_ledger_fails_the_audit(dp_run: Path, tmp_path: Path) -> None:
    run = _copy(dp_run, tmp_path)
    led_path = run / "ledger" / "client-1.json"
    ledger = Ledger.from_json(led_path.read_text())
    ledger.entries[-1].steps *= 3  # more steps were taken than the reported epsilon admits
    led_path.write_text(ledger.to_json())
    result = audit_run(run)
    assert not result.ok
    bad = [r for r in result.rows if not r.ok]
    assert [r.client for r in bad] == ["1"] and "under-reported" in "; ".join(bad[0].problems)
    assert cli_main(["-q", "privacy", "audit", str(run)]) == 1


def test_tampered_metrics_fails_the_audit(dp_run: Path, tmp_path: Path) -> None:
    run = _copy(dp_run, tmp_path)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["epsilon_per_client"]["0"] *= 0.9  # under-reported by 10 %
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = audit_run(run)
    assert [r.client for r in result.rows if not r.ok] == ["0"]
    assert any("under-reported" in p for p in result.rows[0].problems)


def test_audit_of_a_directory_without_ledgers_fails(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "epsilon_per_client": {}}) + "\n")
    assert not audit_run(tmp_path).ok
    assert cli_main(["-q", "privacy", "audit", str(tmp_path / "nope")]) == 2


def test_plan_matches_the_ledger_the_clients_keep() -> None:
    q = sample_rate_for(96, 32)
    assert q == 1 / 3  # before calibrating: a wrong q (1/3072 for 96 * 32) makes the calibration run for minutes
    plan = make_plan(4.0, 1e-5, rounds=3, sample_rate=q, steps_per_round=2)
    assert plan.epsilon_per_round[-1] <= 4.0 and plan.epsilon_per_round == sorted(plan.epsilon_per_round)
    assert plan.relation == "replace-one" and plan.accountant == "pld"
    ledger = Ledger("c", 4.0, 1e-5, "pld", plan.noise_multiplier, q, 6)
    for r in range(1, 4):
        eps = ledger.record(r, 2, noise_multiplier=plan.noise_multiplier, sample_rate=q)
        assert eps == pytest.approx(plan.epsilon_per_round[r - 1], rel=1e-9)
    # the independent PLD (replace-one, as the clients account) agrees with the plan's final figure
    pld = dp_accounting_epsilon(ledger.history, 1e-5, "pld", "replace-one")
    assert math.isclose(pld, plan.epsilon_per_round[-1], rel_tol=0.02)


def test_plan_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["-q", "privacy", "plan", "--epsilon", "3", "--rounds", "2", "--examples", "96",
                     "--batch-size", "32", "--steps-per-round", "3"]) == 0
    out = capsys.readouterr().out
    assert "noise multiplier sigma=" in out and "example-level" in out and out.count("\n") >= 6
    assert cli_main(["-q", "privacy", "plan", "--epsilon", "0", "--rounds", "2", "--sample-rate", "0.1",
                     "--steps-per-round", "3"]) == 2
