"""The benchmark suite's bookkeeping, target logic, rendering and a --quick smoke run.

No timing assertions: figures are only checked to be well formed, never compared to numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.results import Measurement, Target, build_report, render_markdown, summary, write_report
from benchmarks.steps import interleaved_medians


@pytest.mark.parametrize(("op", "bound", "value", "expected"), [
    ("<=", 1.10, 1.05, True), ("<=", 1.10, 1.10, True), ("<=", 1.10, 1.2, False),
    (">=", 2.0, 2.5, True), (">=", 2.0, 1.5, False),
    ("==", 0.5, 0.5, True), ("==", 0.5, 0.5000001, False),
    ("<=", 1.0, None, None), ("<=", 1.0, math.nan, None), ("<=", 1.0, math.inf, None),
])
def test_target_met(op: str, bound: float, value: float | None, expected: bool | None) -> None:
    assert Target(op, bound).met(value) is expected


def test_target_rejects_unknown_operator() -> None:
    with pytest.raises(ValueError, match="operator"):
        Target("<", 1.0)


def test_failed_or_untargeted_measurement_is_never_met() -> None:
    failed = Measurement("dp_overhead", "ew mode", 0.5, target=Target("<=", 1.0), error="TypeError: boom")
    info = Measurement("dp_overhead", "non-DP step", 0.3, "s")
    assert failed.met is None and info.met is None
    assert summary([failed, info]) == {"met": 0, "missed": 0, "failed": 1, "informational": 1}


def test_round_trip_and_markdown(tmp_path: Path) -> None:
    rows = [
        Measurement("communication", "FFA / LoRA bytes", 0.5, "x", Target("==", 0.5)),
        Measurement("dp_overhead", "DP / non-DP, hooks", 1.3, "x", Target("<=", 1.1), detail={"reps": 3}),
        Measurement("dp_overhead", "DP / non-DP, ew", error="TypeError: forward() missing | x"),
        Measurement("communication", "head share", 2.0, "%", Target("<=", 10.0)),
    ]
    report = build_report(rows, {"quick": True}, 12.3, [1.0, 2.0, 3.0])
    md_path = write_report(report, tmp_path / "out" / "results.json")
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert loaded["summary"] == {"met": 2, "missed": 1, "failed": 1, "informational": 0}
    assert [r["met"] for r in loaded["results"]] == [True, False, None, True]
    assert loaded["hardware"]["cores"] >= 1 and loaded["hardware"]["cpu"]
    assert set(loaded["hardware"]["versions"]) >= {"torch", "opacus", "flwr"}
    assert [Measurement.from_dict(r).to_dict() for r in loaded["results"]] == loaded["results"]
    md = md_path.read_text()
    assert md == render_markdown(loaded)
    table = [line for line in md.splitlines() if line.startswith("| ") and "Benchmark" not in line]
    assert len(table) == len(rows)
    assert all(line.count("|") == 5 for line in table)  # a "|" inside an error must not break the table
    assert "| **no** |" in table[1] and "| failed |" in table[2] and "| yes |" in table[0]
    assert "Targets met: 2, missed: 1" in md


def test_interleaved_medians_rotates_and_counts() -> None:
    calls: list[str] = []
    med = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert set(med) == {"a", "b"} and all(v >= 0 for v in med.values())
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotated order per repetition


def test_unknown_benchmark_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.main import main

    assert main(["bench", "--only", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedpeft: error:") and "nope" in err and len(err.splitlines()) == 1


def test_quick_smoke_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``fedpeft bench --quick`` of the cheap benchmarks writes a well-formed results file."""
    from fedpeft.cli.main import main

    out = tmp_path / "bench" / "results.json"
    rc = main(["bench", "--quick", "--only", "communication,ffa_vs_lora,dp_overhead", "--model", str(tiny_model_dir),
               "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["options"]["quick"] is True and report["options"]["only"] == ["communication", "ffa_vs_lora",
                                                                                "dp_overhead"]
    by_name = {(r["benchmark"], r["name"]): r for r in report["results"]}
    assert {r["benchmark"] for r in report["results"]} == {"communication", "ffa_vs_lora", "dp_overhead"}
    ratio = by_name[("communication", "upload bytes per round, adapter part, FFA-LoRA / LoRA")]
    assert ratio["value"] == ratio["detail"]["ffa_adapter_bytes"] / ratio["detail"]["lora_adapter_bytes"]
    assert ratio["met"] is (ratio["value"] == 0.5)
    hooks = by_name[("dp_overhead", "DP / non-DP step time, FFA-LoRA, Opacus hooks")]
    assert hooks["error"] is None and hooks["value"] > 0 and hooks["target"] == {"op": "<=", "bound": 1.1, "tol": 1e-9}
    for r in report["results"]:  # every row is either a positive finite figure or a failure with a reason
        assert (r["error"] is None and math.isfinite(r["value"]) and r["value"] > 0) or (r["error"] and r["met"] is None)
    assert out.with_suffix(".md").read_text().count("\n| ") == len(report["results"]) + 1
