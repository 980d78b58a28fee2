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


def test_causal_lm_smoke_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``fedpeft bench --quick --only causal_lm`` on the tiny Llama: every variant runs (hooks,
    ghost clipping, the bare PEFT + Opacus loops) and the results file is well formed."""
    from fedpeft.cli.main import main

    out = tmp_path / "bench" / "lm.json"
    assert main(["bench", "--quick", "--only", "causal_lm", "--lm-model", str(tiny_llama_dir), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["options"]["only"] == ["causal_lm"] and report["load_average"]["before"] is not None
    rows = {r["name"]: r for r in report["results"]}
    assert all(r["benchmark"] == "causal_lm" and r["error"] is None for r in rows.values()), \
        [r["error"] for r in rows.values() if r["error"]]
    hooks = rows["DP / non-DP step time, FFA-LoRA, Opacus hooks (fedpeft trainer)"]
    assert hooks["target"]["bound"] == 1.15 and len(hooks["detail"]["per_rep_ratio"]) == 2
    lo, hi = hooks["detail"]["spread"]
    assert lo <= hi and "batch 2 x 32 tokens (8 completion" in hooks["detail"]["shape"]
    for name in ("fedpeft non-DP", "fedpeft DP hooks", "DP ghost", "bare non-DP", "bare DP hooks"):
        assert rows[f"training throughput, {name}"]["value"] > 0
        assert rows[f"peak RSS during a step, {name}"]["value"] > 0
    ratio = rows["upload bytes per round, FFA-LoRA / LoRA"]
    assert ratio["value"] == ratio["detail"]["ffa_lora_bytes"] / ratio["detail"]["lora_bytes"]
    assert ratio["met"] is True  # the closed form of B-only uploads for these projection shapes


def test_opt_in_benchmark_is_not_in_the_default_selection() -> None:
    from benchmarks.suite import BENCHMARKS, OPT_IN, selected

    assert "causal_lm" in BENCHMARKS and "causal_lm" in OPT_IN
    assert "causal_lm" not in selected("") and selected("causal_lm") == ["causal_lm"]


def test_ghost_clipping_on_a_peft_llama_clips_like_the_hooks(tiny_llama_dir: Path) -> None:
    """Opacus ghost clipping with fedpeft's per-example completion loss (the causal_lm
    benchmark's ghost variant) takes the same clipped step as hooks mode on a PEFT Llama."""
    import copy
    import warnings

    import torch
    from opacus import PrivacyEngine

    from benchmarks.causal_lm import CompletionLoss, LMBench
    from fedpeft.tasks.causal_lm import completion_logits
    from fedpeft.tasks.registry import get

    bench = LMBench.create(str(tiny_llama_dir), 4, 24, 6, device="cpu")
    _, model, _ = bench.fedpeft_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero: make it non-zero so the per-example gradients differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    inputs = {k: bench.batch[k] for k in ("input_ids", "attention_mask")}
    labels = bench.batch["labels"]
    after = {}
    for mode in ("hooks", "ghost"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = PrivacyEngine(accountant="prv").make_private(
                module=m, optimizer=opt, data_loader=bench._loader(), noise_multiplier=0.0, max_grad_norm=1e-3,
                poisson_sampling=True, grad_sample_mode=mode, **({"criterion": CompletionLoss()} if mode == "ghost" else {}))
        net, dp_opt = parts[0], parts[1]
        if mode == "ghost":
            parts[2](completion_logits(net, inputs, labels), labels).backward()
        else:
            get("causal-lm").loss(net, bench.batch).backward()
        dp_opt.step()
        after[mode] = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    before = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert after["hooks"] and set(after["hooks"]) == set(after["ghost"])
    moved = sum(float((after["hooks"][n] - before[n]).norm() ** 2) for n in before) ** 0.5
    assert 0 < moved <= 1e-3 * 1.0001  # clipped: 4 examples of norm <= 1e-3, averaged
    for n in before:
        assert torch.allclose(after["hooks"][n], after["ghost"][n], atol=1e-8, rtol=1e-5), n


def test_cpu_by_kind_counts_the_processes_below_by_what_they_are() -> None:
    """The sim-overhead benchmark's CPU breakdown: a child that burns CPU is counted under its
    kind (named by its command line), the caller's own time under ``driver``."""
    import subprocess
    import sys

    from benchmarks.simbench import _cpu_by_kind, _kind

    assert _kind(["python", "/venv/bin/flower-superlink", "--insecure"]) == "SuperLink"
    assert _kind(["ray::ClientAppActor"]) == "client actors"
    assert _kind(["python", "-u", "ray/_private/log_monitor.py"]) == "Ray daemons and other"
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\n"
    rc, cpu = _cpu_by_kind(lambda: subprocess.run([sys.executable, "-c", burn, "flwr-simulation"]).returncode)
    assert rc == 0 and 0.5 <= cpu["ServerApp (flwr-simulation)"] <= 5.0  # its argv names it
    assert "driver" in cpu
    # a Ray worker renames itself to its actor, and an exiting process's command line reads
    # empty: its CPU time stays the actor's, not Ray's daemons'
    pytest.importorskip("setproctitle")
    actor = ("import time, setproctitle\nsetproctitle.setproctitle('ray::ClientAppActor')\n"
             "t = time.process_time()\nwhile time.process_time() - t < 0.8: pass\n"
             "setproctitle.setproctitle('')\ntime.sleep(1.0)\n")
    rc, cpu = _cpu_by_kind(lambda: subprocess.run([sys.executable, "-c", actor]).returncode)
    assert rc == 0 and 0.5 <= cpu.get("client actors", 0.0) <= 5.0, cpu


def test_method_matrix_only_times_the_named_methods_and_ffa_lora(tiny_model_dir: Path) -> None:
    """``--methods``: only the named methods and FFA-LoRA (every ratio's reference) are built and
    timed; an unknown name is an error before anything is built."""
    from benchmarks.steps import StepBench, method_matrix

    bench = StepBench.create(str(tiny_model_dir), 4, 16)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_matrix(bench, 1, 0, only=("nope",))
    rows = method_matrix(bench, 1, 0, only=("rolora",))
    assert {r.name.split(":")[0] for r in rows} == {"rolora", "ffa_lora"}
    assert all(r.error is None and r.value is not None and r.value > 0 for r in rows)
    upload = next(r for r in rows if r.name == "rolora: upload bytes / FFA-LoRA")
    assert upload.value == pytest.approx(1.0), "a B round uploads what FFA-LoRA does"


def test_flower_scan_drives_flowers_own_lookup_on_its_stand_in_state(tmp_path: Path) -> None:
    """The scan benchmark's state is one Flower's ``get_message_ins`` really reads: a message
    addressed to a scanned node is found once and marked delivered, others are left alone; the
    report names every (nodes, in flight) pair it measured."""
    from benchmarks import flower_scan

    state = flower_scan._State(3)
    assert state.get_message_ins(node_id=1, limit=1) == []
    from types import SimpleNamespace

    mine = {**vars(state.message_ins_store["m0"].metadata), "dst_node_id": 7}
    state.message_ins_store["mine"] = SimpleNamespace(metadata=SimpleNamespace(**mine))
    found = state.get_message_ins(node_id=7, limit=1)
    assert len(found) == 1 and found[0].metadata.delivered_at != ""
    assert state.get_message_ins(node_id=7, limit=1) == []  # delivered once
    assert flower_scan.main(["--reps", "1", "--output", str(tmp_path / "scan")]) == 0
    rows = json.loads((tmp_path / "scan.json").read_text())["rows"]
    assert {(r["nodes"], r["messages_in_flight"]) for r in rows} == {(n, m) for n in (10, 1000, 10000) for m in (0, 10)}
    assert all(r["cpu_ms_per_scan"] >= 0 and 0 <= r["core_share"] < 1 for r in rows)
