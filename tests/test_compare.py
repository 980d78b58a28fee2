"""``fedpeft compare``: the cell grid, resume bookkeeping, report generation.

The per-cell runner is replaced by a fake that writes a run directory the way the real
server does (config.toml through RunDir, one metrics row per round), so the bookkeeping is
tested fast; one real Flower sweep of two cells is marked slow.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedpeft.cli.main import main as cli_main
from fedpeft.config import ConfigError, RunConfig
from fedpeft.server.run_dir import RunDir
from fedpeft.sim.compare import SweepSpec, cell_is_finished, plan_cells, run_sweep, write_report
from fedpeft.sim.compare.report import CSV_FIELDS


def _base(tiny_model_dir: Path, rounds: int = 2) -> dict[str, object]:
    return {"model.path": str(tiny_model_dir), "model.max_length": 24, "data.examples_per_client": 96,
            "data.test_size": 64, "train.rounds": rounds, "train.batch_size": 32, "train.local_steps": 2}


class FakeRunner:
    """Writes what a real run writes; ``fail`` names cells that raise; records calls."""

    def __init__(self, fail: tuple[str, ...] = (), stop_after_round: int | None = None,
                 all_clients_fail: tuple[str, ...] = ()) -> None:
        self.calls: list[str] = []
        self.fail, self.stop_after_round, self.all_clients_fail = fail, stop_after_round, all_clients_fail

    def __call__(self, cfg: RunConfig, path: Path) -> None:
        self.calls.append(path.name)
        rd = RunDir(path)
        rd.write_config(cfg)
        (rd.ledger_dir / "client-0.json").write_text("{}")
        eps = cfg.privacy.epsilon
        for r in range(1, cfg.train.rounds + 1):
            if self.stop_after_round is not None and r > self.stop_after_round:
                return
            rd.append_metrics({
                "round": r, "accuracy": 0.5 + 0.01 * r + 0.001 * cfg.seed + (0.0 if math.isinf(eps) else -0.1 / eps),
                "loss": 0.7, "epsilon": math.inf if math.isinf(eps) else eps * r / cfg.train.rounds,
                "delta": cfg.privacy.delta, "bytes_up": 1000 * r, "seconds": 1.5, "accountant": "prv",
                **({"clients_accepted": 0, "failed": {"node-1": "OutOfMemoryError: worker killed"}}
                   if path.name in self.all_clients_fail else {"clients_accepted": 3, "failed": {}}),
            })
        if path.name in self.fail:
            raise RuntimeError("boom: simulated failure")


def test_grid_covers_every_method_epsilon_and_seed(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = SweepSpec(("ffa_lora", "nola"), (math.inf, 2.0), (0, 1), _base(tiny_model_dir))
    cells = plan_cells(spec, tmp_path)
    assert len(cells) == 8 and len({c.path for c in cells}) == 8
    assert {(c.cfg.adapter.method, c.cfg.privacy.epsilon, c.cfg.seed) for c in cells} == {
        (m, e, s) for m in ("ffa_lora", "nola") for e in (math.inf, 2.0) for s in (0, 1)}
    assert all(c.cfg.output_dir == str(c.path) and c.cfg.train.rounds == 2 for c in cells)
    with pytest.raises(ConfigError, match="registered"):
        plan_cells(SweepSpec(("no_such_method",), (1.0,), (0,), _base(tiny_model_dir)), tmp_path)


def test_finished_cells_are_not_rerun_and_failures_are_retried(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = SweepSpec(("ffa_lora", "lora"), (math.inf, 3.0), (0,), _base(tiny_model_dir))
    cells = plan_cells(spec, tmp_path)
    failing = cells[1].name
    first = FakeRunner(fail=(failing,))
    results = run_sweep(cells, first)
    assert len(first.calls) == 4
    assert [r.status for r in results].count("failed") == 1
    assert json.loads((cells[1].path / "cell.json").read_text())["status"] == "failed"
    second = FakeRunner()
    results = run_sweep(cells, second)
    assert second.calls == [failing]  # only the failed cell again
    assert [r.status for r in results] == ["skipped", "ran", "skipped", "skipped"]
    assert run_sweep(cells, third := FakeRunner()) and third.calls == []


def test_partial_runs_are_cleaned_and_rerun(tiny_model_dir: Path, tmp_path: Path) -> None:
    cells = plan_cells(SweepSpec(("ffa_lora",), (3.0,), (0,), _base(tiny_model_dir, rounds=3)), tmp_path)
    FakeRunner(stop_after_round=1)(cells[0].cfg, cells[0].path)  # interrupted after round 1
    assert not cell_is_finished(cells[0])
    stale = cells[0].path / "ledger" / "client-9.json"  # a ledger must not carry spent budget over
    stale.write_text("{}")
    runner = FakeRunner()
    run_sweep(cells, runner)
    assert runner.calls == [cells[0].name] and not stale.exists() and cell_is_finished(cells[0])


def test_a_run_whose_clients_all_failed_is_a_failed_cell(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Complete metrics from a run where no update was ever averaged (e.g. Ray killed the workers
    for memory) must not enter the comparison as an untrained model."""
    cells = plan_cells(SweepSpec(("ffa_lora",), (3.0,), (0,), _base(tiny_model_dir)), tmp_path)
    results = run_sweep(cells, FakeRunner(all_clients_fail=(cells[0].name,)))
    assert results[0].status == "failed" and "every client failed" in results[0].error
    assert "OutOfMemoryError" in json.loads((cells[0].path / "cell.json").read_text())["error"]
    assert not cell_is_finished(cells[0])
    rerun = FakeRunner()
    assert run_sweep(cells, rerun)[0].status == "ran" and rerun.calls == [cells[0].name]


