"""``fedpeft compare``'s learning-rate choice on a validation split and its paired tests.

The cell runner is a fake (as in tests/test_compare.py) whose score depends on the split
the configuration tells the server to score, so a selection that read the test split would
pick another rate; the split itself is tested on the real task layout with a small file.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
from test_compare import FakeRunner, _base

from fedpeft.cli.main import main as cli_main
from fedpeft.config import RunConfig
from fedpeft.data.partition import client_partition
from fedpeft.load import parse_config
from fedpeft.server.run_dir import RunDir
from fedpeft.sim.compare import SweepSpec, write_report
from fedpeft.sim.compare.stats import min_sign_flip_p, paired_rows, paired_t_p, sign_flip_p
from fedpeft.sim.compare.tuning import choose_lrs, run_compare
from fedpeft.tasks.registry import task_for

VAL_BEST, TEST_BEST = 1e-3, 1e-2  # the validation split favours one rate, the test split the other


class SplitAwareRunner(FakeRunner):
    """A run whose final accuracy depends on the rate and on the split the server scores."""

    def __call__(self, cfg: RunConfig, path: Path) -> None:
        self.calls.append(path.name)
        rd = RunDir(path)
        rd.write_config(cfg)
        best = VAL_BEST if cfg.data.evaluate_on == "validation" else TEST_BEST
        acc = (0.8 if cfg.train.lr == best else 0.6) + 0.01 * (cfg.seed % 7)
        bytes_up = 1000 if cfg.adapter.method == "ffa_lora" else 2000
        for r in range(1, cfg.train.rounds + 1):
            rd.append_metrics({"round": r, "accuracy": acc, "loss": 0.5, "epsilon": math.inf, "delta": 1e-5,
                               "bytes_up": bytes_up, "seconds": 1.0, "clients_accepted": 3, "failed": {}})


def _spec(tiny_model_dir: Path, **kw: Any) -> SweepSpec:
    grid = {"ffa_lora": (VAL_BEST, TEST_BEST), "lora": (VAL_BEST, TEST_BEST)}
    return SweepSpec(("ffa_lora", "lora"), (math.inf, 3.0), (0, 1), _base(tiny_model_dir), grid, **kw)


def test_lr_is_chosen_on_the_validation_split_never_the_test_split(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = SplitAwareRunner()
    cells, tune, results = run_compare(_spec(tiny_model_dir, validation_size=40), tmp_path, runner)
    assert len(tune) == 8 and len(cells) == 8 and all(r.status == "ran" for r in results)
    assert {c.cfg.data.evaluate_on for c in tune} == {"validation"}
    assert {c.cfg.data.evaluate_on for c in cells} == {"test"}
    assert {c.seed for c in tune} == {100} and {c.seed for c in cells} == {0, 1}
    shared = {(c.cfg.data.split_seed, c.cfg.data.validation_size) for c in [*tune, *cells]}
    assert shared == {(0, 40)}  # one test and one validation split for every cell
    assert {c.cfg.train.lr for c in cells} == {VAL_BEST}
    assert {ch.lr for ch in choose_lrs(tune).values()} == {VAL_BEST}
    # epsilon by epsilon: tuning cells of inf, its evaluation cells seed by seed, then epsilon 3
    assert runner.calls[:4] == [c.name for c in tune if math.isinf(c.epsilon)]
    assert [n.rsplit("-", 1)[-1] for n in runner.calls[4:8]] == ["0", "0", "1", "1"]
    paths = write_report(cells, tmp_path, tuning=tune)
    rows = list(csv.DictReader(paths["tuning"].open()))
    assert {float(r["lr"]) for r in rows if r["chosen"] == "True"} == {VAL_BEST} and len(rows) == 8
    again = SplitAwareRunner()
    run_compare(_spec(tiny_model_dir, validation_size=40), tmp_path, again)
    assert again.calls == []  # tuning and evaluation cells both resume


class PersonalRunner(SplitAwareRunner):
    """FedSA-LoRA's server model (shared head, B = 0) favours one rate, its clients' accounted
    personalised evaluation (``personal_accuracy``, last round) the other."""

    def __call__(self, cfg: RunConfig, path: Path) -> None:
        super().__call__(cfg, path)
        if cfg.adapter.method != "fedsa_lora":
            return
        assert dict(cfg.adapter.options).get("eval_fraction"), "compare turns the personalised evaluation on"
        rd = RunDir(path)
        rows = rd.read_metrics()
        (path / "metrics.jsonl").unlink()
        for row in rows:
            personal = 0.9 if cfg.train.lr == TEST_BEST else 0.7  # the rate the server's validation did not favour
            rd.append_metrics({**row, **({"personal_accuracy": personal} if row is rows[-1] else {})})


def test_a_personalised_method_is_tuned_on_its_clients_held_out_metric(tiny_model_dir: Path, tmp_path: Path) -> None:
    grid = {"ffa_lora": (VAL_BEST, TEST_BEST), "fedsa_lora": (VAL_BEST, TEST_BEST)}
    spec = SweepSpec(("ffa_lora", "fedsa_lora"), (3.0,), (0,), _base(tiny_model_dir), grid, validation_size=40)
    cells, tune, _ = run_compare(spec, tmp_path, PersonalRunner())
    chosen = {k[0]: v.lr for k, v in choose_lrs(tune).items()}
    assert chosen == {"ffa_lora": VAL_BEST, "fedsa_lora": TEST_BEST}  # each on the metric it is judged by
    assert {c.cfg.train.lr for c in cells if c.method == "fedsa_lora"} == {TEST_BEST}
    rows = list(csv.DictReader(write_report(cells, tmp_path, tuning=tune)["tuning"].open()))
    judged = {(r["method"], float(r["lr"])): (r["judged_by"], float(r["validation_accuracy"])) for r in rows}
    assert judged[("fedsa_lora", TEST_BEST)] == ("personal_accuracy", 0.9)
    assert judged[("ffa_lora", VAL_BEST)][0] == "accuracy"


def test_a_tuning_cell_scoring_the_test_split_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_model_dir)
    cells, tune, _ = run_compare(spec, tmp_path, SplitAwareRunner())
    from dataclasses import replace

    leaked = [replace(c, cfg=replace(c.cfg, data=replace(c.cfg.data, evaluate_on="test"))) for c in tune]
    with pytest.raises(ValueError, match="validation split"):
        choose_lrs(leaked)


def test_an_unfinished_grid_chooses_nothing_and_its_cells_wait(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = SplitAwareRunner()
    _, tune, _ = run_compare(_spec(tiny_model_dir), tmp_path, runner)
    (tune[0].path / "metrics.jsonl").unlink()
    from fedpeft.sim.compare import plan_cells

    chosen = {k: v.lr for k, v in choose_lrs(tune).items()}
    assert (tune[0].method, tune[0].epsilon) not in chosen
    cells = plan_cells(_spec(tiny_model_dir), tmp_path, chosen)
    assert all((c.method, c.epsilon) != (tune[0].method, tune[0].epsilon) for c in cells)
    md = write_report(cells, tmp_path, tuning=tune)["md"].read_text()
    assert "waiting for every tuning cell of their grid to finish: the evaluation runs of ffa_lora at epsilon inf." in md


def _csv_file(tmp_path: Path, n: int = 400) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"example {i},{'ab'[i % 2]}\n" for i in range(n)))
    return path


def _layout(data: Path, seed: int, **data_keys: Any) -> Any:
    cfg = parse_config({"data.path": str(data), "data.test_size": 40, "data.partition": "iid", "seed": seed,
                        **{f"data.{k}": v for k, v in data_keys.items()}})
    return cfg, task_for(cfg).task_layout(cfg)[0]


def test_the_validation_split_is_held_out_of_training_and_disjoint_from_test(tmp_path: Path) -> None:
    data = _csv_file(tmp_path)
    cfg, scored_val = _layout(data, 100, validation_size=40, split_seed=0, evaluate_on="validation")
    _, scored_test = _layout(data, 0, validation_size=40, split_seed=0, evaluate_on="test")
    val, test = set(scored_val.test.texts), set(scored_test.test.texts)
    assert len(val) == 40 and len(test) == 40 and not val & test
    assert scored_val.pool.texts == scored_test.pool.texts  # same training pool for tuning and evaluation
    assert not (val | test) & set(scored_val.pool.texts) and len(scored_val.pool) == 320
    clients = {t for pid in range(3) for t in client_partition(scored_val.pool, cfg.data, 3, pid, 100).texts}
    assert clients and not clients & (val | test)
    # without a shared split seed the test split moves with the run seed (why compare fixes it)
    _, other = _layout(data, 1)
    _, first = _layout(data, 0)
    assert set(other.test.texts) != set(first.test.texts)
    _, plain = _layout(data, 0)
    assert len(plain.pool) == 360  # no validation size: the split as it always was


def test_sign_flip_and_paired_t_against_hand_values() -> None:
    from scipy import stats

    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)  # only all+ and all- reach |mean| = 2
    assert sign_flip_p([0.3, -0.1, 0.2]) == pytest.approx(0.5)  # sums +-0.6, +-0.4 of 8 reach 0.4
    assert sign_flip_p([0.1] * 6) == pytest.approx(2 / 64) == min_sign_flip_p(6)
    assert sign_flip_p([0.0, 0.0]) == 1.0 and min_sign_flip_p(3) == 0.25
    a, b = [0.71, 0.74, 0.69, 0.73], [0.70, 0.70, 0.66, 0.72]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    assert paired_t_p(diffs) == pytest.approx(float(stats.ttest_rel(a, b).pvalue))
    assert math.isnan(paired_t_p([0.1]))


def test_paired_rows_pair_by_seed_per_epsilon() -> None:
    def row(method: str, eps: float, seed: int, acc: float) -> dict[str, Any]:
        return {"method": method, "epsilon_target": eps, "seed": seed, "final_accuracy": acc}

    results = [row("ffa_lora", 6.0, s, a) for s, a in ((0, 0.60), (1, 0.70), (2, 0.80))]
    results += [row("lora", 6.0, s, a) for s, a in ((2, 0.85), (1, 0.71), (3, 0.10))]  # other order, seed 3 alone
    results += [row("lora", math.inf, 0, 0.9)]  # no reference there: no row
    (r,) = paired_rows(results, "accuracy", "ffa_lora")
    assert (r["method"], r["reference"], r["pairs"], r["better"]) == ("lora", "ffa_lora", 2, "lora")
    assert r["diff_mean"] == pytest.approx((0.05 + 0.01) / 2)
    assert r["p_sign_flip"] == pytest.approx(0.5) and r["p_sign_flip_min"] == 0.5
    (lower,) = paired_rows(results, "accuracy", "ffa_lora", higher_is_better=False)
    assert lower["better"] == "ffa_lora"


def test_report_has_chosen_rates_p_values_and_upload(tiny_model_dir: Path, tmp_path: Path) -> None:
    cells, tune, _ = run_compare(_spec(tiny_model_dir), tmp_path, SplitAwareRunner())
    paths = write_report(cells, tmp_path, tuning=tune)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    for text in (md, page):
        assert "Learning rate chosen on the validation split" in text and "p_sign_flip" in text
        assert "upload_vs_ffa_lora" in text and "little power" in text and "seed 100" in text
    assert "lora - ffa_lora = +0.000" in md  # same accuracy by construction: no significant difference
    results = list(csv.DictReader(paths["csv"].open()))
    assert {float(r["lr"]) for r in results} == {VAL_BEST}
    paired = list(csv.DictReader(paths["paired"].open()))
    assert len(paired) == 2 and {r["pairs"] for r in paired} == {"2"}
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora | inf |"))
    assert "| 2 |" in lora_row.replace("| 2000 |", "")  # upload ratio lora / ffa_lora = 2


def test_cli_lr_grid_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = ["-q", "compare", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--report-only"]
    assert cli_main([*common, "--lr-grid", "1e-3,abc"]) == 2
    assert cli_main([*common, "--lr-grid", "1e-3,inf"]) == 2
    assert cli_main([*common, "--lr-grid-for", "nola=1e-3"]) == 2  # not a method of the sweep
    assert cli_main([*common, "--lr-grid-for", "ffa_lora=1e-3"]) == 2  # lora would have no grid
    assert cli_main([*common, "--lr-grid", "1e-3", "--lr", "0.01"]) == 2
    assert cli_main([*common, "--lr-grid", "1e-3", "--seeds", "0,100"]) == 2  # the tuning seed
    assert cli_main([*common, "--lr-grid", "1e-3", "--validation-size", "5"]) == 2
    assert cli_main([*common, "--lr-grid", "1e-3", "--lr-grid-for", "lora=5e-4", "--epsilons", "inf",
                     "--seeds", "1"]) == 0  # nothing finished yet: an empty report
    assert "0 of 0 runs finished" in (tmp_path / "report.md").read_text()


def test_cli_report_only_reads_a_tuning_sweep(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The CLI's flags build the same cells as the spec (else nothing would count as finished)."""
    base = {**_base(tiny_model_dir), "train.physical_batch_size": 64}
    spec = SweepSpec(("ffa_lora",), (math.inf,), (0,), base, {"ffa_lora": (VAL_BEST, TEST_BEST)})
    run_compare(spec, tmp_path, SplitAwareRunner())
    assert cli_main(["-q", "compare", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path),
                     "--rounds", "2", "--max-length", "24", "--examples-per-client", "96", "--test-size", "64",
                     "--batch-size", "32", "--local-steps", "2", "--methods", "ffa_lora", "--epsilons", "inf",
                     "--seeds", "1", "--lr-grid", f"{TEST_BEST},{VAL_BEST}", "--report-only"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "1 of 1 runs finished" in md and "| ffa_lora | inf | 100 |" not in md
    assert "| ffa_lora | inf | 1 | 0.001 |" in md  # summary: 1 seed, the rate chosen on validation
