"""One tiny real Flower simulation with a heterogeneous scenario: the emulator's plan
reaches the clients (rank, decline), the deadline drops the straggler, and the run writes
simulated times, the timeline and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_model import hetero_scenario

SCENARIO = hetero_scenario("test-hetero")


# One real Flower simulation (~30 s on a quiet 2-core machine, ~90 s on a busy one): slow suite.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hetero_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fedpeft.load import parse_config
    from fedpeft.sim.hetero.run import run_scenario
    from fedpeft.sim.hetero.scenario import load_scenario

    tmp = tmp_path_factory.mktemp("hetero")
    (tmp / "s.toml").write_text(SCENARIO)
    scenario = load_scenario(str(tmp / "s.toml"))
    cfg = parse_config(scenario.config, {
        "model.path": str(tiny_model_dir), "model.max_length": 24, "data.examples_per_client": 64,
        "data.test_size": 64, "train.rounds": 2, "train.batch_size": 32, "train.local_steps": 1,
    })
    path, rows = run_scenario(scenario, cfg, tmp / "run")
    assignment = scenario.assign(4, cfg.seed)
    return path, rows, assignment


def test_rows_carry_simulated_time_next_to_real(hetero_run) -> None:  # type: ignore[no-untyped-def]
    path, rows, _ = hetero_run
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for row in lines:
        assert row["sim_seconds"] == pytest.approx(30.0)  # the straggler is late: the round lasts the deadline
        assert row["seconds"] > 0
        assert row["hetero"] == {"accepted": 2, "late": 1, "surplus": 0, "crashed": 0, "offline": 0, "declined": 1}
        assert row["clients_accepted"] == 2
    assert lines[1]["sim_clock"] == pytest.approx(lines[0]["sim_clock"] + lines[1]["sim_seconds"])


def test_timeline_shows_each_clients_fate_and_ranks(hetero_run) -> None:  # type: ignore[no-untyped-def]
    path, rows, assignment = hetero_run
    entries = [json.loads(x) for x in (path / "hetero_timeline.jsonl").read_text().splitlines()]
    assert len(entries) == 4 * 2
    for e in entries:
        profile = assignment[int(e["client"])]
        assert e["profile"] == profile
        assert e["status"] == {"Fast": "accepted", "Slow": "late", "Tiny": "declined"}[profile]
        if profile == "Tiny":
            assert "declines" in e["reason"] and e["bytes_up"] == 0
    fast = [e for e in entries if e["profile"] == "Fast"]
    slow = [e for e in entries if e["profile"] == "Slow"]
    # the rank-2 client really sent half of B's columns (the head is the same size for both)
    assert slow[0]["bytes_up"] < fast[0]["bytes_up"]
    # Compute is the server's cost-model estimate (client timings never leave a DP node, and are
    # not used without DP either), scaled to the device: 1000 TFLOPS beats the host, and the host
    # estimate is the server's price per example-step x the steps and expected batch the reply implies.
    cost = json.loads((path / "hetero_plan.json").read_text())["compute_cost"]
    assert cost["seconds_per_example"] > 0 and cost["dp"] and cost["source"] == "server cost model"
    for e in fast + slow:
        assert e["compute_source"] == "server cost model" and "measured_compute_s" not in e
        assert e["steps"] == 1 and e["expected_batch"] == pytest.approx(32.0)  # 64 examples, batch 32
        assert e["estimated_compute_s"] == pytest.approx(cost["seconds_per_example"] * 32)
    assert all(e["compute_s"] < e["estimated_compute_s"] for e in fast)
    assert all(e["compute_s"] > 30.0 for e in slow)  # 1e-6 TFLOPS: late by the emulated compute alone
    # a declined client never trained: it has no privacy ledger entry
    declined = {e["client"] for e in entries if e["status"] == "declined"}
    assert not declined & set(rows[-1]["epsilon_per_client"])


def test_plots_written(hetero_run) -> None:  # type: ignore[no-untyped-def]
    path, _, _ = hetero_run
    for name in ("sim_time_per_round", "client_timeline", "accuracy_vs_sim_time", "participation"):
        png = path / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name


def test_report_shows_the_client_timeline(hetero_run) -> None:  # type: ignore[no-untyped-def]
    """The end-of-run report of a simulated hetero run embeds the timeline the emulator drew."""
    path, _, _ = hetero_run
    html = (path / "report.html").read_text()
    assert "id='timeline'" in html and 'alt="client_timeline"' in html and 'alt="participation"' in html