def test_a_changed_configuration_reruns_the_cells(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = SweepSpec(("ffa_lora",), (3.0,), (0,), _base(tiny_model_dir))
    run_sweep(plan_cells(spec, tmp_path), FakeRunner())
    changed = SweepSpec(("ffa_lora",), (3.0,), (0,), {**_base(tiny_model_dir), "train.lr": 0.05})
    runner = FakeRunner()
    run_sweep(plan_cells(changed, tmp_path), runner)
    assert len(runner.calls) == 1


def test_report_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = SweepSpec(("ffa_lora", "lora"), (math.inf, 6.0, 1.0), (0, 1), _base(tiny_model_dir))
    cells = plan_cells(spec, tmp_path)
    run_sweep(cells[:-1], FakeRunner())  # the last cell never ran
    paths = write_report(cells, tmp_path, baseline=0.5)
    with paths["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11 and tuple(rows[0]) == CSV_FIELDS
    for row in rows:
        metrics = [json.loads(x) for x in (tmp_path / row["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        assert float(row["final_accuracy"]) == pytest.approx(metrics[-1]["accuracy"])
        assert float(row["best_accuracy"]) == pytest.approx(max(m["accuracy"] for m in metrics))
        assert int(row["bytes_up"]) == sum(m["bytes_up"] for m in metrics)
        assert float(row["wall_s"]) > 0
        assert (row["epsilon_spent"] == "inf") == (row["epsilon_target"] == "inf")
    for name in ("accuracy_vs_epsilon", "epsilon_vs_round", "accuracy_vs_round", "upload_bytes"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 4 and 'src="plots/' not in page
    md = paths["md"].read_text()
    assert "11 of 12 runs finished" in md and cells[-1].name in md and "majority class" in md
    assert "| method | epsilon_target |" in md and "At epsilon = 6:" in md


def test_compare_cli_errors_and_report_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = ["-q", "compare", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path)]
    assert cli_main([*common, "--epsilons", "abc"]) == 2
    assert cli_main([*common, "--methods", "nope"]) == 2
    assert cli_main([*common, "--seeds", "0"]) == 2
    args = [*common, "--rounds", "2", "--max-length", "24", "--examples-per-client", "96", "--test-size", "64",
            "--batch-size", "32", "--local-steps", "2", "--methods", "ffa_lora", "--epsilons", "inf", "--seeds", "1"]
    cells = plan_cells(SweepSpec(("ffa_lora",), (math.inf,), (0,), {**_base(tiny_model_dir),
                                                                   "train.physical_batch_size": 64}), tmp_path)
    run_sweep(cells, FakeRunner())
    assert cli_main([*args, "--report-only"]) == 0
    assert "1 of 1 runs finished" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_real_flower_sweep_of_two_cells_and_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = SweepSpec(("ffa_lora",), (math.inf, 4.0), (0,), _base(tiny_model_dir))
    cells = plan_cells(spec, tmp_path)
    results = run_sweep(cells)
    assert [r.status for r in results] == ["ran", "ran"]
    assert [r.status for r in run_sweep(cells)] == ["skipped", "skipped"]
    paths = write_report(cells, tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    dp = next(r for r in rows if r["epsilon_target"] == "4.0")
    assert 0 < float(dp["epsilon_spent"]) <= 4.0
